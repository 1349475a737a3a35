"""Analysis of flower-pae run directories (pandas/numpy/pyarrow/matplotlib only).

Reads only the run-output contract (``messages.parquet``, ``metrics.parquet``, ``config.json``,
``summary.json``, optional ``tasks.json``); never imports torch, flwr or ``flower_pae``.
"""

from analysis.load import Run, load_run, load_runs
from analysis.plots import (
    plot_accuracy_matrix,
    plot_accuracy_vs_bytes,
    plot_device_bytes,
    plot_rank_allocation,
    plot_traffic_per_round,
)
from analysis.report import bytes_to_reach, device_cost, overview, write_report
from analysis.tables import (
    accuracy_matrix,
    accuracy_over_rounds,
    accuracy_vs_bytes,
    bytes_table,
    call_latency,
    cl_table,
    per_device_bytes,
    rank_report,
    traffic_per_round,
    upload_bytes_per_sample,
)

__all__ = [
    "Run",
    "accuracy_matrix",
    "accuracy_over_rounds",
    "accuracy_vs_bytes",
    "bytes_table",
    "call_latency",
    "bytes_to_reach",
    "device_cost",
    "cl_table",
    "load_run",
    "load_runs",
    "overview",
    "per_device_bytes",
    "plot_accuracy_matrix",
    "plot_accuracy_vs_bytes",
    "plot_device_bytes",
    "plot_rank_allocation",
    "plot_traffic_per_round",
    "rank_report",
    "traffic_per_round",
    "upload_bytes_per_sample",
    "write_report",
]
