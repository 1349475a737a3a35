"""Checks on what a device sends, before anything touches the cache or the side network.

Every check raises :class:`UploadError`, whose message is the reason the server logs and
records (``PAEStrategy.rejected``, the ``rejected_uploads`` metric). A rejected reply changes
nothing on the server; the round goes on with the others.

A training reply carries exactly the records ``upload`` (ids, activations, int8 scales,
masked targets as coefficients in the task's label basis), ``config`` (the opaque task key),
``metrics`` (device figures), ``basis`` (the task's masked label basis, with new samples) and,
in the refresh phase, ``refresh``; an evaluation reply carries only ``metrics`` with integer counts
``<task key>/[upcoming_]correct|zero_shot_correct|total``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flower_pae.wire import (
    BASIS,
    CONFIG,
    ID_BYTES,
    METRICS,
    REFRESH,
    REFRESH_KEYS,
    UPLOAD,
    UPLOAD_KEYS_FP16,
    UPLOAD_KEYS_INT8,
    decode_activations,
    encode_activations,
    summarize_sequences,
)

MAX_SAMPLES_PER_UPLOAD = 100_000
MAX_UPLOAD_BYTES = 512 * 2**20  # Flower's gRPC transport caps a message at 512 MiB
MAX_TASK_KEY_CHARS = 64
MAX_COUNT = 10**9  # evaluation counts above this are not a device's test set
BASIS_TOLERANCE = 1e-4  # orthonormality, and agreement with the task's first basis

# What each phase's reply may hold, and the record type of each name.
RECORD_TYPES: dict[str, type] = {
    UPLOAD: ArrayRecord,
    REFRESH: ArrayRecord,
    BASIS: ArrayRecord,
    CONFIG: ConfigRecord,
    METRICS: MetricRecord,
}
TRAIN_RECORDS = {UPLOAD, CONFIG, METRICS, REFRESH, BASIS}
EVALUATE_RECORDS = {METRICS}
# Device figures of a training reply that the server reads (and records).
DEVICE_METRICS = ("num-examples", "forward_seconds", "peak_rss_mb", "flops")
_COUNT_NAME = re.compile(
    r"(?P<key>.+)/(?P<upcoming>upcoming_)?(?P<what>correct|zero_shot_correct|total)"
)
_COUNT_SLOTS = {"correct": 0, "zero_shot_correct": 1, "total": 2}


class UploadError(ValueError):
    """A reply that breaks the protocol; the message is the logged reason."""


# ---- the reply as a whole --------------------------------------------------------------------
def check_records(content: RecordDict, phase: str, allowed: set[str], required: set[str]) -> None:
    """Record names and types of a reply: nothing unknown, nothing missing, right types."""
    names = set(content.keys())
    unknown = sorted(names - allowed)
    if unknown:
        raise UploadError(f"unknown record(s) {unknown} in a {phase} reply")
    missing = sorted(required - names)
    if missing:
        raise UploadError(f"{phase} reply without the record(s) {missing}")
    for name in sorted(names):
        kind = RECORD_TYPES[name]
        if not isinstance(content[name], kind):
            got = type(content[name]).__name__
            raise UploadError(f"record {name!r} must be a {kind.__name__}, got {got}")


def check_record_size(
    record: ArrayRecord,
    what: str,
    max_samples: int = MAX_SAMPLES_PER_UPLOAD,
    max_bytes: int = MAX_UPLOAD_BYTES,
) -> None:
    """Caps on an array record, read from its serialized arrays before any is decoded."""
    size = sum(len(array.data) for array in record.values())
    if size > max_bytes:
        raise UploadError(f"{what} of {size} bytes exceeds the cap of {max_bytes} bytes")
    if "ids" in record and record["ids"].shape:
        n = int(record["ids"].shape[0])
        if n > max_samples:
            raise UploadError(f"{n} samples in one {what} exceeds the cap of {max_samples}")


def decode_arrays(record: ArrayRecord, what: str) -> dict[str, np.ndarray]:
    """The numpy arrays of a record; an undecodable array is an :class:`UploadError`."""
    out = {}
    for key, array in record.items():
        try:
            out[key] = array.numpy()
        except (TypeError, ValueError, OSError) as err:
            raise UploadError(f"{what} array {key!r} cannot be decoded: {err}") from err
    return out


def task_key_of(config: ConfigRecord) -> str:
    """The opaque task key of a training reply's config record (its only entry)."""
    keys = sorted(config.keys())
    if keys != ["task_key"]:
        raise UploadError(f"config record must hold only 'task_key', got {keys}")
    key = config["task_key"]
    if not isinstance(key, str) or not key or len(key) > MAX_TASK_KEY_CHARS:
        raise UploadError("missing, non-string or oversized task key")
    return key


def check_device_metrics(metrics: MetricRecord, names: tuple[str, ...] = DEVICE_METRICS) -> None:
    """The device figures the server records must be finite non-negative numbers."""
    for name in names:
        if name in metrics and not _non_negative_number(metrics[name]):
            raise UploadError(f"device metric {name!r} must be a finite number >= 0")


