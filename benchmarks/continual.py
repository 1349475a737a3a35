"""Continual-learning benchmark: the three standard-CL orders × side-network methods.

Every method sees the same devices, task stream and training rows (same seed). Backbone
forwards are shared through the activation store, so only the first run pays for them.

    python benchmarks/continual.py --data-dir ../shared/data/cl_benchmark --out runs/cl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from analysis import cl_table, load_run
from flower_pae.config import RunConfig
from simulations.cli import simulate

ORDERS = ("cl_order1", "cl_order2", "cl_order3")
METHODS = ("sequential", "olora", "oa", "multitask", "oracle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="runs/cl")
    parser.add_argument("--orders", nargs="+", default=list(ORDERS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    base = [
        "num_devices=8",
        "max_train=200",
        "max_test=100",
        "rounds_per_task=2",
        "server_epochs=10",
        # OA's gates must be able to travel from 1 to the threshold within one task's 80 server
        # steps (2 rounds x 10 epochs x 4 batches of 64): an Adam step of 1/80
        "gate_lr=0.0125",
        f"data_dir={Path(args.data_dir).resolve()}",
        *args.set,
    ]
    runs = []
    for order in args.orders:
        for method in args.methods:
            cfg = RunConfig.load(None, [*base, f"stream={order}", f"method={method}"])
            start = time.perf_counter()
            simulate(cfg, out / f"{order}-{method}")
            print(f"{order} {method}: {time.perf_counter() - start:.0f}s", flush=True)
            runs.append(load_run(out / f"{order}-{method}"))
    table = cl_table(runs)
    table.insert(0, "order", [r.name.rsplit("-", 1)[0] for r in runs])
    print(table.to_string())
    table.to_csv(out / "cl_table.csv")
    means = table.groupby("method")[["AA", "BWT", "FWT", "active_params"]].mean()
    print(means.to_string())
    (out / "cl_means.json").write_text(json.dumps(means.to_dict(orient="index"), indent=2))


if __name__ == "__main__":
    main()
