"""Time the ladder path's forward and backward against the same recurrence in plain autograd.

``flower_pae.side_network.path.ladder_path`` is one autograd node with a hand-written
backward; the baseline is the op sequence the side network ran before it (about ten
recorded ops per layer), timed in the same process, interleaved, best of several repeats,
one torch thread as the server runs. Prints each time and the ratio.

    python benchmarks/ladder_path.py --batch 20,64
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from flower_pae.side_network.path import ladder_path


def composed_path(x: Tensor, mus: Tensor, gates: Tensor, w1: list, w2: list) -> Tensor:
    """The recurrence as the side network computed it before ``ladder_path``."""
    own = ((1 - mus)[:, None, None] * x[:, 1:].transpose(0, 1)).unbind(0)
    m, g = mus.unbind(0), gates.unbind(0)
    h = x[:, 0] + ((x[:, 0] @ w1[0].T) * g[0]) @ w2[0].T
    for layer in range(1, x.shape[1]):
        inp = own[layer - 1] + m[layer - 1] * h
        h = inp + ((inp @ w1[layer].T) * g[layer]) @ w2[layer].T
    return h


def step_seconds(
    batch: int, layers: int, hidden: int, rank: int, train_mu: bool, steps: int, repeats: int
) -> dict[str, float]:
    """Best seconds per forward + backward step of each implementation."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, layers, hidden, generator=gen)
    alpha = torch.zeros(layers - 1, requires_grad=train_mu)  # μ trains in the first task only
    raw_gates = torch.full((layers, rank), 0.5, requires_grad=True)
    w1 = [(0.05 * torch.randn(rank, hidden, generator=gen)).requires_grad_() for _ in range(layers)]
    w2 = [(0.01 * torch.randn(hidden, rank, generator=gen)).requires_grad_() for _ in range(layers)]
    params = [*w1, *w2, raw_gates, alpha]

    def step(path) -> None:
        path(x, torch.sigmoid(alpha), raw_gates * 1.0, w1, w2).pow(2).sum().backward()
        for p in params:
            p.grad = None

    best = {"autograd": float("inf"), "ladder_path": float("inf")}
    for _ in range(repeats):
        for name, path in (("autograd", composed_path), ("ladder_path", ladder_path)):
            start = time.perf_counter()
            for _ in range(steps):
                step(path)
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="20,64", help="comma-separated batch sizes")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for batch in (int(b) for b in args.batch.split(",")):
        for train_mu in (False, True):
            best = step_seconds(
                batch, args.layers, args.hidden, args.rank, train_mu, args.steps, args.repeats
            )
            what = "first task (μ trains)" if train_mu else "later task"
            print(
                f"batch {batch}, {what}: autograd {best['autograd'] * 1e3:.2f} ms, "
                f"ladder_path {best['ladder_path'] * 1e3:.2f} ms per step, "
                f"{best['autograd'] / best['ladder_path']:.2f}x"
            )


if __name__ == "__main__":
    main()