# ---- training uploads ------------------------------------------------------------------------
def validate_basis(
    arrays: dict[str, np.ndarray], hidden: int, known: np.ndarray | None
) -> np.ndarray:
    """Check a task's masked label basis: float32 ``(d, C)``, ``2 <= C <= d``, orthonormal
    columns, and equal to the basis the task's devices sent first (``known``), if any."""
    if set(arrays) != {"basis"}:
        raise UploadError(f"unexpected basis record keys {sorted(arrays)}")
    basis = arrays["basis"]
    if basis.dtype != np.float32 or basis.ndim != 2 or basis.shape[0] != hidden:
        raise UploadError(f"basis must be float32 ({hidden}, C), got {basis.dtype} {basis.shape}")
    if not 2 <= basis.shape[1] <= hidden:
        raise UploadError(f"basis needs 2 to {hidden} columns (labels), got {basis.shape[1]}")
    if not np.isfinite(basis).all():
        raise UploadError("NaN or Inf in the basis")
    gram = basis.astype(np.float64).T @ basis.astype(np.float64)
    if np.abs(gram - np.eye(basis.shape[1])).max() > BASIS_TOLERANCE:
        raise UploadError("basis columns are not orthonormal")
    if known is not None and (
        known.shape != basis.shape or np.abs(known - basis).max() > BASIS_TOLERANCE
    ):
        raise UploadError("basis differs from the one this task's devices sent first")
    return basis


def validate_upload(
    arrays: dict[str, np.ndarray],
    task_key: str,
    expected: tuple[int, int] | None,
    max_samples: int = MAX_SAMPLES_PER_UPLOAD,
    width: int | None = None,
) -> tuple[int, int] | None:
    """Check keys, shapes, dtypes and finiteness; return the (layers, hidden) shape seen.

    ``width`` is the number of target coefficients (the task basis' columns); ``None``, when
    no basis is known for the task, admits only an upload without samples.
    """
    keys = set(arrays)
    if keys not in (UPLOAD_KEYS_FP16, UPLOAD_KEYS_INT8):
        raise UploadError(f"unexpected record keys {sorted(keys)}")
    if not task_key or len(task_key) > MAX_TASK_KEY_CHARS:
        raise UploadError("missing or oversized task key")
    ids, acts, targets = arrays["ids"], arrays["acts"], arrays["targets"]
    n = ids.shape[0] if ids.ndim == 2 else -1
    if ids.dtype != np.uint8 or ids.ndim != 2 or ids.shape[1] != ID_BYTES:
        raise UploadError(f"ids must be uint8 (N, {ID_BYTES}), got {ids.dtype} {ids.shape}")
    if n > max_samples:
        raise UploadError(f"{n} samples in one upload exceeds the cap of {max_samples}")
    if acts.ndim != 3 or acts.shape[0] != n:
        raise UploadError(f"acts must be (N={n}, L, d), got {acts.shape}")
    if acts.dtype not in (np.float16, np.int8):
        raise UploadError(f"acts must be float16 or int8, got {acts.dtype}")
    if (acts.dtype == np.int8) != ("scales" in arrays):
        raise UploadError("int8 acts need per-layer scales (and only int8 acts have them)")
    shape = (int(acts.shape[1]), int(acts.shape[2]))
    if min(shape) < 1:
        raise UploadError(f"activations need at least one layer and dimension, got {shape}")
    if expected is not None and shape != expected:
        raise UploadError(f"activation shape {shape} differs from the expected {expected}")
    if width is None and n:
        raise UploadError("new samples of a task need its basis record (none sent or known)")
    if targets.dtype != np.float32 or targets.ndim != 2 or targets.shape[0] != n:
        raise UploadError(
            f"targets must be float32 (N={n}, C), got {targets.dtype} {targets.shape}"
        )
    if width is not None and targets.shape[1] != width:
        raise UploadError(f"targets have {targets.shape[1]} coefficients, the basis {width}")
    finite = [np.isfinite(targets).all(), np.isfinite(acts.astype(np.float32)).all()]
    if "scales" in arrays:
        scales = arrays["scales"]
        if scales.dtype not in (np.float16, np.float32) or scales.shape != acts.shape[:2]:
            raise UploadError(
                f"scales must be float16 (N, L)={acts.shape[:2]}, got {scales.dtype} {scales.shape}"
            )
        finite.append(np.isfinite(scales.astype(np.float32)).all())
        if finite[-1] and (scales < 0).any():
            raise UploadError("negative int8 scales")
    if not all(finite):
        raise UploadError("NaN or Inf in the upload")
    return shape if n else expected


