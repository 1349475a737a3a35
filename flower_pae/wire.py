"""What crosses the wire: Flower records <-> tensors, and byte accounting.

Both sides import this module; it holds no secret and no label. The upload record of a
training reply has exactly the keys in :data:`UPLOAD_KEYS`, so a privacy test can check
that nothing else is ever sent.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

ID_BYTES = 16
PRECISIONS = ("fp16", "int8")
SHORTCUTS = ("pivot", "mean")  # what a device keeps of a prompt's states per layer
DOWNLOAD_PRECISIONS = ("fp32", "fp16", "int8")
SCALE_SUFFIX = ":scale"  # an int8 weight matrix's scales travel under its name + this

# Record names used in messages (both directions).
UPLOAD = "upload"  # ArrayRecord: a device's new samples
UPLOAD_KEYS_FP16 = {"ids", "acts", "targets"}
UPLOAD_KEYS_INT8 = {"ids", "acts", "scales", "targets"}
# The "no shortcut" ablation (``upload_sequence``) adds "lengths" (N,) and sends acts (ΣT, L, d):
# every prompt token's states (flower_pae.server.validation.summarize_sequence_upload)
# Targets travel as coefficients (N, C) in the task's masked label basis (d, C), which a
# device sends in a BASIS record with its new samples (flower_pae/device/difference.py).
BASIS = "basis"  # ArrayRecord {"basis": float32 (d, C)}
HELD = "held"  # ArrayRecord: ids the server caches for the receiving node; in the refresh
# phase also "side_ids" (those of its current task) and "side" (its masked outputs for them,
# as coefficients)
REFRESH = "refresh"  # ArrayRecord: fresh masked differences of held samples (refresh phase)
REFRESH_KEYS = {"ids", "targets"}
SIDE_NET = "side_net"  # ArrayRecord: the side network's weights, one flat array per dtype
SIDE_META = "side_meta"  # ConfigRecord: how to rebuild the side network, how to unpack it
CONFIG = "config"  # ConfigRecord: round settings
METRICS = "metrics"  # MetricRecord: device-side figures


def quantize_int8(values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """int8 entries and one float16 scale per row (over the last dimension).

    A row's scale is its largest magnitude / 127, rounded to float16 *before* quantizing, so
    every dequantized entry is within half a step of the scale that travels. An all-zero row
    gets scale 1. Activations (a scale per sample and layer) and the side network's weight
    matrices (a scale per row) both travel this way; :func:`decode_activations` inverts it.
    """
    scales = (values.abs().amax(dim=-1, keepdim=True) / 127.0).half().float()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(values / scales).clamp(-127, 127).to(torch.int8)
    return q.numpy(), scales.squeeze(-1).half().numpy()


def encode_activations(acts: torch.Tensor, precision: str) -> dict[str, np.ndarray]:
    """Quantize pivot activations (N, L, d) for upload: fp16, or int8 with a scale per layer."""
    if precision == "fp16":
        return {"acts": acts.to(torch.float16).numpy()}
    if precision == "int8":
        q, scales = quantize_int8(acts)
        return {"acts": q, "scales": scales}
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def decode_activations(arrays: dict[str, np.ndarray]) -> torch.Tensor:
    """Inverse of :func:`encode_activations`, to float32."""
    acts = torch.from_numpy(np.ascontiguousarray(arrays["acts"]))
    if acts.dtype == torch.int8:
        scales = torch.from_numpy(np.ascontiguousarray(arrays["scales"])).float()
        return acts.float() * scales.unsqueeze(-1)
    return acts.float()


def to_coefficients(vectors: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Coefficients (float32, (N, C)) of masked row vectors (N, d) in a task's basis (d, C)."""
    return (np.asarray(vectors, np.float64) @ np.asarray(basis, np.float64)).astype(np.float32)


