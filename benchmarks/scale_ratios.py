"""The scalability goals' ratios, read back from ``flower-pae scale`` study directories.

For each study: PAE's cost per device call over the empty ClientApp's (``--empty``), all
rounds and rounds ≥ 2, with the steady round of each; and, for ``--warmup`` studies, the
cold-store run's wall time over its unique backbone forwards plus its server training.

    python benchmarks/scale_ratios.py runs/scale-issue4-sixth runs/scale-cold-sixth
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from simulations.scale import cold_ratios, floor_ratios


def report(study: Path) -> str:
    """The ratios of one study directory, as text."""
    frame = pd.read_parquet(study / "scale.parquet")
    lines = [str(study)]
    steady = frame.set_index(["mode", "num_devices"])["seconds_per_round_steady"]
    for n, row in floor_ratios(frame).iterrows():
        lines.append(
            f"  N={n}: PAE {row['pae_seconds_per_call']:.3f} s per call, steady round "
            f"{steady[('pae', n)]:.3f} s; empty {row['empty_seconds_per_call']:.3f} s, "
            f"{steady[('empty', n)]:.3f} s; ratio {row['ratio']:.2f}× all rounds, "
            f"{row['ratio_steady']:.2f}× rounds ≥ 2"
        )
    for n, row in cold_ratios(frame).iterrows():
        lines.append(
            f"  N={n} cold store: {row['wall_seconds']:.1f} s wall, "
            f"{int(row['store_new_entries'])} forwards {row['store_forward_seconds']:.1f} s, "
            f"training {row['server_train_seconds']:.1f} s: {row['ratio']:.2f}×"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("studies", nargs="+", type=Path, help="study directories (scale.parquet)")
    for study in p.parse_args(argv).studies:
        print(report(study))


if __name__ == "__main__":
    main()
