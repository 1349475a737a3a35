"""The attacker's public knowledge: the published backbone, its LM head and prompt template.

An honest-but-curious server runs the same open model the devices run. It can read the last
(normed) layer of the uploaded pivot states through the LM-head rows of label words it knows
or guesses, and it can run the backbone on candidate texts with the public prompt template.
Nothing here touches the devices' secret or their masking code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from flower_pae.backbone import Backbone, load_backbone, select_layers
from flower_pae.data import Task, load_task, resolve_stream
from flower_pae.device.shortcut import build_prompt, label_rows, pivot_features


@dataclass
class PublicModel:
    """The run's backbone as any outsider can load it, with the run's public settings."""

    model: str
    layers_spec: str = "all"
    max_tokens: int = 128
    batch_size: int = 8
    shortcut: str = "pivot"

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> PublicModel:
        return cls(
            model=str(settings.get("model", "smollm2-135m-instruct")),
            layers_spec=str(settings.get("layers", "all")),
            max_tokens=int(settings.get("max_tokens", 128)),
            batch_size=int(settings.get("batch_size", 8)),
            shortcut=str(settings.get("shortcut", "pivot")),
        )

    @functools.cached_property
    def backbone(self) -> Backbone:
        return load_backbone(self.model)

    @functools.cached_property
    def layers(self) -> list[int]:
        return select_layers(self.layers_spec, self.backbone.num_layers)

    @property
    def final_index(self) -> int | None:
        """Position of the backbone's last (normed) layer's pivot state among the uploaded
        layers, if sent (the mean shortcut never sends a pivot state)."""
        if self.shortcut != "pivot":
            return None
        last = self.backbone.num_layers
        return self.layers.index(last) if last in self.layers else None

    def label_rows(self, labels: list[str]) -> np.ndarray:
        """LM-head rows ``W_t`` of a task's label words, (C, d) float64."""
        return label_rows(self.backbone, labels).double().numpy()

    def pivot_activations(self, task: Task, texts: list[str]) -> np.ndarray:
        """What a device would upload for these texts: its shortcut's states (N, L, d), float32."""
        prompts = [build_prompt(self.backbone, task, t, self.max_tokens) for t in texts]
        feats = pivot_features(self.backbone, prompts, self.layers, self.batch_size, self.shortcut)
        return feats.acts.numpy()


def guess_tasks(settings: dict[str, Any], task_keys: list[str]) -> dict[str, Task]:
    """The attacker's guess of which public task each opaque key is.

    The server sees task keys appear in the order of the stream, and in a simulation its own
    configuration names the stream; in a deployment it would have to guess the label words
    (the spectrum of the masked targets gives it the number of classes). Keys are matched
    to the stream's tasks by order of first appearance. Only the task definition (label words,
    instruction) is used by the attacker; the returned tasks carry one row per split.
    """
    specs = resolve_stream(str(settings.get("stream", "pypi")))
    data_dir = str(settings.get("data_dir", "")) or None
    seed = int(settings.get("seed", 0))
    out = {}
    for key, spec in zip(task_keys, specs, strict=False):
        out[key] = load_task(spec, data_dir=data_dir, seed=seed, max_train=1, max_test=1)
    return out
