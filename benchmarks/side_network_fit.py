"""Time one server training pass (``SideNetworkTrainer.fit``) of the 30-layer side network.

The scale study's server trains 10 epochs over a small cache every round; this times that
fit for networks with 1, 2 and 5 tasks (the later ones train beside frozen earlier tasks),
best of several repeats, one torch thread as the server runs. To compare two versions of
the code, run it against each (``PYTHONPATH=<checkout>``) alternately in one session.

    python benchmarks/side_network_fit.py --samples 20 --tasks 1,2,5
    python benchmarks/side_network_fit.py --parts --tasks 1,2   # where one step goes
"""

from __future__ import annotations

import argparse
import time

import torch

from flower_pae.side_network import LadderSideNetwork, SideNetworkTrainer, TrainerConfig


def trained(tasks: int, samples: int, layers: int, hidden: int):
    """A network fitted on ``tasks`` tasks (the last one open), its trainer and data."""
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(samples, layers, hidden, generator=gen)
    targets = 0.1 * torch.randn(samples, hidden, generator=gen)
    net = LadderSideNetwork(layers, hidden, out_rank=16)
    trainer = SideNetworkTrainer(net, TrainerConfig(epochs=10, batch_size=64))
    for k in range(tasks):
        net.add_task(f"task-{k}")  # freezes the one before
        trainer.fit(acts, targets)
    return net, trainer, acts, targets


def best_seconds(fn, repeats: int, calls: int = 1) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return min(times)


def fit_seconds(tasks: int, samples: int, layers: int, hidden: int, repeats: int) -> float:
    """Best wall time of a 10-epoch fit on the last of ``tasks`` tasks."""
    _, trainer, acts, targets = trained(tasks, samples, layers, hidden)
    return best_seconds(lambda: trainer.fit(acts, targets), repeats)


def step_parts(tasks: int, layers: int, hidden: int, repeats: int) -> dict[str, float]:
    """Best seconds of one training step's parts, on one batch of 64: the side output's forward
    and backward, the penalties' forward and backward, and the optimizers' step."""
    net, trainer, acts, targets = trained(tasks, 64, layers, hidden)
    x, optimizers = net.standardize(acts), trainer._ensure_optimizers()
    skip = bool(net.constant_sets())

    def output() -> None:
        net.zero_grad()
        (net.side_output(x, skip_constant=skip) - targets).pow(2).sum(1).mean().backward()

    def penalties() -> None:
        net.zero_grad()
        penalty = net.orthogonality_penalty() + net.sparsity_penalty()
        if penalty.requires_grad:
            penalty.backward()

    def step() -> None:
        for opt in optimizers:
            opt.step()

    output()  # every trainable parameter has a gradient for the optimizers' step
    return {
        name: best_seconds(fn, repeats, calls=20)
        for name, fn in (("optimizers", step), ("output", output), ("penalties", penalties))
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20, help="cached samples (one batch)")
    p.add_argument("--tasks", default="1,2,5", help="comma-separated task counts")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--parts", action="store_true", help="time one step's parts instead")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.parts:
        for tasks in (int(t) for t in args.tasks.split(",")):
            parts = step_parts(tasks, args.layers, args.hidden, args.repeats)
            print(
                f"{tasks} task(s), batch 64: "
                + ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in parts.items())
            )
        return
    for tasks in (int(t) for t in args.tasks.split(",")):
        seconds = fit_seconds(tasks, args.samples, args.layers, args.hidden, args.repeats)
        print(f"{tasks} task(s): {seconds * 1e3:.0f} ms per 10-epoch fit")


if __name__ == "__main__":
    main()
