"""A machine-wide, content-addressed store of backbone outputs at the pivot token.

A simulation study runs the same frozen forwards again and again (every method, order and
seed over the same tasks). The store computes them once per machine: the key is a hash of
(model, layers, prompt), the value the pivot activations, the final hidden state and the
measured forward time, so the device time the protocol would have spent is still accounted.
Entries live under the first two hex digits of their key; the few arrays that depend on the
model alone (:meth:`ActivationStore.model_arrays`) under ``model/``, and the prompts built from
each text (:meth:`ActivationStore.prompts`) under ``prompts/``. Writers in several Ray
actors are safe: each entry is written to a temporary file and renamed into place, so a
reader sees a whole entry or none.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    bytes_written: int = 0
    evicted: int = 0


@dataclass
class ActivationStore:
    """Pivot features on disk under ``root``, capped at ``max_bytes`` (oldest evicted first)."""

    root: Path
    max_bytes: int = 8 * 2**30
    stats: StoreStats = field(default_factory=StoreStats)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def key(self, model: str, layers: Sequence[int], prompt: str, shortcut: str = "pivot") -> str:
        parts = [model, ",".join(map(str, layers)), prompt]
        if shortcut != "pivot":  # the pivot's keys predate the other shortcuts: keep them
            parts.append(shortcut)
        return _digest(parts)

    def _path(self, key: str, folder: str | None = None) -> Path:
        return self.root / (folder or key[:2]) / f"{key}.npz"

    def get(self, key: str, folder: str | None = None) -> dict[str, np.ndarray] | None:
        path = self._path(key, folder)
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (FileNotFoundError, OSError, ValueError):
            return None

    def put(self, key: str, entry: dict[str, np.ndarray], folder: str | None = None) -> None:
        path = self._path(key, folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **entry)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.stats.bytes_written += path.stat().st_size

    def model_arrays(
        self, model: str, name: str, compute: Callable[[], dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """Arrays that depend on the model alone (its label words' LM-head rows, its size),
        computed once per machine like the activations, so that a device whose activations
        all come from the store never loads the weights. Not counted in :attr:`stats`."""
        key = _digest([model, name])
        entry = self.get(key, "model")
        if entry is None:
            entry = compute()
            self.put(key, entry, "model")
        return entry

    def prompts(
        self,
        model: str,
        recipe: str,
        texts: Sequence[str],
        compute: Callable[[list[str]], tuple[list[str], list[int]]],
    ) -> tuple[list[str], list[int]]:
        """Each text's prompt and the prompt's token count; only misses are computed.

        The prompts key the activations, and building one needs the tokenizer (to cut the
        text, to apply the chat template): kept here, a device whose prompts and activations
        all come from the store never imports transformers. ``recipe`` must name everything
        a prompt depends on besides the model and the text (the tokenizer's files and version,
        the task's question, the cut, the prompt format's version). Under the store's cap
        with the activations; not counted in :attr:`stats`.
        """
        keys = [_digest([model, "prompt", recipe, text]) for text in texts]
        found = [self.get(key, "prompts") for key in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            prompts, tokens = compute([texts[i] for i in missing])
            for i, prompt, count in zip(missing, prompts, tokens, strict=True):
                # UTF-8 bytes: numpy's own strings would drop a trailing NUL
                entry = {
                    "prompt": np.frombuffer(prompt.encode(), np.uint8),
                    "tokens": np.int64(count),
                }
                self.put(keys[i], entry, "prompts")
                found[i] = entry
        prompts = [entry["prompt"].tobytes().decode() for entry in found]
        return prompts, [int(entry["tokens"]) for entry in found]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*/*.npz"))

    def enforce_cap(self) -> None:
        """Evict the least recently written entries (activations and prompts) until the store
        fits its cap (the model's own arrays, a few kilobytes written first, stay)."""
        entries = [*activation_files(self.root), *self.root.glob("prompts/*.npz")]
        entries.sort(key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for path in entries:
            if total <= self.max_bytes:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
            self.stats.evicted += 1

    def features(
        self,
        model: str,
        layers: Sequence[int],
        prompts: Sequence[str],
        compute: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, float]],
        shortcut: str = "pivot",
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(acts, final, forward seconds) for ``prompts``; only misses are computed.

        The seconds returned are those the forwards took when first computed, so a run
        that hits the store still accounts the device time of the protocol.
        """
        if not prompts:  # a device with no rows of a split (many devices, few rows)
            return compute([])
        keys = [self.key(model, layers, p, shortcut) for p in prompts]
        found = [self.get(k) for k in keys]
        missing = [i for i, e in enumerate(found) if e is None]
        self.stats.hits += len(prompts) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            acts, final, seconds = compute([prompts[i] for i in missing])
            per_sample = seconds / len(missing)
            for n, i in enumerate(missing):
                entry = {
                    "acts": acts[n].numpy(),
                    "final": final[n].numpy(),
                    "seconds": np.float64(per_sample),
                }
                self.put(keys[i], entry)
                found[i] = entry
            self.enforce_cap()
        acts = torch.from_numpy(np.stack([e["acts"] for e in found]))
        final = torch.from_numpy(np.stack([e["final"] for e in found]))
        return acts, final, float(sum(float(e["seconds"]) for e in found))


def activation_files(root: Path) -> list[Path]:
    """The activation entries under a store's ``root``: one per prompt (and layers, shortcut),
    not the model's arrays nor the prompts kept apart."""
    return list(Path(root).glob("??/*.npz"))


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
