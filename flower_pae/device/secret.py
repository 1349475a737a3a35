"""The cohort secret that only devices hold, and what devices derive from it.

From one secret the devices derive: the orthogonal mask ``Q`` applied to every uploaded
prediction difference, opaque sample ids (keyed hashes, so the server can cache a sample
without learning its content) and opaque task keys. The server never sees the secret; a
single device colluding with the server exposes it (the trust model of DESIGN.md).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path

import torch

from flower_pae.wire import ID_BYTES

SECRET_ENV = "FLOWER_PAE_COHORT_SECRET"


class CohortSecret:
    """Keyed derivations of one shared device secret."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the cohort secret must have at least 16 bytes")
        self._key = key
        self._rotations: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def from_hex(cls, text: str) -> CohortSecret:
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError as err:
            raise ValueError(f"{SECRET_ENV} must be a hex string of 32+ digits") from err

    @classmethod
    def for_device(cls, secret_file: Path) -> CohortSecret:
        """The secret from ``$FLOWER_PAE_COHORT_SECRET``, else from (or created in) a file."""
        if os.environ.get(SECRET_ENV):
            return cls.from_hex(os.environ[SECRET_ENV])
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        if not secret_file.exists():
            tmp = secret_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(secrets.token_hex(32))
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, secret_file)  # atomic create-if-absent across processes
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        return cls.from_hex(secret_file.read_text())

    @classmethod
    def for_process(cls, secret_file: Path) -> CohortSecret:
        """:meth:`for_device`, shared by every simulated device of this process.

        The rotation ``Q`` (a QR factorization of a d × d matrix, about 35 ms for d = 576)
        is then computed once per process, not once per device: a Ray actor serves
        hundreds of devices in a many-device study.
        """
        return _process_secret(Path(secret_file), os.environ.get(SECRET_ENV, ""))

    def _mac(self, *parts: str) -> bytes:
        msg = "\x1f".join(parts).encode("utf-8")
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def sample_id(self, task: str, text: str) -> bytes:
        """Opaque, stable id of a sample: equal samples give equal ids, nothing else leaks."""
        return self._mac("sample", task, text)[:ID_BYTES]

    def task_key(self, task: str) -> str:
        """Opaque key that announces a task to the server."""
        return self._mac("task", task)[:8].hex()

    def rotation(self, dim: int, name: str = "") -> torch.Tensor:
        """A secret, uniformly random orthogonal matrix (dim × dim), float64.

        ``name=""`` is the mask ``Q``; a task's name gives the gauge of its label basis.
        """
        key = (dim, name)
        if key not in self._rotations:
            parts = ("rotation", str(dim), name) if name else ("rotation", str(dim))
            seed = int.from_bytes(self._mac(*parts)[:8], "little")
            gen = torch.Generator().manual_seed(seed)
            gauss = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
            q, r = torch.linalg.qr(gauss)
            self._rotations[key] = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        return self._rotations[key]


@functools.lru_cache(maxsize=8)
def _process_secret(secret_file: Path, env_hex: str) -> CohortSecret:
    """One :class:`CohortSecret` per (file, environment value) per process."""
    return CohortSecret.for_device(secret_file)
