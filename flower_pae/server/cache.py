"""The server's activation cache: a sample's activations are uploaded once, reused every epoch.

Keyed by opaque sample id; grouped by opaque task key. Blocks (one per upload) stay in memory
up to a byte cap; past it the oldest blocks spill to ``.npz`` files on disk and are read
back when a task trains. Nothing is dropped.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
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
    version: int = 0  # bumped when its targets change (refresh), so checkpoints rewrite it
    serial: int = 0  # unique over the cache's life (also across clear()): names its files


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
        self._where: dict[bytes, tuple[int, int]] = {}  # id -> (block, row)
        self._blocks: list[_Block] = []
        self._next_spill = 0
        self._next_block = 0
        self._checkpointed: dict[int, tuple[int, str]] = {}  # block -> (version, file name)

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
        for row, i in enumerate(itertools.compress(ids, keep)):
            self._ids[i] = task_key
            self._where[i] = (len(self._blocks), row)
        nbytes = sum(v.nbytes for v in block_arrays.values())
        block = _Block(task_key, int(keep.sum()), nbytes, block_arrays, serial=self._next_block)
        self._next_block += 1
        self._blocks.append(block)
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
            path = self.spill_dir / f"block-{self._next_spill:06d}.npz"
            self._next_spill += 1
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

    def _rows_by_block(self, ids: list[bytes]) -> dict[int, tuple[list[int], list[int]]]:
        """``block -> (positions in ids, rows in the block)``; unknown ids are a KeyError."""
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for n, sample_id in enumerate(ids):
            if sample_id not in self._where:
                raise KeyError(f"sample {sample_id.hex()} is not cached")
            block, row = self._where[sample_id]
            groups.setdefault(block, ([], []))[0].append(n)
            groups[block][1].append(row)
        return groups

    def activations(self, ids: list[bytes]) -> torch.Tensor:
        """Cached activations (float32, (len(ids), L, d)) of the given samples, in that order."""
        parts: list[tuple[list[int], torch.Tensor]] = []
        for block, (pos, rows) in self._rows_by_block(ids).items():
            arrays = self._block_arrays(self._blocks[block])
            picked = {k: v[rows] for k, v in arrays.items() if k in ("acts", "scales")}
            parts.append((pos, decode_activations(picked)))
        if not parts:
            raise ValueError("activations() needs at least one id")
        out = torch.empty((len(ids), *parts[0][1].shape[1:]))
        for pos, acts in parts:
            out[pos] = acts
        return out

    def set_targets(self, ids: list[bytes], targets: np.ndarray) -> None:
        """Replace the masked targets of cached samples (the refresh phase); spilled blocks are
        rewritten on disk, so the memory cap still holds."""
        targets = np.asarray(targets, dtype=np.float32)
        for block_index, (pos, rows) in self._rows_by_block(ids).items():
            block = self._blocks[block_index]
            arrays = self._block_arrays(block)
            arrays["targets"][rows] = targets[pos]
            block.version += 1
            if block.arrays is None:
                np.savez(block.path, **arrays)

    def task_of(self, sample_id: bytes) -> str:
        """The task key a cached sample was uploaded under."""
        return self._ids[sample_id]

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

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, directory: Path) -> dict:
        """Write what changed since the last checkpoint into ``directory``; return the index.

        Blocks are written once, and again only when their targets change (the refresh phase),
        each version to its own file, so the previous checkpoint stays readable until the new
        index is committed; :meth:`prune_checkpoint` then removes superseded files. Spilled
        blocks are copied from their spill files (which later rounds may rewrite), without
        counting as disk reads. Returns a JSON-able index for :meth:`restore`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        blocks = []
        for index, block in enumerate(self._blocks):
            saved = self._checkpointed.get(index)
            if saved is None or saved[0] != block.version:
                name = f"block-{block.serial:06d}-v{block.version}.npz"
                tmp = directory / f".{name}.tmp"
                if block.arrays is not None:
                    with open(tmp, "wb") as fh:
                        np.savez(fh, **block.arrays)
                else:
                    shutil.copyfile(block.path, tmp)
                os.replace(tmp, directory / name)
                self._checkpointed[index] = (block.version, name)
            blocks.append(
                {
                    "task_key": block.task_key,
                    "num_samples": block.num_samples,
                    "nbytes": block.nbytes,
                    "version": block.version,
                    "serial": block.serial,
                    "file": self._checkpointed[index][1],
                    "spill": block.path.name if block.arrays is None else None,
                }
            )
        return {
            "blocks": blocks,
            "stats": self.stats.as_dict(),
            "next_spill": self._next_spill,
            "next_block": self._next_block,
        }

    def prune_checkpoint(self, directory: Path) -> None:
        """Remove block files of ``directory`` that the last :meth:`checkpoint` superseded."""
        keep = {name for _, name in self._checkpointed.values()}
        for path in Path(directory).glob("block-*.npz"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def restore(self, directory: Path, index: dict) -> None:
        """Load a checkpoint written by :meth:`checkpoint` into this (empty) cache.

        Blocks that were in memory come back into memory; spilled blocks are copied back to
        their spill files, so the cache's figures continue exactly where they were.
        """
        if self._blocks:
            raise RuntimeError("restore() needs an empty cache")
        directory = Path(directory)
        for number, entry in enumerate(index["blocks"]):
            source = directory / entry["file"]
            if not source.is_file():
                raise FileNotFoundError(f"checkpoint block {source} is missing")
            block = _Block(entry["task_key"], int(entry["num_samples"]), int(entry["nbytes"]), None)
            block.version = int(entry["version"])
            block.serial = int(entry["serial"])
            with np.load(source) as data:
                if entry["spill"] is None:
                    block.arrays = {k: data[k] for k in data.files}
                    ids = block.arrays["ids"]
                else:
                    ids = data["ids"]
            if entry["spill"] is not None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                block.path = self.spill_dir / entry["spill"]
                shutil.copyfile(source, block.path)
            for row, sample_id in enumerate(array_to_ids(ids)):
                self._ids[sample_id] = block.task_key
                self._where[sample_id] = (number, row)
            self._blocks.append(block)
            self._checkpointed[number] = (block.version, entry["file"])
        self.stats = CacheStats(**index["stats"])
        self._next_spill = int(index["next_spill"])
        self._next_block = int(index["next_block"])

    def clear(self) -> None:
        """Forget every sample (the "no cache" ablation: the server keeps no activations from
        one round to the next). Spill files go; the cumulative counters stay."""
        for block in self._blocks:
            if block.path is not None:
                block.path.unlink(missing_ok=True)
        self._ids.clear()
        self._where.clear()
        self._blocks.clear()
        self._checkpointed.clear()
        self.stats.samples = 0
        self.stats.bytes_in_memory = 0
        self.stats.bytes_on_disk = 0
