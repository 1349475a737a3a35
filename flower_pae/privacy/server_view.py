"""The server's view of a run, rebuilt from the messages that crossed the wire.

A run started with ``record_wire=true`` dumps every serialized Flower message into ``wire/``.
This module replays the device replies the way the strategy does — the same validation
(:func:`flower_pae.server.validation.validate_upload`), the same first-come deduplication by
opaque id as :class:`flower_pae.server.cache.ActivationCache` — and returns exactly what the
server cached: per opaque task key, the ids, pivot activations and masked targets as uploaded,
plus the message metadata (round, node, bytes) it saw. With the refresh phase on, the refreshed
differences devices send later are counted, not attacked (the cache's targets then change).

Server side only: this module imports nothing of the devices' secret or masking code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from flower_pae.server.validation import UploadError, validate_basis, validate_upload
from flower_pae.wire import (
    BASIS,
    CONFIG,
    METRICS,
    REFRESH,
    UPLOAD,
    array_to_ids,
    decode_activations,
    from_coefficients,
)

WIRE_NAME = re.compile(r"(\d+)-(\w+)-(up|down)-(\d+)-(\d+)\.pb")


class AuditError(ValueError):
    """The run directory cannot be audited; the message says what to do."""


@dataclass
class TaskView:
    """What the server cached for one opaque task key (rows in arrival order)."""

    key: str
    ids: np.ndarray  # (N, 16) uint8 opaque sample ids
    acts: np.ndarray  # (N, L, d) float32 pivot activations, decoded as the server decodes them
    targets: np.ndarray  # (N, d) float32 masked prediction differences
    nodes: np.ndarray  # (N,) uint64 node id that uploaded each sample
    rounds: np.ndarray  # (N,) int64 round of the upload

    @property
    def num_samples(self) -> int:
        return int(self.ids.shape[0])

    def id_bytes(self) -> list[bytes]:
        return array_to_ids(self.ids)


@dataclass
class ServerView:
    """Everything an honest-but-curious server holds after the run."""

    run_dir: Path
    settings: dict[str, Any]
    tasks: dict[str, TaskView]  # in order of first appearance
    messages: list[dict[str, Any]]  # one row per dumped message: metadata the server sees
    rejected: list[str] = field(default_factory=list)
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)  # last round's counts
    refreshed: int = 0  # refreshed differences received (refresh phase; not in ``tasks``)

    @property
    def num_samples(self) -> int:
        return sum(t.num_samples for t in self.tasks.values())


def load_server_view(run_dir: str | Path) -> ServerView:
    """Rebuild the server's cache and metadata from a run directory's ``wire/`` dumps.

    Parameters
    ----------
    run_dir : str or Path
        A run directory written with ``record_wire=true``.

    Returns
    -------
    ServerView

    Raises
    ------
    AuditError
        When the directory has no ``config.json`` or no wire dumps.
    """
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if not config.is_file():
        raise AuditError(f"{run_dir} is not a run directory (no config.json)")
    settings = json.loads(config.read_text()).get("settings", {})
    dumps = _dumps(run_dir)
    if not dumps:
        raise AuditError(
            f"{run_dir} has no wire dumps ({run_dir / 'wire'}/*.pb): the audit needs the "
            "messages exactly as they crossed the wire; rerun with --set record_wire=true"
        )
    parts: dict[str, list[dict[str, np.ndarray]]] = {}
    held: set[bytes] = set()
    bases: dict[str, np.ndarray] = {}  # task key -> the label basis its devices sent
    expected: tuple[int, int] | None = None
    messages, rejected = [], []
    evaluation: dict[str, dict[str, float]] = {}
    last_eval_round = -1
    refreshed = 0
    for (rnd, phase, direction, node, seq), path in dumps:
        raw = path.read_bytes()
        row = {
            "seq": seq,
            "round": rnd,
            "phase": phase,
            "direction": direction,
            "node_id": node,
            "bytes": len(raw),
            "task_key": None,
            "samples": 0,
            "error": False,
        }
        messages.append(row)
        if direction != "up":  # the server's own messages: their metadata is all it needs
            continue
        msg = message_from_proto(ProtoMessage.FromString(raw))
        row["error"] = msg.has_error()
        if msg.has_error():
            continue
        if phase == "evaluate" and METRICS in msg.content:
            if rnd > last_eval_round:
                evaluation, last_eval_round = {}, rnd
            for name, value in msg.content[METRICS].items():
                if name != "num-examples":
                    evaluation[name] = evaluation.get(name, 0.0) + float(value)
            continue
        if phase != "train":
            continue
        try:
            if UPLOAD not in msg.content or CONFIG not in msg.content:
                raise UploadError("reply has no upload record")
            key = str(msg.content[CONFIG].get("task_key", ""))
            arrays = {k: v.numpy() for k, v in msg.content[UPLOAD].items()}
            if BASIS in msg.content:
                sent = {k: v.numpy() for k, v in msg.content[BASIS].items()}
                hidden = int(arrays["acts"].shape[-1])
                bases.setdefault(key, validate_basis(sent, hidden, bases.get(key)))
            width = bases[key].shape[1] if key in bases else None
            shape = validate_upload(arrays, key, expected, width=width)
        except UploadError as err:
            rejected.append(f"{path.name}: {err}")
            continue
        expected = expected or shape
        if REFRESH in msg.content:
            refreshed += int(msg.content[REFRESH]["ids"].shape[0])
        row["task_key"] = key
        row["samples"] = int(arrays["ids"].shape[0])
        ids = array_to_ids(arrays["ids"])
        keep = np.zeros(len(ids), dtype=bool)
        for i, sample_id in enumerate(ids):  # the cache's rule: the first upload of an id wins
            keep[i] = sample_id not in held
            held.add(sample_id)
        parts.setdefault(key, [])
        if keep.any():
            n = int(keep.sum())
            parts[key].append(
                {
                    "ids": arrays["ids"][keep],
                    "acts": decode_activations({k: v[keep] for k, v in arrays.items()}).numpy(),
                    "targets": from_coefficients(arrays["targets"][keep], bases[key]),
                    "nodes": np.full(n, node, dtype=np.uint64),
                    "rounds": np.full(n, rnd, dtype=np.int64),
                }
            )
    tasks = {key: _task_view(key, blocks, expected) for key, blocks in parts.items()}
    return ServerView(run_dir, settings, tasks, messages, rejected, evaluation, refreshed)


def _dumps(run_dir: Path) -> list[tuple[tuple[int, str, str, int, int], Path]]:
    """Wire dumps in the order the server recorded them (their sequence number)."""
    out = []
    for path in (run_dir / "wire").glob("*.pb") if (run_dir / "wire").is_dir() else []:
        match = WIRE_NAME.fullmatch(path.name)
        if match is None:
            raise AuditError(f"unexpected file name in wire/: {path.name}")
        rnd, phase, direction, node, seq = match.groups()
        out.append(((int(rnd), phase, direction, int(node), int(seq)), path))
    return sorted(out, key=lambda item: item[0][4])


def _task_view(
    key: str, blocks: list[dict[str, np.ndarray]], shape: tuple[int, int] | None
) -> TaskView:
    if not blocks:
        layers, d = shape or (0, 0)
        return TaskView(
            key,
            np.zeros((0, 16), np.uint8),
            np.zeros((0, layers, d), np.float32),
            np.zeros((0, d), np.float32),
            np.zeros(0, np.uint64),
            np.zeros(0, np.int64),
        )
    cat = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}
    return TaskView(key, cat["ids"], cat["acts"], cat["targets"], cat["nodes"], cat["rounds"])
