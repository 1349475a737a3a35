"""Choose MobiLLM's side-network step size on a validation split of the training rows.

    python benchmarks/mobillm_validation.py --data-dir ../shared/data/cl_benchmark \
        --task agnews --lrs 1e-4,3e-4,1e-3,3e-3 --rounds 3 --out runs/mobillm-val.json

As ``benchmarks/fedavg_lora_validation.py``: the task's ``train.json`` alone is exposed as a
CL_Benchmark folder, so the loader carves the "test" split out of the training rows (seeded,
per class): those are the validation rows; test rows are never read. The simulation's own
device and server code runs in this process (:class:`flower_pae.baselines.mobillm.MobiLLMDevice`
on the same shards, prompts and layers; :class:`~flower_pae.baselines.mobillm.SideServer`
with the same mini-batches and shuffling). The devices' states do not change between rounds
(frozen backbone, no dropout), so they are computed once and every learning rate trains on
the same uploads: ``rounds`` rounds of ``local_epochs`` epochs, validation accuracy after each.
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path

import torch
from fedavg_lora_validation import validation_dir  # this folder: run as a script

from flower_pae.baselines.mobillm import MobiLLMDevice, SideServer
from flower_pae.config import RunConfig
from flower_pae.device.secret import CohortSecret


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CL_Benchmark directory")
    p.add_argument("--task", default="agnews", help="task folder name")
    p.add_argument("--model", default=RunConfig().model, help="backbone")
    p.add_argument("--layers", default="all", help="the layers setting")
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3", help="comma-separated lr values")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--max-train", type=int, default=600)
    p.add_argument("--max-val", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (as server_threads)")
    p.add_argument(
        "--states", default=None, help="pickle file: reuse the devices' uploads (else written)"
    )
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    secret = CohortSecret.from_hex("ab" * 32)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mobillm-val-") as tmp:
        root = validation_dir(Path(args.data_dir), args.task, Path(tmp))
        cfg = RunConfig(
            method="mobillm",
            model=args.model,
            stream=f"cl:{args.task}",
            data_dir=str(root),
            layers=args.layers,
            num_devices=args.devices,
            max_train=args.max_train,
            max_test=args.max_val,
            rounds_per_task=args.rounds,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        cache = Path(args.states) if args.states else None
        start = time.perf_counter()
        if cache is not None and cache.is_file():
            train, val, labels = pickle.loads(cache.read_bytes())
        else:
            devices = [MobiLLMDevice(cfg, pid, secret) for pid in range(cfg.num_devices)]
            train = [d.train_upload(1) for d in devices]
            val = [d.eval_upload(1) for d in devices]
            labels = [d._labels(0, "test") for d in devices]
            if cache is not None:
                cache.write_bytes(pickle.dumps((train, val, labels), protocol=5))
        forward = time.perf_counter() - start
    print(json.dumps({"forward_seconds": forward, "train": sum(u.num_samples for u in train)}))

    def accuracy(server: SideServer) -> float:
        correct = sum(
            int((server.logits(u, cfg.batch_size)[0].argmax(-1) == y).sum())
            for u, y in zip(val, labels, strict=True)
        )
        return correct / sum(len(y) for y in labels)

    zero_shot = accuracy(SideServer(cfg.model, cfg.layers, 1e-3, cfg.seed))  # untrained
    results = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        server = SideServer(cfg.model, cfg.layers, lr, cfg.seed)
        history = []
        for server_round in range(1, args.rounds + 1):
            loss, seconds, _ = server.train(train, cfg.local_epochs, cfg.batch_size, server_round)
            row = {
                "round": server_round,
                "val_accuracy": accuracy(server),
                "train_loss": loss,
                "seconds": seconds,
            }
            print(json.dumps({"lr": lr, **row}), flush=True)
            history.append(row)
        results.append({"lr": lr, "history": history})
    best = max(results, key=lambda r: r["history"][-1]["val_accuracy"])
    print(f"zero-shot on validation: {zero_shot:.4f}; best lr on validation: {best['lr']}")
    if args.out:
        out = {"args": vars(args), "zero_shot": zero_shot, "results": results}
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
