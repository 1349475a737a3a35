"""A markdown report over one or many run directories: tables (also as CSV) and PNG plots.

    flower-pae report runs/agnews-pae runs/agnews-oneshot --out reports/agnews

Every table in the markdown is written from the same DataFrame as its CSV file beside it, so
a reader can check the prose against the numbers, and a script can reuse them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import Run
from analysis.plots import (
    plot_accuracy_matrix,
    plot_accuracy_vs_bytes,
    plot_device_bytes,
    plot_traffic_per_round,
)
from analysis.tables import (
    accuracy_matrix,
    accuracy_vs_bytes,
    bytes_table,
    per_device_bytes,
    upload_bytes_per_sample,
)


def overview(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run: method, final mean accuracy, CL metrics and traffic totals."""
    rows = []
    for run in runs:
        s = run.summary
        final = [v for v in (s.get("final_accuracy") or {}).values() if v is not None]
        msgs = run.messages
        rows.append(
            {
                "run": run.name,
                "method": run.method,
                "rounds": s.get("rounds"),
                "tasks": len(run.task_keys),
                "final_accuracy": float(np.mean(final)) if final else np.nan,
                "AA": s.get("average_accuracy", np.nan),
                "BWT": s.get("backward_transfer", np.nan),
                "bytes_up": int(msgs.loc[msgs["direction"] == "up", "payload_bytes"].sum()),
                "bytes_down": int(msgs.loc[msgs["direction"] == "down", "payload_bytes"].sum()),
                "upload_bytes_per_sample": upload_bytes_per_sample(run),
            }
        )
    frame = pd.DataFrame(rows).set_index("run")
    frame["bytes_total"] = frame["bytes_up"] + frame["bytes_down"]
    return frame.astype({"AA": float, "BWT": float})


def bytes_to_reach(runs: Sequence[Run], target: float) -> pd.DataFrame:
    """Per run: the first round whose mean accuracy reaches ``target`` and the cumulative bytes
    (both directions), device forward and compute seconds and device FLOPs spent until then;
    NaN where never reached."""
    rows = []
    for run in runs:
        curve = accuracy_vs_bytes(run).dropna(subset=["mean_accuracy"])
        hit = curve[curve["mean_accuracy"] >= target]
        row = {"run": run.name, "target": target, "round": np.nan, "bytes": np.nan}
        row["device_forward_seconds"] = np.nan
        row["device_compute_seconds"] = row["device_flops"] = np.nan
        if len(hit):
            first = int(hit.index[0])
            row.update(round=first, bytes=float(hit["cumulative_bytes"].iloc[0]))
            fwd = device_cost(run, until_round=first)
            row["device_forward_seconds"] = float(fwd["forward_seconds_total"].iloc[0])
            row["device_compute_seconds"] = float(fwd["compute_seconds_total"].iloc[0])
            row["device_flops"] = float(fwd["flops_total"].iloc[0])
        rows.append(row)
    frame = pd.DataFrame(rows).set_index("run")
    return frame.astype({"round": "Int64", "bytes": "Int64"})


def device_cost(run: Run, until_round: int | None = None) -> pd.DataFrame:
    """Device compute as the devices reported it, up to ``until_round`` (all rounds by default).

    Forward seconds (PAE's device step: sum and per device), local training seconds (methods
    that train on the device, e.g. FedAvg + LoRA), their sum as the device compute seconds,
    the devices' FLOPs estimates (metric ``flops``) and the largest peak RSS. One row, index
    run name.
    """
    m = run.metrics
    per_node = m[m["node_id"].notna()]
    if until_round is not None:
        per_node = per_node[per_node["round"] <= until_round]
    fwd = per_node[per_node["metric"] == "forward_seconds"]
    local = per_node[per_node["metric"] == "local_train_seconds"]
    flops = per_node[per_node["metric"] == "flops"]
    rss = per_node[per_node["metric"] == "peak_rss_mb"]
    devices = fwd["node_id"].nunique()
    total = float(fwd["value"].sum())
    compute = pd.concat([fwd, local])
    compute_devices = compute["node_id"].nunique()
    compute_total = float(compute["value"].sum())
    return pd.DataFrame(
        {
            "forward_seconds_total": [total],
            "forward_seconds_per_device": [total / devices if devices else np.nan],
            "local_train_seconds_total": [float(local["value"].sum())],
            "compute_seconds_total": [compute_total],
            "compute_seconds_per_device": [
                compute_total / compute_devices if compute_devices else np.nan
            ],
            "flops_total": [float(flops["value"].sum()) if len(flops) else np.nan],
            "peak_rss_mb_max": [float(rss["value"].max()) if len(rss) else np.nan],
        },
        index=pd.Index([run.name], name="run"),
    )


def device_distribution(run: Run) -> pd.DataFrame:
    """Distribution over devices of their total bytes (count, mean, std, min, quartiles, max)."""
    return per_device_bytes(run)[["up", "down", "total"]].describe().T


def _table(frame: pd.DataFrame, out: Path, name: str, floatfmt: str = ".4g") -> str:
    frame.to_csv(out / f"{name}.csv")
    return frame.to_markdown(floatfmt=floatfmt) + f"\n\n(`{name}.csv`)\n"


def write_report(runs: Sequence[Run], out: str | Path, target: float | None = None) -> Path:
    """Write ``report.md``, its tables as CSV and its plots as PNG into ``out``.

    Parameters
    ----------
    runs : sequence of Run
    out : str or Path
        Output directory (created).
    target : float, optional
        Accuracy for "bytes to reach"; default: 95% of the lowest final mean accuracy over the
        runs, so that every run that learned at all reaches it.
    """
    if not runs:
        raise ValueError("write_report needs at least one run")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = overview(runs)
    if target is None:
        finals = table["final_accuracy"].dropna()
        target = round(0.95 * float(finals.min()), 4) if len(finals) else 0.5
    lines = [f"# flower-pae report: {', '.join(r.name for r in runs)}", ""]
    lines += ["## Overview", "", _table(table, out, "overview")]
    lines += [f"## Bytes and device compute to reach mean accuracy {target:.3f}", ""]
    lines += [_table(bytes_to_reach(runs, target), out, "bytes_to_reach")]
    cost = pd.concat([device_cost(r) for r in runs])
    lines += ["## Device compute (as reported by the devices)", ""]
    lines += [_table(cost, out, "device_cost")]
    plot_accuracy_vs_bytes(runs, out / "accuracy_vs_bytes.png")
    lines += ["## Accuracy vs cumulative bytes", "", "![](accuracy_vs_bytes.png)", ""]
    for i, run in enumerate(runs):
        tag = f"run{i}"
        lines += [f"## {run.name}", ""]
        by_phase = bytes_table(run).reset_index()
        lines += ["Bytes by phase and direction:", "", _table(by_phase, out, f"{tag}_bytes")]
        distribution = _table(device_distribution(run), out, f"{tag}_devices", ",.0f")
        lines += ["Bytes per device:", "", distribution]
        plot_traffic_per_round(run, out / f"{tag}_traffic.png")
        plot_device_bytes(run, out / f"{tag}_devices.png")
        lines += [f"![]({tag}_traffic.png) ![]({tag}_devices.png)", ""]
        if len(run.task_keys) > 1:
            lines += ["Accuracy matrix:", "", _table(accuracy_matrix(run), out, f"{tag}_matrix")]
            plot_accuracy_matrix(run, out / f"{tag}_matrix.png")
            lines += [f"![]({tag}_matrix.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
