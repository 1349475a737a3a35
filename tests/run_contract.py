"""The run-directory contract of DESIGN.md, checked the same way for every runtime; and the
baselines' small run (``baseline_cfg`` and ``baseline_run`` in ``conftest.py``) with the
helpers their tests share."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

# The baselines' small run: tiny model, DEVICES devices, ROUNDS rounds of one task, every
# message dumped; with each method's own settings.
STREAM = "pypi:bbc"
DEVICES, ROUNDS = 3, 2
SMALL_RUN = dict(
    stream=STREAM,
    num_devices=DEVICES,
    max_train=24,
    max_test=12,
    max_tokens=32,
    rounds_per_task=ROUNDS,
    record_wire=True,
)
BASELINE_SETTINGS = {
    "fedavg_lora": {"lora_lr": 1e-2},
    "split_lora": {"split_layer": 1, "lora_lr": 1e-2},
    "mobillm": {"lr": 1e-2},
}

MESSAGE_COLUMNS = {
    "round",
    "phase",
    "node_id",
    "direction",
    "task_key",
    "payload_bytes",
    "num_samples",
    "created_at",
}


def assert_run_directory(run_dir: Path, *, num_tasks: int, num_devices: int) -> dict:
    """Assert the files, tables and summary every run writes; return the summary."""
    for name in ("messages.parquet", "metrics.parquet", "config.json", "summary.json"):
        assert (run_dir / name).is_file(), name
    messages = pd.read_parquet(run_dir / "messages.parquet")
    assert set(messages.columns) >= MESSAGE_COLUMNS
    assert set(messages["direction"]) == {"down", "up"}
    assert set(messages["phase"]) == {"train", "evaluate"}
    assert (messages["payload_bytes"] > 0).all()
    assert messages["node_id"].nunique() == num_devices
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert list(metrics.columns) == ["round", "task", "node_id", "metric", "value"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["task_keys"]) == num_tasks
    matrix = np.array(summary["accuracy_matrix"], dtype=float)
    assert matrix.shape == (num_tasks, num_tasks)
    assert np.isfinite(np.diag(matrix)).all()
    settings = json.loads((run_dir / "config.json").read_text())["settings"]
    assert settings["num_devices"] == num_devices
    return summary


def assert_recorded_bytes(run_dir: Path) -> None:
    """Each ``messages.parquet`` row is one dumped message (same order, round, phase and
    direction), and its ``payload_bytes`` is what Flower serializes for it, re-measured."""
    from flower_pae.wire import message_bytes

    messages = pd.read_parquet(run_dir / "messages.parquet")
    dumps = sorted((run_dir / "wire").glob("*.pb"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    assert len(dumps) == len(messages)
    for (_, row), path in zip(messages.iterrows(), dumps, strict=True):
        msg = message_from_proto(ProtoMessage.FromString(path.read_bytes()))
        assert message_bytes(msg) == row["payload_bytes"], path.name
        assert msg.metadata.created_at == row["created_at"], path.name
        assert path.name.startswith(f"{row['round']:04d}-{row['phase']}-{row['direction']}-")


def assert_forward_flops(run_dir: Path, params: int) -> None:
    """Each device reported, every round, the FLOPs of a forward through ``params`` projection
    weights over its tokens, and positive seconds, peak memory and evaluation cost."""
    from flower_pae.device.cost import forward_flops

    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    per_node = metrics[metrics["node_id"].notna()]
    tokens = per_node[per_node["metric"] == "tokens"].set_index(["round", "node_id"])["value"]
    flops = per_node[per_node["metric"] == "flops"].set_index(["round", "node_id"])["value"]
    assert len(flops) == ROUNDS * DEVICES
    pd.testing.assert_series_equal(
        flops, tokens.map(lambda t: forward_flops(params, int(t))), check_names=False
    )
    for name in ("forward_seconds", "peak_rss_mb", "eval_seconds", "eval_flops"):
        rows = per_node[per_node["metric"] == name]
        assert len(rows) == ROUNDS * DEVICES and (rows["value"] > 0).all(), name


def assert_analysis_reads(run_dir: Path, method: str) -> None:
    """``analysis`` loads the run: its method, and the devices' seconds and FLOPs that
    ``summary.json`` reports."""
    from analysis import device_cost, load_run, overview

    run = load_run(run_dir)
    assert overview([run]).loc[run.name, "method"] == method
    summary = json.loads((run_dir / "summary.json").read_text())
    cost = device_cost(run).loc[run.name]
    assert cost["forward_seconds_total"] == pytest.approx(summary["device_cost"]["forward_seconds"])
    assert cost["flops_total"] == pytest.approx(summary["device_cost"]["train_flops"])


def wire_messages(
    run_dir: Path, phase: str, direction: str, server_round: int | None = None
) -> Iterator[tuple[str, bytes, Message]]:
    """The messages a run with ``record_wire`` dumped, as Flower serialized them (name, bytes,
    deserialized), of one phase and direction, and of one round if given."""
    prefix = "*" if server_round is None else f"{server_round:04d}"
    for path in sorted((run_dir / "wire").glob(f"{prefix}-{phase}-{direction}-*.pb")):
        raw = path.read_bytes()
        yield path.name, raw, message_from_proto(ProtoMessage.FromString(raw))


def round_messages(run_dir: Path, server_round: int, phase: str, direction: str) -> list[Message]:
    """The dumped messages of one round, phase and direction (:func:`wire_messages`)."""
    return [m for _, _, m in wire_messages(run_dir, phase, direction, server_round)]


def states_reply(arrays: dict[str, np.ndarray], words: tuple[str, ...] = ("a", "b")) -> Message:
    """A device's states reply (split learning, MobiLLM), as the server receives it."""
    from flower_pae.wire import array_record
    from strategies.baseline import CONFIG, METRICS, STATES

    content = RecordDict(
        {
            STATES: array_record(arrays),
            METRICS: MetricRecord({"num-examples": len(arrays["lengths"])}),
            CONFIG: ConfigRecord({"task_key": "0123456789abcdef", "label_words": list(words)}),
        }
    )
    return Message(content, metadata=Metadata(1, "m", 7, 0, "q", "", 0.0, 60.0, "train"))


