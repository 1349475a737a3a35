"""The run directory: the contract that tests, benchmarks and ``analysis`` rely on.

- ``messages.parquet``: one row per Flower message, both directions, with its serialized bytes
  and when its sender built it (``created_at``: a request's and its reply's give the call's
  latency, :func:`analysis.call_latency`);
- ``metrics.parquet``: long format (round, task, node_id, metric, value);
- ``config.json``: every setting, the seed and package versions;
- ``summary.json``: final figures.
"""

from __future__ import annotations

import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from flwr.app import Message
from flwr.common.serde import message_to_proto

from flower_pae.server.checkpoint import CheckpointError
from flower_pae.wire import message_bytes

MESSAGE_COLUMNS = [
    "round",
    "phase",
    "node_id",
    "direction",
    "task_key",
    "payload_bytes",
    "num_samples",
    "ok",
    "created_at",
]
METRIC_COLUMNS = ["round", "task", "node_id", "metric", "value"]
_JOURNAL = "recorder-{}.jsonl"
_PACKAGES = ("flower-pae", "flwr", "torch", "transformers", "peft", "ray", "pandas", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class RunRecorder:
    """Collects messages and metrics during a run and writes the run directory."""

    def __init__(
        self,
        out_dir: str | Path,
        config: dict[str, Any],
        record_wire: bool = False,
        *,
        resume: bool = False,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.record_wire = record_wire
        self._messages: list[dict[str, Any]] = []
        self._metrics: list[dict[str, Any]] = []
        self._journaled: dict[str, int] = {}  # rows already in the checkpoint's journals
        payload = {"settings": config, "seed": config.get("seed"), "versions": versions()}
        path = self.out_dir / "config.json"
        if resume and path.is_file():
            # a resumed run: the settings it continues with, and each earlier start's settings
            earlier = json.loads(path.read_text())
            payload["earlier_starts"] = [
                *earlier.pop("earlier_starts", []),
                {k: earlier.get(k) for k in ("settings", "versions")},
            ]
        path.write_text(json.dumps(payload, indent=2))

    def state(self) -> dict[str, list[dict[str, Any]]]:
        """Every row recorded so far (JSON-able)."""
        return {"messages": list(self._messages), "metrics": list(self._metrics)}

    def checkpoint(self, directory: Path) -> dict[str, int]:
        """Append the rows recorded since the last checkpoint to ``directory``'s journals
        (``recorder-messages.jsonl``, ``recorder-metrics.jsonl``, one JSON row per line) and
        return how many rows each holds now, for the checkpoint's state.

        Writing every row again at every checkpoint made a checkpoint's cost grow with the
        rounds (and a run's with their square). A journal may hold more rows than the
        committed state says (the run was killed between the two): :meth:`restore` drops them.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, rows in (("messages", self._messages), ("metrics", self._metrics)):
            done = self._journaled.get(name)
            mode = "w" if done is None else "a"  # a fresh run starts its journals anew
            with open(directory / _JOURNAL.format(name), mode, encoding="utf-8") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in rows[done or 0 :])
            self._journaled[name] = len(rows)
        return dict(self._journaled)

    def restore(self, state: dict[str, Any], directory: Path | None = None) -> None:
        """Continue from a checkpoint: its rows (:meth:`checkpoint`'s counts, read from the
        journals in ``directory``, or the rows themselves, as checkpoints before the journals
        held them); later rows are appended after these."""
        if isinstance(state.get("messages"), list):
            self._messages = [dict(row) for row in state["messages"]]
            self._metrics = [dict(row) for row in state["metrics"]]
            return
        if directory is None:
            raise ValueError("a checkpoint's row counts need the directory of its journals")
        for name in ("messages", "metrics"):
            path = Path(directory) / _JOURNAL.format(name)
            rows, end = _read_journal(path, int(state[name]))
            # rows past the counts were never committed: cut them off in place (never
            # rewrite the committed rows, so a run killed now still leaves them whole)
            if path.stat().st_size > end:
                os.truncate(path, end)
            setattr(self, f"_{name}", rows)
            self._journaled[name] = len(rows)

    def message(
        self,
        server_round: int,
        phase: str,
        message: Message,
        direction: str,
        task_key: str | None = None,
        num_samples: int = 0,
    ) -> None:
        """Record one message; ``direction`` is "down" (server → device) or "up"."""
        node = message.metadata.dst_node_id if direction == "down" else message.metadata.src_node_id
        row = {
            "round": server_round,
            "phase": phase,
            "node_id": int(node),
            "direction": direction,
            "task_key": task_key,
            "payload_bytes": message_bytes(message),
            "num_samples": int(num_samples),
            "ok": not message.has_error(),
            # Flower's own stamp (Unix seconds): the server built a request then, the device
            # its reply.
            "created_at": float(message.metadata.created_at),
        }
        self._messages.append(row)
        if self.record_wire:
            wire = self.out_dir / "wire"
            wire.mkdir(exist_ok=True)
            name = f"{server_round:04d}-{phase}-{direction}-{node}-{len(self._messages):06d}.pb"
            (wire / name).write_bytes(message_to_proto(message).SerializeToString())

    def metric(
        self,
        server_round: int,
        metric: str,
        value: float,
        task: str | None = None,
        node_id: int | None = None,
    ) -> None:
        self._metrics.append(
            {
                "round": server_round,
                "task": task,
                "node_id": node_id,
                "metric": metric,
                "value": float(value),
            }
        )

    def messages_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self._messages, columns=MESSAGE_COLUMNS).astype(
            {
                "node_id": "uint64",
                "payload_bytes": "int64",
                "num_samples": "int64",
                "created_at": "float64",
            }
        )

    def metrics_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self._metrics, columns=METRIC_COLUMNS)
        # Node ids are 64-bit: build the nullable column directly, never through float.
        frame["node_id"] = pd.array([m["node_id"] for m in self._metrics], dtype="UInt64")
        return frame.astype({"round": "int64", "value": "float64"})

    def write(self, summary: dict[str, Any]) -> None:
        self.messages_frame().to_parquet(self.out_dir / "messages.parquet", index=False)
        self.metrics_frame().to_parquet(self.out_dir / "metrics.parquet", index=False)
        text = json.dumps(_finite(summary), indent=2, default=float, allow_nan=False)
        (self.out_dir / "summary.json").write_text(text)


def _read_journal(path: Path, count: int) -> tuple[list[dict[str, Any]], int]:
    """The first ``count`` rows of a journal, and the byte offset where they end."""
    rows, end = [], 0
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if len(rows) == count:
                    break
                if not line.endswith(b"\n"):  # a row cut short by a kill
                    break
                rows.append(json.loads(line))
                end += len(line)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint journal {path} cannot be read: {err}") from err
    if len(rows) < count:
        raise CheckpointError(f"checkpoint journal {path} holds {len(rows)} rows, not {count}")
    return rows, end


def _finite(value: Any) -> Any:
    """NaN/Inf become null so that summary.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
