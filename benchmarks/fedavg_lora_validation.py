"""Choose FedAvg + LoRA's step size on a validation split of the training rows, never on test.

    python benchmarks/fedavg_lora_validation.py --data-dir ../shared/data/cl_benchmark \
        --task agnews --lrs 5e-4,2e-3 --rounds 3 --out runs/fedavg-lora-val.json

The task's ``train.json`` alone is exposed as a CL_Benchmark folder, so the loader carves the
"test" split out of the training rows (seeded, per class): those are the validation rows.
FedAvg runs in this process over the simulation's own device code
(:class:`flower_pae.baselines.fedavg_lora.LoRADevice`: same shards, prompts, loss and local
training as the ClientApp) with the example-weighted mean of the adapters as the server's
step; the validation accuracy after every round is printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from flower_pae.baselines.fedavg_lora import LoRADevice, initial_adapter
from flower_pae.config import RunConfig
from flower_pae.device.secret import CohortSecret


def validation_dir(data_dir: Path, task: str, root: Path) -> Path:
    """A CL_Benchmark directory whose ``task`` has only its training file (links)."""
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("labels.json", "train.json"):
        link = folder / name
        if not link.exists():
            link.symlink_to((data_dir / task / name).resolve())
    return root


def weighted_mean(adapters: list[dict[str, np.ndarray]], weights: list[int]) -> dict:
    """FedAvg's aggregate: the example-weighted mean of the devices' adapters."""
    total = float(sum(weights))
    return {
        k: sum(w / total * a[k] for a, w in zip(adapters, weights, strict=True))
        for k in adapters[0]
    }


def run(cfg: RunConfig, rounds: int) -> list[dict]:
    """FedAvg for ``rounds`` rounds; validation accuracy and mean train loss after each."""
    secret = CohortSecret.from_hex("ab" * 32)
    devices = [LoRADevice(cfg, pid, secret) for pid in range(cfg.num_devices)]
    zero_shot: list[dict[str, int]] = [{} for _ in devices]  # computed once per device
    adapter = initial_adapter(cfg)
    history = []
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        results = [d.train(server_round, adapter) for d in devices]
        adapter = weighted_mean([r.adapter for r in results], [r.num_examples for r in results])
        correct = total = 0
        for device, known in zip(devices, zero_shot, strict=True):
            for t in device.evaluate(server_round, adapter, known).tasks:
                correct, total = correct + t.correct, total + t.total
        row = {
            "round": server_round,
            "val_accuracy": correct / total,
            "train_loss": float(
                np.average([r.loss for r in results], weights=[r.num_examples for r in results])
            ),
            "seconds": time.perf_counter() - start,
        }
        print(json.dumps({"lora_lr": cfg.lora_lr, **row}), flush=True)
        history.append(row)
    return history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CL_Benchmark directory")
    p.add_argument("--task", default="agnews", help="task folder name")
    p.add_argument("--model", default=RunConfig().model, help="backbone")
    p.add_argument("--lrs", default="5e-4,2e-3", help="comma-separated lora_lr values")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--max-train", type=int, default=600)
    p.add_argument("--max-val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedavg-lora-val-") as tmp:
        root = validation_dir(Path(args.data_dir), args.task, Path(tmp))
        for lr in [float(x) for x in args.lrs.split(",")]:
            cfg = RunConfig(
                method="fedavg_lora",
                model=args.model,
                stream=f"cl:{args.task}",
                data_dir=str(root),
                num_devices=args.devices,
                max_train=args.max_train,
                max_test=args.max_val,
                rounds_per_task=args.rounds,
                local_epochs=args.local_epochs,
                lora_lr=lr,
                seed=args.seed,
            )
            results.append({"lora_lr": lr, "history": run(cfg, args.rounds)})
    best = max(results, key=lambda r: r["history"][-1]["val_accuracy"])
    print(f"best lora_lr on validation: {best['lora_lr']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
