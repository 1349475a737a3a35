"""Figures of one PAE run: accuracy, and upload bytes per sample against full-sequence uploads.

    python benchmarks/pae_report.py runs/agnews-pae

Full-sequence activations are what a device would upload without the activation shortcut:
every prompt token's hidden state at every selected layer, in the same precision, for the
same samples (token counts recomputed with the run's tokenizer and truncation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from analysis import load_run, upload_bytes_per_sample
from flower_pae.backbone import load_backbone, select_layers
from flower_pae.config import RunConfig
from flower_pae.data import load_task, resolve_stream
from flower_pae.device.shortcut import build_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    args = parser.parse_args()
    run = load_run(args.run_dir)
    cfg = RunConfig.from_dict(run.config["settings"])
    backbone = load_backbone(cfg.model)
    layers = select_layers(cfg.layers, backbone.num_layers)
    bytes_per_value = 2 if cfg.precision == "fp16" else 1
    tokens = []
    for spec in resolve_stream(cfg.stream):
        task = load_task(
            spec,
            data_dir=cfg.data_dir or None,
            seed=cfg.seed,
            max_train=cfg.max_train,
            max_test=cfg.max_test,
        )
        for ex in task.train:
            prompt = build_prompt(backbone, task, ex.text, cfg.max_tokens)
            tokens.append(len(backbone.tokenizer(prompt).input_ids))
    mean_tokens = sum(tokens) / len(tokens)
    full = mean_tokens * len(layers) * backbone.hidden_size * bytes_per_value
    shortcut = upload_bytes_per_sample(run)
    out = {
        "run": str(Path(args.run_dir).resolve()),
        "final_accuracy": {run.task_name(k): v for k, v in run.summary["final_accuracy"].items()},
        "zero_shot_accuracy": {
            run.task_name(k): v for k, v in run.summary["zero_shot_accuracy"].items()
        },
        "upload_bytes_per_sample": shortcut,
        "mean_prompt_tokens": mean_tokens,
        "full_sequence_bytes_per_sample": full,
        "reduction": full / shortcut,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
