"""The server's activation cache: a sample's activations are uploaded once, reused every epoch.

Keyed by opaque sample id; grouped by opaque task key. Blocks (one per upload) stay in memory
up to a byte cap; past it the oldest blocks spill to ``.npz`` files on disk and are read
back when a task trains. Nothing is dropped.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flower_pae.wire import array_to_ids, decode_activations

log = logging.getLogger(__name__)


@dataclass
class _Block:
    task_key: str
    num_samples: int
    nbytes: int
    arrays: dict[str, np.ndarray] | None  # None once spilled
    path: Path | None = None


@dataclass
class CacheStats:
    """Counters a user can read off the run outputs."""

    samples: int = 0
    duplicates_rejected: int = 0
    bytes_in_memory: int = 0
    bytes_on_disk: int = 0
    spilled_blocks: int = 0
    disk_reads: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class ActivationCache:
    """Opaque id → (activations, masked target, task key), with a memory cap and disk spill."""

    spill_dir: Path
    memory_cap_bytes: int = 512 * 2**20
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self._ids: dict[bytes, str] = {}
        self._blocks: list[_Block] = []
        self._counter = itertools.count()

    def __contains__(self, sample_id: bytes) -> bool:
        return sample_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def task_size(self, task_key: str) -> int:
        return sum(b.num_samples for b in self._blocks if b.task_key == task_key)

    def add(self, task_key: str, arrays: dict[str, np.ndarray]) -> int:
        """Store an upload's new samples; ids already held are rejected. Returns samples kept."""
        ids = array_to_ids(arrays["ids"])
        seen: set[bytes] = set()
        keep = np.zeros(len(ids), dtype=bool)
        for n, sample_id in enumerate(ids):
            keep[n] = sample_id not in self._ids and sample_id not in seen
            seen.add(sample_id)
        self.stats.duplicates_rejected += int((~keep).sum())
        if not keep.any():
            return 0
        block_arrays = {k: np.ascontiguousarray(v[keep]) for k, v in arrays.items()}
        for i in itertools.compress(ids, keep):
            self._ids[i] = task_key
        nbytes = sum(v.nbytes for v in block_arrays.values())
        self._blocks.append(_Block(task_key, int(keep.sum()), nbytes, block_arrays))
        self.stats.samples += int(keep.sum())
        self.stats.bytes_in_memory += nbytes
        self._spill_to_cap()
        return int(keep.sum())

    def _spill_to_cap(self) -> None:
        for block in self._blocks:
            if self.stats.bytes_in_memory <= self.memory_cap_bytes:
                return
            if block.arrays is None:
                continue
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"block-{next(self._counter):06d}.npz"
            np.savez(path, **block.arrays)
            block.path, block.arrays = path, None
            self.stats.bytes_in_memory -= block.nbytes
            self.stats.bytes_on_disk += block.nbytes
            self.stats.spilled_blocks += 1

    def _block_arrays(self, block: _Block) -> dict[str, np.ndarray]:
        if block.arrays is not None:
            return block.arrays
        self.stats.disk_reads += 1
        with np.load(block.path) as data:
            return {k: data[k] for k in data.files}

    def task_ids(self, task_key: str) -> list[bytes]:
        return [i for i, k in self._ids.items() if k == task_key]

    def training_data(self, task_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached (activations float32 (N, L, d), masked targets (N, d)) of a task."""
        acts, targets = [], []
        for block in self._blocks:
            if block.task_key != task_key:
                continue
            arrays = self._block_arrays(block)
            acts.append(decode_activations(arrays))
            targets.append(torch.from_numpy(np.asarray(arrays["targets"], dtype=np.float32)))
        if not acts:
            raise KeyError(f"no cached samples for task {task_key}")
        return torch.cat(acts), torch.cat(targets)
