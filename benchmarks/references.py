"""Reference baselines for one task (or several, trained jointly): zero-shot, LoRA, step cost.

    python benchmarks/references.py --task cl:agnews --data-dir ../shared/data/cl_benchmark \
        --max-train 600 --max-test 600 --out results/refs-agnews.json

Prints and writes one JSON object:

- ``zero_shot``: accuracy of the frozen backbone's ``argmax z`` on each task's test rows;
- ``lora``: centralized LoRA (peft, r=8 on q/v by default) trained with cross-entropy on the
  same label logits ``z = h·W_tᵀ`` the device uses, validation accuracy per epoch on a seeded
  split of the training rows, test accuracy at the end, seconds per training sample, peak RSS
  and trainable parameters;
- ``device_step``: PAE's device step (inference-mode forward keeping the pivot states) against a
  LoRA training step, per sample and in peak memory, each measured in its own child process.

LoRA runs first so that its ``peak_rss_mb`` (this process's ``ru_maxrss``) does not include the
cached frozen backbone that zero-shot loads afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from flower_pae.backbone import DEFAULT_MODEL, load_backbone
from flower_pae.data import load_task
from flower_pae.device.shortcut import build_prompt
from flower_pae.references import device_step_cost, train_lora, zero_shot_accuracy


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--task",
        action="append",
        required=True,
        help="task spec (cl:NAME, pypi:NAME, hf:...); repeat to train LoRA jointly",
    )
    p.add_argument("--data-dir", default=None, help="CL_Benchmark directory for cl: tasks")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-train", type=int, default=600)
    p.add_argument("--max-test", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument(
        "--cost-samples",
        type=int,
        default=32,
        help="training prompts timed per phase in the device-step comparison",
    )
    p.add_argument("--skip-lora", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="write the JSON here (directories are created)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    t0 = time.perf_counter()
    tasks = [
        load_task(
            spec,
            data_dir=args.data_dir,
            seed=args.seed,
            max_train=args.max_train,
            max_test=args.max_test,
        )
        for spec in args.task
    ]
    targets = tuple(x.strip() for x in args.lora_targets.split(",") if x.strip())
    result: dict = {
        "config": {**vars(args), "lora_targets": list(targets)},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
        "tasks": {
            t.name: {"labels": t.labels, "train": len(t.train), "test": len(t.test)} for t in tasks
        },
    }

    if not args.skip_lora:
        t = time.perf_counter()
        lora = train_lora(
            args.model,
            tasks,
            r=args.lora_r,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            target_modules=targets,
            lr=args.lr,
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            seed=args.seed,
            val_fraction=args.val_fraction,
            progress=not args.no_progress,
        )
        result["lora"] = {**lora.to_dict(), "wall_seconds": time.perf_counter() - t}

    t = time.perf_counter()
    backbone = load_backbone(args.model)
    result["zero_shot"] = {
        task.name: zero_shot_accuracy(
            backbone, task, max_tokens=args.max_tokens, batch_size=args.batch_size
        )
        for task in tasks
    }
    result["zero_shot_wall_seconds"] = time.perf_counter() - t

    if not args.skip_cost:
        t = time.perf_counter()
        task = tasks[0]
        rows = task.train[: args.cost_samples]
        prompts = [build_prompt(backbone, task, ex.text, args.max_tokens) for ex in rows]
        cost = device_step_cost(
            args.model,
            prompts,
            labels=[ex.label for ex in rows],
            label_words=task.labels,
            batch_size=args.batch_size,
            r=args.lora_r,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            target_modules=targets,
            lr=args.lr,
            seed=args.seed,
        )
        result["device_step"] = {
            **cost.to_dict(),
            "task": task.name,
            "wall_seconds": time.perf_counter() - t,
        }

    result["wall_seconds"] = time.perf_counter() - t0
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
