"""One file per checkpoint of the server's state, replaced atomically.

A checkpoint directory holds ``state.pt`` (the JSON-able state as a JSON string plus tensors:
side-network weights, optimizer and generator states) and whatever the state's owner writes
next to it (the activation cache's blocks, the run recorder's journals). ``state.pt`` is
written to a temporary file and renamed into place, so a run killed while checkpointing leaves
the previous checkpoint whole; it is read with ``torch.load(weights_only=True)`` (no pickled code).

The tensors are packed, one flat buffer per dtype, and each is replaced by a short tuple (its
dtype, offset and shape): ``torch.save`` pickles and writes each tensor as a record of its
own, and the server's 600-odd small tensors, saved every round, cost it three times as long
as their bytes do.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
FORMAT = 2  # 1: one record per tensor, still read
_PACKED = "packed tensor"


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
    parts: dict[str, list[torch.Tensor]] = {}
    packed = _pack(tensors, parts, {})
    buffers = {dtype: torch.cat(pieces) for dtype, pieces in parts.items()}
    payload = {"format": FORMAT, "state": json.dumps(state), "tensors": packed, "buffers": buffers}
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
    if payload.get("format") not in (1, FORMAT):
        raise CheckpointError(f"checkpoint {path} has format {payload.get('format')}, not {FORMAT}")
    tensors = payload["tensors"]
    if payload["format"] == FORMAT:
        tensors = _unpack(tensors, payload["buffers"])
    return json.loads(payload["state"]), tensors


def _pack(tree: Any, parts: dict[str, list[torch.Tensor]], sizes: dict[str, int]) -> Any:
    """``tree`` (dicts, lists, tuples) with each tensor replaced by ``(_PACKED, dtype,
    offset, *shape)``, its values appended to ``parts[dtype]`` (``sizes``: their lengths)."""
    if isinstance(tree, torch.Tensor):
        dtype = str(tree.dtype).removeprefix("torch.")
        offset = sizes.get(dtype, 0)
        parts.setdefault(dtype, []).append(tree.detach().reshape(-1))
        sizes[dtype] = offset + tree.numel()
        return (_PACKED, dtype, offset, *tree.shape)
    if isinstance(tree, dict):
        return {key: _pack(value, parts, sizes) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_pack(value, parts, sizes) for value in tree)
    return tree


def _unpack(tree: Any, buffers: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_pack`; every tensor its own copy."""
    if isinstance(tree, tuple) and tree and tree[0] == _PACKED:
        _, dtype, offset, *shape = tree
        size = math.prod(shape)
        return buffers[dtype][offset : offset + size].view(shape).clone()
    if isinstance(tree, dict):
        return {key: _unpack(value, buffers) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_unpack(value, buffers) for value in tree)
    return tree
