"""Time one server training pass (``SideNetworkTrainer.fit``) of the 30-layer side network.

The scale study's server trains 10 epochs over a small cache every round; this times that
fit for networks with 1, 2 and 5 tasks (the later ones train beside frozen earlier tasks),
best of several repeats, one torch thread as the server runs. To compare two versions of
the code, run it against each (``PYTHONPATH=<checkout>``) alternately in one session.

    python benchmarks/side_network_fit.py --samples 20 --tasks 1,2,5
"""

from __future__ import annotations

import argparse
import time

import torch

from flower_pae.side_network import LadderSideNetwork, SideNetworkTrainer, TrainerConfig


def fit_seconds(tasks: int, samples: int, layers: int, hidden: int, repeats: int) -> float:
    """Best wall time of a 10-epoch fit on the last of ``tasks`` tasks."""
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(samples, layers, hidden, generator=gen)
    targets = 0.1 * torch.randn(samples, hidden, generator=gen)
    net = LadderSideNetwork(layers, hidden, out_rank=16)
    trainer = SideNetworkTrainer(net, TrainerConfig(epochs=10, batch_size=64))
    for k in range(tasks):
        net.add_task(f"task-{k}")  # freezes the one before
        trainer.fit(acts, targets)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.fit(acts, targets)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20, help="cached samples (one batch)")
    p.add_argument("--tasks", default="1,2,5", help="comma-separated task counts")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for tasks in (int(t) for t in args.tasks.split(",")):
        seconds = fit_seconds(tasks, args.samples, args.layers, args.hidden, args.repeats)
        print(f"{tasks} task(s): {seconds * 1e3:.0f} ms per 10-epoch fit")


if __name__ == "__main__":
    main()
