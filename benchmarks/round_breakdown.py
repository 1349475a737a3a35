"""Where a steady round goes, per run of a scale study (``flower-pae scale --out DIR``).

Medians over rounds ≥ 2 (round 1 starts the actors): the round's wall time, the server's
training time, and each phase's device-call latency (``analysis.call_latency``: a reply's
``created_at`` minus its request's). Reads only the run directories.

    python benchmarks/round_breakdown.py runs/scale-issue4-fifth-final
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis import call_latency, load_run


def breakdown(run_dir: Path) -> str:
    run = load_run(run_dir)
    metrics = run.metrics[run.metrics["round"] >= 2]
    rounds = metrics[metrics["metric"] == "round_seconds"]["value"]
    line = f"{run_dir.name:14s} round {rounds.median():.3f} s"
    training = metrics[metrics["metric"] == "train_seconds"].groupby("round")["value"].sum()
    if len(training):
        line += f"  server training {training.median():.3f} s"
    latency = call_latency(run)
    latency = latency[latency["round"] >= 2]
    for phase in ("train", "evaluate"):
        seconds = latency[latency["phase"] == phase]["seconds"]
        if len(seconds):
            line += f"  {phase} call {seconds.median():.3f} s (p90 {seconds.quantile(0.9):.3f})"
    return line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", type=Path, help="a scale study's --out directory")
    args = p.parse_args(argv)
    for run_dir in sorted((args.study / "runs").iterdir()):
        if run_dir.is_dir():
            print(breakdown(run_dir))


if __name__ == "__main__":
    main()
