"""Split example indices across federated devices (IID or Dirichlet label skew)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .task import DataError

__all__ = ["SCHEMES", "partition"]

SCHEMES = ("iid", "dirichlet")
_MAX_REDRAWS = 50


def partition(
    labels: Sequence[int],
    num_devices: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[list[int]]:
    """Assign every index of ``labels`` to exactly one of ``num_devices`` devices.

    Returns, per device, the sorted list of example indices.

    * ``"iid"``: seeded shuffle, then near-equal contiguous split (sizes differ by at most 1).
    * ``"dirichlet"``: for each class, device proportions ~ Dirichlet(``alpha``) (standard label
      skew; smaller ``alpha`` = more skew). Draws leaving a device empty are redrawn (up to 50
      times); if one still does, single examples are moved from the largest devices so every
      device holds at least one. ``alpha`` is only checked for this scheme.

    Deterministic in ``seed``. Raises :class:`DataError` for an unknown scheme,
    ``num_devices < 1``, ``alpha <= 0`` or more devices than examples.
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)):
        raise DataError(f"num_devices must be an integer >= 1, got {num_devices!r}")
    num_devices = int(num_devices)
    if num_devices < 1:
        raise DataError(f"num_devices must be >= 1, got {num_devices}")
    y = np.asarray(list(labels))
    n = len(y)
    if num_devices > n:
        raise DataError(
            f"cannot partition {n} examples over {num_devices} devices: every device needs at "
            "least one example; use fewer devices or more data (raise max_train)"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        perm = rng.permutation(n)
        return [sorted(part.tolist()) for part in np.array_split(perm, num_devices)]

    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise DataError(f"dirichlet alpha must be a number > 0, got {alpha!r}") from None
    if not math.isfinite(a) or a <= 0:
        raise DataError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")

    classes = np.unique(y)
    parts: list[list[int]] = []
    for _ in range(_MAX_REDRAWS):
        parts = [[] for _ in range(num_devices)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(num_devices, a))
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for d, chunk in enumerate(np.split(idx, cuts)):
                parts[d].extend(chunk.tolist())
        if min(len(p) for p in parts) >= 1:
            break
    else:
        # Move one random example from the currently largest device to each empty one.
        for d in range(num_devices):
            if not parts[d]:
                donor = max(range(num_devices), key=lambda k: len(parts[k]))
                j = int(rng.integers(len(parts[donor])))
                parts[d].append(parts[donor].pop(j))
    return [sorted(p) for p in parts]