def from_coefficients(coefficients: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Masked row vectors (float32, (N, d)) from coefficients (N, C) in the basis (d, C)."""
    c, u = np.asarray(coefficients, np.float64), np.asarray(basis, np.float64)
    return (c @ u.T).astype(np.float32)


def ids_to_array(ids: list[bytes]) -> np.ndarray:
    if not ids:
        return np.zeros((0, ID_BYTES), dtype=np.uint8)
    return np.frombuffer(b"".join(ids), dtype=np.uint8).reshape(len(ids), ID_BYTES).copy()


def array_to_ids(arr: np.ndarray) -> list[bytes]:
    arr = np.asarray(arr, dtype=np.uint8).reshape(-1, ID_BYTES)
    return [row.tobytes() for row in arr]


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def pack_arrays(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list]:
    """One flat array per dtype, and the layout (name, dtype, shape of each, in order).

    Flower frames every Array of a record as an object of its own (about 460 bytes of ids and
    hashes), so a network of many small arrays travels as a few flat ones.
    """
    flat: dict[str, list[np.ndarray]] = {}
    layout = []
    for name, value in arrays.items():
        flat.setdefault(value.dtype.name, []).append(np.ravel(value))
        layout.append([name, value.dtype.name, list(value.shape)])
    return {dtype: np.concatenate(parts) for dtype, parts in flat.items()}, layout


def unpack_arrays(flat: dict[str, np.ndarray], layout: list) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_arrays`; raises ValueError if the layout does not fit."""
    offsets = dict.fromkeys(flat, 0)
    arrays = {}
    for name, dtype, shape in layout:
        start, size = offsets.get(dtype, 0), math.prod(shape)
        if dtype not in flat or start + size > flat[dtype].size:
            raise ValueError(f"layout entry {name!r} ({dtype}, {shape}) runs past the arrays")
        arrays[name] = flat[dtype][start : start + size].reshape(shape)
        offsets[dtype] = start + size
    if any(offsets[dtype] != values.size for dtype, values in flat.items()):
        raise ValueError("the layout leaves array entries unused")
    return arrays


def side_network_records(
    meta: dict,
    state: dict[str, torch.Tensor],
    matrices: Collection[str] = (),
    precision: str = "fp32",
    halved: Collection[str] = (),
) -> RecordDict:
    """Pack the side network for download: one flat array per dtype, meta and layout as JSON.

    The entries named in ``matrices`` travel in ``precision``: float16, or int8 with one
    float16 scale per row (under ``name + SCALE_SUFFIX``); those named in
    ``halved`` (the standardizer) as float16 unless ``precision`` is fp32; every other entry
    as float32. With fp32 the network arrives exactly. The device loads them all into a
    float32 network (:func:`side_network_from_records`).
    """
    if precision not in DOWNLOAD_PRECISIONS:
        raise ValueError(f"precision must be one of {DOWNLOAD_PRECISIONS}, got {precision!r}")
    arrays: dict[str, np.ndarray] = {}
    for name, value in state.items():
        value = value.detach().cpu().float()
        if precision == "fp32" or name not in {*matrices, *halved}:
            arrays[name] = value.numpy()
        elif precision == "fp16" or name not in matrices:
            arrays[name] = value.half().numpy()
        else:
            arrays[name], arrays[name + SCALE_SUFFIX] = quantize_int8(value)
    flat, layout = pack_arrays(arrays)
    meta_record = ConfigRecord({"json": json.dumps(meta), "layout": json.dumps(layout)})
    return RecordDict({SIDE_NET: array_record(flat), SIDE_META: meta_record})


def side_network_from_records(content: RecordDict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Inverse of :func:`side_network_records`: meta and a float32 (or float16) state."""
    meta = json.loads(str(content[SIDE_META]["json"]))
    layout = json.loads(str(content[SIDE_META]["layout"]))
    arrays = unpack_arrays(record_arrays(content[SIDE_NET]), layout)
    state = {}
    for name, value in arrays.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if name + SCALE_SUFFIX in arrays:  # int8 rows with their scales, as activations travel
            state[name] = decode_activations({"acts": value, "scales": arrays[name + SCALE_SUFFIX]})
        else:
            state[name] = torch.from_numpy(value.copy())
    return meta, state


def side_network_digest(content: RecordDict) -> str:
    """SHA-256 of a side-network download (meta, layout and every array's name, dtype, shape
    and bytes).

    Equal digests mean equal networks: a device process that receives the same network for
    several of its devices may rebuild it once.
    """
    meta = content[SIDE_META]
    digest = hashlib.sha256(f"{meta['json']}|{meta['layout']}|".encode())
    for name, array in sorted(content[SIDE_NET].items()):
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.data)
    return digest.hexdigest()


def summarize_sequences(states: torch.Tensor, lengths: torch.Tensor, shortcut: str) -> torch.Tensor:
    """Per prompt, its pivot's (last token's) states or the mean of its tokens' states.

    ``states`` (ΣT, L, d) holds the prompts' tokens one prompt after another; ``lengths``
    (N,) their counts (each ≥ 1). Returns (N, L, d) float32.
    """
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    lengths = lengths.long()
    ends = lengths.cumsum(0)
    if shortcut == "pivot":
        return states[ends - 1].float()
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    sums = torch.zeros(len(lengths), *states.shape[1:], dtype=torch.float64)
    sums.index_add_(0, owner, states.double())
    return (sums / lengths.view(-1, 1, 1)).float()


def message_bytes(message: Message) -> int:
    """Bytes of a message as Flower serializes it for transport (all its deflated objects)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
