"""``analysis`` on a small synthetic run directory that follows the run-output contract."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis import (
    accuracy_matrix,
    accuracy_over_rounds,
    bytes_table,
    cl_table,
    load_run,
    load_runs,
    per_device_bytes,
    plot_accuracy_matrix,
    plot_accuracy_vs_bytes,
    plot_rank_allocation,
    plot_traffic_per_round,
    rank_report,
    traffic_per_round,
    upload_bytes_per_sample,
)

NODES = (11, 22)
ROUNDS = (1, 2, 3)
TASK_OF_ROUND = {1: "k0", 2: "k1", 3: "k1"}
# payload bytes per (phase, direction); train-up bytes and samples depend on the node
DOWN_TRAIN, DOWN_EVAL, UP_EVAL = 1000, 100, 10
UP_TRAIN = {11: 300, 22: 500}
SAMPLES = {11: 3, 22: 5}
ACC = {(1, "k0"): 0.5, (2, "k0"): 0.45, (2, "k1"): 0.6, (3, "k0"): 0.4, (3, "k1"): 0.7}


def _write_run(root: Path, method: str = "pae", with_names: bool = True) -> Path:
    root.mkdir(parents=True)
    msgs = []
    for r in ROUNDS:
        for n in NODES:
            msgs.append((r, "train", n, "down", None, DOWN_TRAIN, 0, True))
            msgs.append((r, "train", n, "up", TASK_OF_ROUND[r], UP_TRAIN[n], SAMPLES[n], True))
            msgs.append((r, "evaluate", n, "down", None, DOWN_EVAL, 0, True))
            msgs.append((r, "evaluate", n, "up", None, UP_EVAL, 0, n != 22 or r != 3))
    cols = [
        "round",
        "phase",
        "node_id",
        "direction",
        "task_key",
        "payload_bytes",
        "num_samples",
        "ok",
    ]
    messages = pd.DataFrame(msgs, columns=cols).astype(
        {"round": "int64", "node_id": "int64", "payload_bytes": "int64", "num_samples": "int64"}
    )
    messages.to_parquet(root / "messages.parquet", index=False)

    mets = []
    for (r, task), acc in ACC.items():
        mets.append((r, task, None, "accuracy", acc))
        for n in NODES:
            mets.append((r, task, n, "accuracy", acc + (0.05 if n == 11 else -0.05)))
        mets.append((r, task, None, "test_samples", 40.0))
    for task in ("k0", "k1"):
        mets.append((1, task, None, "zero_shot_accuracy", 0.3))
    for r in ROUNDS:
        mets.append((r, None, None, "round_seconds", 2.0))
        for n in NODES:
            mets.append((r, TASK_OF_ROUND[r], n, "train_loss", 1.0 / r))
    for task, ranks in {"k0": (4, 2, 1), "k1": (3, 3, 2)}.items():
        for layer, rank in zip(("0", "1", "out"), ranks, strict=True):
            mets.append((3, task, None, f"active_rank/{layer}", float(rank)))
            mets.append((3, task, None, f"active_params/{layer}", float(rank * 10)))
    metrics = pd.DataFrame(mets, columns=["round", "task", "node_id", "metric", "value"]).astype(
        {"round": "int64", "node_id": "UInt64", "value": "float64"}
    )
    metrics.to_parquet(root / "metrics.parquet", index=False)

    config = {
        "settings": {"method": method, "num_rounds": 3},
        "seed": 7,
        "versions": {"python": "3.11"},
    }
    (root / "config.json").write_text(json.dumps(config))
    summary = {
        "rounds": 3,
        "method": method,
        "task_keys": ["k0", "k1"],
        "task_rounds": {"k0": [1, 1], "k1": [2, 3]},
        "final_accuracy": {"k0": 0.4, "k1": 0.7},
        "zero_shot_accuracy": {"k0": 0.3, "k1": 0.3},
        "accuracy_matrix": [[0.5, None], [0.4, 0.7]],
        "average_accuracy": 0.55,
        "backward_transfer": -0.1,
        "forward_transfer": float("nan"),
        "cache": {"samples": 24},
        "rank_report": [
            {"task": task, "layer": layer, "active_rank": rank, "active_params": rank * 10}
            for task, ranks in {"k0": (4, 2, 1), "k1": (3, 3, 2)}.items()
            for layer, rank in zip((0, 1, "out"), ranks, strict=True)
        ],
        "active_params": 150,
    }
    (root / "summary.json").write_text(json.dumps(summary))
    if with_names:
        (root / "tasks.json").write_text(json.dumps({"k0": "sst2", "k1": "boolq"}))
    return root


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _write_run(tmp_path / "run-pae")


def test_load_run_round_trips(run_dir: Path) -> None:
    run = load_run(run_dir)
    assert run.name == "run-pae" and run.method == "pae"
    assert run.config["seed"] == 7 and run.summary["rounds"] == 3
    assert run.task_names == {"k0": "sst2", "k1": "boolq"}
    assert len(run.messages) == len(ROUNDS) * len(NODES) * 4
    assert list(run.messages.columns)[:4] == ["round", "phase", "node_id", "direction"]
    assert str(run.metrics["node_id"].dtype) == "UInt64"
    assert run.metrics["node_id"].isna().any()
    assert math.isnan(run.summary["forward_transfer"])


def test_identity_names_and_method_fallback(tmp_path: Path) -> None:
    root = _write_run(tmp_path / "plain", with_names=False)
    summary = json.loads((root / "summary.json").read_text())
    del summary["method"]
    (root / "summary.json").write_text(json.dumps(summary))
    run = load_run(root)
    assert run.task_names == {"k0": "k0", "k1": "k1"}
    assert run.method == "pae"  # from config settings
    assert list(accuracy_over_rounds(run).columns) == ["k0", "k1"]


def test_bytes_table(run_dir: Path) -> None:
    table = bytes_table(load_run(run_dir))
    n = len(ROUNDS) * len(NODES)
    assert table.loc[("train", "down"), "bytes"] == DOWN_TRAIN * n
    assert table.loc[("train", "up"), "bytes"] == (300 + 500) * len(ROUNDS)
    assert table.loc[("evaluate", "down"), "bytes"] == DOWN_EVAL * n
    assert table.loc[("evaluate", "up"), "bytes"] == UP_EVAL * n
    assert (table["messages"] == n).all()
    by_dir = bytes_table(load_run(run_dir), by=("direction",))
    assert by_dir.loc["up", "bytes"] == 2400 + 60
    assert by_dir["bytes"].sum() == 6000 + 2400 + 600 + 60


def test_upload_bytes_per_sample(run_dir: Path) -> None:
    # (300 + 500) bytes for (3 + 5) samples each round
    assert upload_bytes_per_sample(load_run(run_dir)) == pytest.approx(100.0)


def test_per_device_and_per_round_bytes(run_dir: Path) -> None:
    run = load_run(run_dir)
    dev = per_device_bytes(run)
    assert dev.loc[11, "up"] == (300 + 10) * 3 and dev.loc[22, "up"] == (500 + 10) * 3
    assert dev.loc[11, "down"] == (1000 + 100) * 3
    assert (dev["total"] == dev["up"] + dev["down"]).all() and (dev["messages"] == 12).all()
    per_round = traffic_per_round(run)
    assert list(per_round.index) == [1, 2, 3]
    assert (per_round["total"] == 2 * 1100 + 800 + 20).all()


def test_call_latency_needs_the_timestamps(run_dir: Path) -> None:
    """A run recorded before ``created_at`` existed has no latencies, not an error."""
    latency = analysis.call_latency(load_run(run_dir))
    assert latency.empty
    assert list(latency.columns) == [
        "round",
        "phase",
        "node_id",
        "request_at",
        "reply_at",
        "seconds",
    ]


def test_accuracy_over_rounds(run_dir: Path) -> None:
    table = accuracy_over_rounds(load_run(run_dir))
    assert list(table.columns) == ["sst2", "boolq"]
    assert list(table.index) == [1, 2, 3]
    assert table.loc[3, "boolq"] == pytest.approx(0.7)  # aggregated row, not per-device
    assert math.isnan(table.loc[1, "boolq"])


def test_accuracy_matrix(run_dir: Path) -> None:
    table = accuracy_matrix(load_run(run_dir))
    assert list(table.index) == ["after sst2", "after boolq"]
    assert list(table.columns) == ["sst2", "boolq"]
    assert table.loc["after boolq", "sst2"] == pytest.approx(0.4)
    assert table.loc["after boolq", "boolq"] == pytest.approx(0.7)
    assert np.isnan(table.loc["after sst2", "boolq"])


def test_cl_table(tmp_path: Path) -> None:
    runs = load_runs([_write_run(tmp_path / "a", "pae"), _write_run(tmp_path / "b", "fedavg")])
    table = cl_table(runs)
    assert list(table.index) == ["a", "b"]
    assert list(table.columns) == ["method", "AA", "BWT", "FWT", "active_params"]
    assert list(table["method"]) == ["pae", "fedavg"]
    assert table.loc["a", "AA"] == pytest.approx(0.55)
    assert table.loc["a", "BWT"] == pytest.approx(-0.1)
    assert math.isnan(table.loc["a", "FWT"])
    assert table.loc["b", "active_params"] == 150


def test_rank_report_summary_and_metric_fallback(run_dir: Path) -> None:
    run = load_run(run_dir)
    report = rank_report(run)
    assert list(report["layer"]) == ["0", "1", "out"] * 2
    assert list(report["task"]) == ["sst2"] * 3 + ["boolq"] * 3
    assert list(report["active_rank"]) == [4, 2, 1, 3, 3, 2]
    run.summary["rank_report"] = []
    fallback = rank_report(run)
    assert list(fallback["active_rank"]) == [4, 2, 1, 3, 3, 2]
    assert list(fallback["active_params"]) == [40, 20, 10, 30, 30, 20]


def test_plots_write_png(tmp_path: Path, run_dir: Path) -> None:
    run = load_run(run_dir)
    other = load_run(_write_run(tmp_path / "run-b", "fedavg"))
    out = tmp_path / "fig"
    paths = [
        plot_accuracy_matrix(run, out / "matrix.png"),
        plot_rank_allocation(run, out / "ranks.png"),
        plot_accuracy_vs_bytes([run, other], out / "acc_bytes.png"),
        plot_traffic_per_round(run, out / "traffic.png"),
    ]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "missing", ["messages.parquet", "metrics.parquet", "config.json", "summary.json"]
)
def test_missing_file_is_named(run_dir: Path, missing: str) -> None:
    (run_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        load_run(run_dir)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_run(tmp_path / "nope")


def test_analysis_imports_only_allowed_packages() -> None:
    forbidden = {"torch", "flwr", "flower_pae"}
    allowed = {"pandas", "numpy", "pyarrow", "matplotlib", "analysis"} | set(
        sys.stdlib_module_names
    )
    files = sorted(Path(analysis.__file__).parent.glob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [] if node.level else [(node.module or "").split(".")[0]]
            else:
                continue
            for root in roots:
                assert root not in forbidden, f"{path.name} imports {root}"
                assert root in allowed, f"{path.name} imports {root}"


def test_import_does_not_load_heavy_packages() -> None:
    import subprocess

    code = (
        "import sys, analysis; heavy = {'torch', 'flwr', 'flower_pae'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    root = Path(analysis.__file__).parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
