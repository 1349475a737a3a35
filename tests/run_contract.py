"""The run-directory contract of DESIGN.md, checked the same way for every runtime."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import Message
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

MESSAGE_COLUMNS = {
    "round",
    "phase",
    "node_id",
    "direction",
    "task_key",
    "payload_bytes",
    "num_samples",
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
        assert path.name.startswith(f"{row['round']:04d}-{row['phase']}-{row['direction']}-")


def wire_messages(
    run_dir: Path, phase: str, direction: str, server_round: int | None = None
) -> Iterator[tuple[str, bytes, Message]]:
    """The messages a run with ``record_wire`` dumped, as Flower serialized them (name, bytes,
    deserialized), of one phase and direction, and of one round if given."""
    prefix = "*" if server_round is None else f"{server_round:04d}"
    for path in sorted((run_dir / "wire").glob(f"{prefix}-{phase}-{direction}-*.pb")):
        raw = path.read_bytes()
        yield path.name, raw, message_from_proto(ProtoMessage.FromString(raw))
