"""One file per checkpoint of the server's state, replaced atomically.

A checkpoint directory holds ``state.pt`` (the JSON-able state as a JSON string plus tensors:
side-network weights, optimizer and generator states) and whatever large arrays the state's
owner writes next to it (the activation cache's blocks). ``state.pt`` is written to a
temporary file and renamed into place, so a run killed while checkpointing leaves the previous
checkpoint whole; it is read with ``torch.load(weights_only=True)`` (no pickled code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A missing, unreadable or incompatible checkpoint; the message says which and why."""


def save_state(directory: Path, state: dict[str, Any], tensors: dict[str, Any]) -> Path:
    """Write ``state`` (JSON-able) and ``tensors`` (torch-serialisable) as ``state.pt``.

    Returns
    -------
    Path
        The checkpoint file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    tmp = directory / f".{STATE_FILE}.tmp"
    payload = {"format": FORMAT, "state": json.dumps(state), "tensors": tensors}
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_state(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read what :func:`save_state` wrote: ``(state, tensors)``."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: was the run started with checkpoints?")
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from err
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {payload.get('format')}, not {FORMAT}")
    return json.loads(payload["state"]), payload["tensors"]