def summarize_sequence_upload(
    arrays: dict[str, np.ndarray], shortcut: str | None
) -> dict[str, np.ndarray]:
    """The "no shortcut" ablation's upload, reduced to what the shortcut keeps.

    A device sent every prompt token's states (``acts`` (ΣT, L, d), with ``scales`` (ΣT, L)
    if int8) and each prompt's token count (``lengths`` (N,)). The side network is token-wise,
    so its output at the pivot reads only what ``shortcut`` keeps of them. Returns the upload
    with ``acts`` (N, L, d) (and ``scales``) in the same precision, as a device that takes the
    shortcut would have sent it; :func:`validate_upload` then checks it as any other.
    """
    if shortcut is None:
        raise UploadError(
            "every token's activations were sent, but this run takes the activation shortcut "
            "(upload_sequence is off)"
        )
    arrays = dict(arrays)
    lengths, acts, ids = arrays.pop("lengths"), arrays.get("acts"), arrays.get("ids")
    if acts is None or ids is None or ids.ndim != 2:
        raise UploadError("a sequence upload needs ids and acts")
    if lengths.dtype != np.int64 or lengths.shape != (ids.shape[0],):
        raise UploadError(
            f"lengths must be int64 (N={ids.shape[0]},), got {lengths.dtype} {lengths.shape}"
        )
    if (lengths < 1).any() or int(lengths.sum()) != (acts.shape[0] if acts.ndim == 3 else -1):
        raise UploadError("lengths must be >= 1 and add up to the rows of acts (ΣT, L, d)")
    if acts.dtype not in (np.float16, np.int8) or (acts.dtype == np.int8) != ("scales" in arrays):
        raise UploadError("sequence acts must be float16, or int8 with their scales")
    if "scales" in arrays and arrays["scales"].shape != acts.shape[:2]:
        raise UploadError(f"scales must be (ΣT, L)={acts.shape[:2]}, got {arrays['scales'].shape}")
    states = decode_activations(arrays)
    if not torch.isfinite(states).all():
        raise UploadError("NaN or Inf in the upload")
    kept = summarize_sequences(states, torch.from_numpy(lengths), shortcut)
    arrays.pop("scales", None)
    arrays.update(encode_activations(kept, "int8" if acts.dtype == np.int8 else "fp16"))
    return arrays


def validate_refresh(
    arrays: dict[str, np.ndarray], width: int, max_samples: int = MAX_SAMPLES_PER_UPLOAD
) -> None:
    """Check a refresh record: distinct ids ``uint8 (N, 16)``, finite float32 targets ``(N, C)``
    (``C = width``, the coefficients of the task's basis)."""
    if set(arrays) != REFRESH_KEYS:
        raise UploadError(f"unexpected refresh record keys {sorted(arrays)}")
    ids, targets = arrays["ids"], arrays["targets"]
    if ids.dtype != np.uint8 or ids.ndim != 2 or ids.shape[1] != ID_BYTES:
        raise UploadError(f"refresh ids must be uint8 (N, {ID_BYTES}), got {ids.dtype} {ids.shape}")
    if ids.shape[0] > max_samples:
        raise UploadError(f"{ids.shape[0]} refreshed samples exceeds the cap of {max_samples}")
    if targets.dtype != np.float32 or targets.shape != (ids.shape[0], width):
        raise UploadError(
            f"refresh targets must be float32 (N={ids.shape[0]}, {width}), "
            f"got {targets.dtype} {targets.shape}"
        )
    if not np.isfinite(targets).all():
        raise UploadError("NaN or Inf in the refresh targets")
    if len(np.unique(ids, axis=0)) != ids.shape[0]:
        raise UploadError("the same sample id twice in one refresh record")


# ---- evaluation reports ----------------------------------------------------------------------
def evaluation_counts(
    metrics: Mapping[str, object],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Parse and check the counts of an evaluation reply.

    Names are ``<key>/[upcoming_]correct|zero_shot_correct|total`` (plus Flower's
    ``num-examples``); values are integers in ``[0, 10⁹]``; for each task all three counts are
    present and neither correct count exceeds the total.

    Returns
    -------
    tuple[dict, dict]
        ``task key -> [correct, zero_shot_correct, total]`` for the tasks the device has met,
        and the same for its upcoming task.
    """
    seen: dict[str, np.ndarray] = {}
    ahead: dict[str, np.ndarray] = {}
    filled: dict[tuple[bool, str], set[int]] = {}
    for name, value in metrics.items():
        if name == "num-examples":
            if not _count(value):
                raise UploadError(f"{name} must be an integer in [0, {MAX_COUNT}], got {value!r}")
            continue
        match = _COUNT_NAME.fullmatch(name)
        if match is None or len(match["key"]) > MAX_TASK_KEY_CHARS:
            raise UploadError(f"unknown evaluation metric {name!r}")
        if not _count(value):
            raise UploadError(f"{name} must be an integer in [0, {MAX_COUNT}], got {value!r}")
        upcoming = bool(match["upcoming"])
        target = ahead if upcoming else seen
        slot = _COUNT_SLOTS[match["what"]]
        target.setdefault(match["key"], np.zeros(3))[slot] = float(value)
        filled.setdefault((upcoming, match["key"]), set()).add(slot)
    for (upcoming, key), slots in filled.items():
        if len(slots) != 3:
            raise UploadError(f"incomplete counts for task {key!r}")
        correct, zero_shot, total = (ahead if upcoming else seen)[key]
        if correct > total or zero_shot > total:
            raise UploadError(f"counts of task {key!r} exceed its total ({total:.0f})")
    return seen, ahead


def _non_negative_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _count(value: object) -> bool:
    return _non_negative_number(value) and float(value).is_integer() and value <= MAX_COUNT