def download_payload_bytes(
    state: dict, matrices: Iterable[str], halved: Iterable[str], precision: str
) -> int:
    """Bytes of a side network's entries as ``wire.side_network_records`` packs them: the
    matrices in ``precision`` (int8 with a float16 scale per row), the ``halved`` entries as
    float16 unless fp32, everything else as float32."""
    matrices, halved = list(matrices), list(halved)
    weights = sum(state[n].numel() for n in matrices)
    rows = sum(state[n].shape[0] for n in matrices)
    halves = sum(state[n].numel() for n in halved)
    floats = sum(v.numel() for v in state.values()) - weights - halves
    return {
        "fp32": 4 * (floats + weights + halves),
        "fp16": 4 * floats + 2 * (weights + halves),
        "int8": 4 * floats + weights + 2 * rows + 2 * halves,
    }[precision]


# figures that measure time or memory, not what a run computed
TIMING = {"round_seconds", "train_seconds", "forward_seconds", "peak_rss_mb"}


def _sorted(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows in a canonical order: replies are recorded in the order they arrive."""
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def assert_same_run(expected: Path, got: Path) -> None:
    """Two run directories of the same settings and seed computed the same: summary, recorded
    messages and (non-timing) metrics, and the final checkpoint's side network bitwise.

    Byte counts may differ by 2 per message: Flower draws each simulation's run id at random
    and every message carries it as a varint.
    """
    import torch

    from flower_pae.server.checkpoint import load_state

    summary = json.loads((expected / "summary.json").read_text())
    other = json.loads((got / "summary.json").read_text())
    bytes_expected, bytes_got = summary.pop("bytes"), other.pop("bytes")
    assert other == summary
    messages = [
        _sorted(pd.read_parquet(d / "messages.parquet"), ["round", "phase", "direction", "node_id"])
        for d in (expected, got)
    ]
    assert len(messages[0]) == len(messages[1]) > 0
    assert (messages[0]["payload_bytes"] - messages[1]["payload_bytes"]).abs().max() <= 2
    for key, value in bytes_expected.items():
        assert abs(bytes_got[key] - value) <= 2 * len(messages[0])
    same = ["round", "phase", "direction", "node_id", "task_key", "num_samples", "ok"]
    pd.testing.assert_frame_equal(messages[0][same], messages[1][same])
    metrics = [pd.read_parquet(d / "metrics.parquet") for d in (expected, got)]
    metrics = [
        _sorted(m[~m.metric.isin(TIMING)], ["round", "metric", "task", "node_id"]) for m in metrics
    ]
    pd.testing.assert_frame_equal(metrics[0], metrics[1])
    # bitwise: the server trains on one thread, takes replies in node order, and the devices'
    # features come from the activation store
    (_, reference), (_, weights) = (
        load_state(expected / "checkpoint"),
        load_state(got / "checkpoint"),
    )
    assert weights["net"].keys() == reference["net"].keys()
    for name, value in reference["net"].items():
        torch.testing.assert_close(weights["net"][name], value, rtol=0, atol=0, msg=name)
