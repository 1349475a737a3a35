"""Time what a Ray actor does per device call of the scale study, with a warm store.

One process stands for one actor: each round, 5 devices it has not met upload their new
samples and 5 others evaluate the round's side network (2 tasks, the study's 30 × 576 shape,
new weights every round, rebuilt through the ClientApp's per-process cache). The devices'
backbone outputs come from the activation store, so warm it first (``flower-pae scale`` with
the same settings, or one run of this script). Flower and Ray are left out: this is the
ClientApp's own work. To compare two versions of the code, run it from each checkout
(``PYTHONPATH=<checkout>``) alternately in one session.

    FLOWER_PAE_CACHE=/tmp/fp-cache-issue4 python benchmarks/device_calls.py --devices 100
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from flower_pae.config import RunConfig
from flower_pae.device.device import Device
from flower_pae.side_network import LadderSideNetwork
from flower_pae.wire import side_network_records
from simulations import client_app
from simulations.scale import study_config


def downloads(rounds: range, layers: int, hidden: int) -> dict[int, object]:
    """The evaluation download of each round: a 2-task network whose weights change."""
    net = LadderSideNetwork(layers, hidden, out_rank=16, seed=0)
    net.add_task("first")
    net.add_task("second")
    net.fit_standardizer(torch.randn(8, layers, hidden))
    matrices = {name for name, p in net.named_parameters() if p.ndim >= 2}
    out = {}
    for server_round in rounds:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1e-3)
        state = net.state_dict()
        out[server_round] = side_network_records(
            net.meta(), state, matrices, "fp16", halved=("input_mean", "input_std")
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=100, help="N of the study's population")
    p.add_argument("--rounds", type=int, default=16, help="timed rounds (after 2 untimed)")
    p.add_argument("--per-round", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = RunConfig.from_dict({"stream": "pypi:r8,pypi:rotten_tomatoes"})
    cfg = study_config(base, args.devices, 20, args.per_round, 2, 1)
    first = Device(cfg, 0)
    first.upload(1, set())  # loads what an actor loads once
    rounds = range(2, 2 + 2 + args.rounds)
    packs = downloads(rounds, first.backbone.num_layers, first.backbone.hidden_size)
    rng = random.Random(0)

    def one_round(server_round: int) -> None:
        for pid in rng.sample(range(cfg.num_devices), args.per_round):
            Device(cfg, pid).upload(server_round, set())
        for pid in rng.sample(range(cfg.num_devices), args.per_round):
            net = client_app._side_network(packs[server_round])
            Device(cfg, pid).evaluate(server_round, net, {})

    for server_round in rounds[:2]:
        one_round(server_round)
    start = time.perf_counter()
    for server_round in rounds[2:]:
        one_round(server_round)
    calls = 2 * args.per_round * args.rounds
    per_call = (time.perf_counter() - start) / calls
    print(f"N = {args.devices}: {per_call * 1000:.1f} ms per device call ({calls} calls)")


if __name__ == "__main__":
    main()
