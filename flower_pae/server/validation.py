"""Checks on what a device uploads, before anything touches the cache or the side network."""

from __future__ import annotations

import numpy as np

from flower_pae.wire import ID_BYTES, UPLOAD_KEYS_FP16, UPLOAD_KEYS_INT8

MAX_SAMPLES_PER_UPLOAD = 100_000


class UploadError(ValueError):
    """An upload that breaks the protocol; the message is the logged reason."""


def validate_upload(
    arrays: dict[str, np.ndarray], task_key: str, expected: tuple[int, int] | None
) -> tuple[int, int] | None:
    """Check keys, shapes, dtypes and finiteness; return the (layers, hidden) shape seen."""
    keys = set(arrays)
    if keys not in (UPLOAD_KEYS_FP16, UPLOAD_KEYS_INT8):
        raise UploadError(f"unexpected record keys {sorted(keys)}")
    if not task_key or len(task_key) > 64:
        raise UploadError("missing or oversized task key")
    ids, acts, targets = arrays["ids"], arrays["acts"], arrays["targets"]
    n = ids.shape[0] if ids.ndim == 2 else -1
    if ids.dtype != np.uint8 or ids.ndim != 2 or ids.shape[1] != ID_BYTES:
        raise UploadError(f"ids must be uint8 (N, {ID_BYTES}), got {ids.dtype} {ids.shape}")
    if n > MAX_SAMPLES_PER_UPLOAD:
        raise UploadError(f"{n} samples in one upload exceeds {MAX_SAMPLES_PER_UPLOAD}")
    if acts.ndim != 3 or acts.shape[0] != n:
        raise UploadError(f"acts must be (N={n}, L, d), got {acts.shape}")
    if acts.dtype not in (np.float16, np.int8):
        raise UploadError(f"acts must be float16 or int8, got {acts.dtype}")
    if (acts.dtype == np.int8) != ("scales" in arrays):
        raise UploadError("int8 acts need per-layer scales (and only int8 acts have them)")
    shape = (int(acts.shape[1]), int(acts.shape[2]))
    if expected is not None and shape != expected:
        raise UploadError(f"activation shape {shape} differs from the expected {expected}")
    if targets.dtype != np.float32 or targets.shape != (n, shape[1]):
        raise UploadError(
            f"targets must be float32 (N={n}, {shape[1]}), got {targets.dtype} {targets.shape}"
        )
    finite = [np.isfinite(targets).all(), np.isfinite(acts.astype(np.float32)).all()]
    if "scales" in arrays:
        scales = arrays["scales"]
        if scales.shape != acts.shape[:2]:
            raise UploadError(f"scales must be (N, L)={acts.shape[:2]}, got {scales.shape}")
        finite.append(np.isfinite(scales.astype(np.float32)).all())
    if not all(finite):
        raise UploadError("NaN or Inf in the upload")
    return shape if n else expected
