"""What a checkpoint costs the server: seconds per round and bytes on disk, and resume time.

    python benchmarks/checkpoint_cost.py --tasks 4 --devices 8 --per-device 25

A :class:`~strategies.pae.PAEStrategy` built as a run builds it (default settings, one server
epoch) receives, for each task in turn, one training reply per device with random activations
of SmolLM2-135M's shape (30 layers × 576, fp16) and trains; after each round it checkpoints
twice: the first checkpoint writes the round's new cache blocks, the second only ``state.pt``.
No backbone, no Flower simulation: only the server's side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from flower_pae.config import RunConfig
from flower_pae.wire import BASIS, CONFIG, UPLOAD, array_record, ids_to_array
from simulations.server_app import build_strategy


def replies(task: str, devices: int, per_device: int, layers: int, hidden: int) -> list[Message]:
    """One upload per device of ``per_device`` new samples of ``task``."""
    rng = np.random.default_rng(abs(hash(task)) % 2**32)
    out = []
    for node in range(1, devices + 1):
        ids = [f"{node:03d}-{task[-2:]}-{i:09d}".encode() for i in range(per_device)]
        arrays = {
            "ids": ids_to_array(ids),
            "acts": rng.standard_normal((per_device, layers, hidden)).astype(np.float16),
            "targets": rng.standard_normal((per_device, hidden)).astype(np.float32),
        }
        content = RecordDict(
            {
                UPLOAD: array_record(arrays),
                CONFIG: ConfigRecord({"task_key": task}),
                BASIS: array_record({"basis": np.eye(hidden, dtype=np.float32)}),  # C = d
            }
        )
        meta = Metadata(1, f"m{node}", node, 0, "q", "", 0.0, 60.0, "train")
        out.append(Message(content, metadata=meta))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--per-device", type=int, default=25, help="samples per device and task")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        strategy = build_strategy(RunConfig(server_epochs=1), out)
        for server_round in range(1, args.tasks + 1):
            task = f"{server_round:016x}"
            strategy.aggregate_train(
                server_round,
                replies(task, args.devices, args.per_device, args.layers, args.hidden),
            )
            strategy.completed_rounds = server_round
            seconds = []
            for _ in range(2):
                start = time.perf_counter()
                strategy.save_checkpoint()
                seconds.append(time.perf_counter() - start)
            ckpt = out / "checkpoint"
            total = sum(f.stat().st_size for f in ckpt.iterdir())
            print(
                f"round {server_round}: {len(strategy.cache)} samples cached; checkpoint with the "
                f"new blocks {seconds[0]:.2f}s, state only {seconds[1]:.2f}s; state.pt "
                f"{(ckpt / 'state.pt').stat().st_size / 2**20:.1f} MiB, checkpoint directory "
                f"{total / 2**20:.1f} MiB",
                flush=True,
            )
        start = time.perf_counter()
        build_strategy(RunConfig(server_epochs=1, resume=True), out).resume()
        print(f"resume: {time.perf_counter() - start:.2f}s")


if __name__ == "__main__":
    main()
