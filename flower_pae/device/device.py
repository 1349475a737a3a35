"""One simulated device: its data shards, its task schedule, its upload and its evaluation.

Flower-agnostic apart from the records of :mod:`flower_pae.wire`: the ClientApp in
``simulations/client_app.py`` only routes messages here.
"""

from __future__ import annotations

import functools
import random
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flower_pae.backbone import Backbone, cache_dir, load_backbone, select_layers
from flower_pae.config import RunConfig
from flower_pae.data import Task, load_task, partition, resolve_stream
from flower_pae.device.cost import forward_flops
from flower_pae.device.difference import (
    additive_prediction,
    gradient_difference,
    label_basis,
    lift,
    residual,
    unmask,
)
from flower_pae.device.noise import add_target_noise
from flower_pae.device.secret import CohortSecret
from flower_pae.device.shortcut import (
    PROMPT_FORMAT,
    SequenceFeatures,
    build_prompt,
    label_rows,
    pivot_features,
    sequence_features,
)
from flower_pae.device.store import ActivationStore
from flower_pae.wire import encode_activations, from_coefficients, ids_to_array, to_coefficients


@dataclass
class Features:
    """Backbone outputs of a batch of samples, at the pivot token."""

    acts: torch.Tensor  # (N, L, d)
    logits: torch.Tensor  # (N, C) label logits z = W_t·h
    rows: torch.Tensor  # (C, d) label rows W_t
    seconds: float  # forward time (measured when first computed, if from the store)


@dataclass
class Upload:
    """What a device sends for its new training samples (all of it crosses the wire)."""

    task_key: str
    arrays: dict[str, np.ndarray]  # ids, acts (+ scales), targets (coefficients, (N, C))
    forward_seconds: float
    refresh: dict[str, np.ndarray] | None = None  # ids, targets of samples the server holds
    flops: float = 0.0  # estimated FLOPs of the new samples' forward (2·P·tokens)
    basis: np.ndarray | None = None  # the task's masked label basis (d, C), with new samples

    @property
    def num_samples(self) -> int:
        return int(self.arrays["ids"].shape[0])


@dataclass
class TaskEval:
    """A device's local evaluation of one task (only counts cross the wire)."""

    task_key: str
    correct: int
    zero_shot_correct: int
    total: int
    upcoming: bool = False  # not met yet: evaluated only for forward transfer


@functools.lru_cache(maxsize=16)
def _task(spec: str, data_dir: str, seed: int, max_train: int, max_test: int) -> Task:
    return load_task(
        spec, data_dir=data_dir or None, seed=seed, max_train=max_train, max_test=max_test
    )


@functools.lru_cache(maxsize=64)
def _shards(spec: str, cfg_key: tuple, split: str) -> list[list[int]]:
    data_dir, seed, max_train, max_test, num_devices, scheme, alpha = cfg_key
    task = _task(spec, data_dir, seed, max_train, max_test)
    rows = task.train if split == "train" else task.test
    # Test rows are split IID: every device evaluates a fair sample of the test set.
    return partition(
        [ex.label for ex in rows],
        num_devices,
        scheme=scheme if split == "train" else "iid",
        alpha=alpha,
        seed=seed,
    )


@functools.lru_cache(maxsize=64)
def _label_rows(model: str, labels: tuple[str, ...], store: Path | None) -> torch.Tensor:
    """A task's LM-head label rows, once per process (every device a Ray actor serves shares
    them: at N = 1,000 almost every call is a device the actor has not met), and once per
    machine in the activation store under ``store``, if any."""
    if store is None:
        return label_rows(load_backbone(model), labels)
    entry = ActivationStore(store).model_arrays(
        model,
        "label_rows\x1f" + "\x1f".join(labels),
        lambda: {"rows": label_rows(load_backbone(model), labels).numpy()},
    )
    return torch.from_numpy(entry["rows"])


@functools.lru_cache(maxsize=8)
def _matmul_params(model: str, store: Path | None) -> int:
    """``P`` of the FLOPs estimates, once per process, and once per machine in the store."""
    if store is None:
        return load_backbone(model).matmul_params
    entry = ActivationStore(store).model_arrays(
        model, "matmul_params", lambda: {"params": np.int64(load_backbone(model).matmul_params)}
    )
    return int(entry["params"])


@functools.lru_cache(maxsize=64)
def _label_basis(
    secret: CohortSecret, model: str, task_name: str, labels: tuple[str, ...], store: Path | None
) -> torch.Tensor:
    """A task's masked label basis, once per process and cohort secret (the same on every
    device that holds the secret)."""
    q = secret.rotation(load_backbone(model, weights=False).hidden_size)
    gauge = secret.rotation(len(labels), task_name)
    return label_basis(_label_rows(model, labels, store), q, gauge)


@torch.no_grad()
def side_output(
    side_network: torch.nn.Module, acts: torch.Tensor, batch: int = 512
) -> torch.Tensor:
    """The downloaded side network's (masked) output for pivot activations, in batches."""
    if side_network.training:  # eval() walks every module: a millisecond per call
        side_network.eval()
    dtype = next(side_network.parameters()).dtype
    return torch.cat(
        [side_network(acts[i : i + batch].to(dtype)) for i in range(0, len(acts), batch)]
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Device:
    """The device side of PAE for one partition (node) of the federation."""

    def __init__(self, cfg: RunConfig, partition_id: int, secret: CohortSecret | None = None):
        if not 0 <= partition_id < cfg.num_devices:
            raise ValueError(f"partition id {partition_id} outside 0..{cfg.num_devices - 1}")
        self.cfg = cfg
        self.partition_id = partition_id
        self.specs = resolve_stream(cfg.stream)
        self.secret = secret or CohortSecret.for_process(cache_dir() / "cohort_secret")
        rng = random.Random(f"{cfg.seed}:stagger:{partition_id}")
        self.offset = rng.randint(0, cfg.stagger_rounds) if cfg.stagger_rounds else 0

    @functools.cached_property
    def backbone(self) -> Backbone:
        """The frozen backbone; its tokenizer and weights load only when a prompt or a forward
        needs them (neither does with a warm activation store)."""
        return load_backbone(self.cfg.model, weights=False)

    @functools.cached_property
    def layers(self) -> list[int]:
        return select_layers(self.cfg.layers, self.backbone.num_layers)

    # ---- schedule ------------------------------------------------------------------------
    def task_index(self, server_round: int) -> int:
        """Which task of the stream this device trains on in ``server_round`` (1-based)."""
        idx = max(0, server_round - 1 - self.offset) // self.cfg.rounds_per_task
        return min(idx, len(self.specs) - 1)

    def task(self, index: int) -> Task:
        c = self.cfg
        return _task(self.specs[index], c.data_dir, c.seed, c.max_train, c.max_test)

    def task_key(self, index: int) -> str:
        return self.secret.task_key(self.task(index).name)

    def _shard(self, index: int, split: str) -> list:
        c = self.cfg
        key = (c.data_dir, c.seed, c.max_train, c.max_test, c.num_devices, c.partition, c.alpha)
        rows = self.task(index).train if split == "train" else self.task(index).test
        return [rows[i] for i in _shards(self.specs[index], key, split)[self.partition_id]]

    # ---- backbone outputs ----------------------------------------------------------------
    def _prompts(self, task: Task, texts: list[str]) -> tuple[list[str], list[int]]:
        """Each text's prompt (:func:`build_prompt`) and its token count, from the store
        when it holds them."""

        def compute(batch: list[str]) -> tuple[list[str], list[int]]:
            prompts = [build_prompt(self.backbone, task, t, self.cfg.max_tokens) for t in batch]
            return prompts, [len(ids) for ids in self.backbone.tokenizer(prompts).input_ids]

        if not texts:  # a device with no rows of a split: no tokenizer needed
            return [], []
        fingerprint = self.backbone.tokenizer_fingerprint
        if self.store is None or fingerprint is None:
            return compute(texts)
        recipe = [PROMPT_FORMAT, fingerprint, str(self.cfg.max_tokens), task.question("\0")]
        return self.store.prompts(self.cfg.model, "\x1f".join(recipe), texts, compute)

    @functools.cached_property
    def store(self) -> ActivationStore | None:
        if not self.cfg.activation_store:
            return None
        return ActivationStore(
            cache_dir() / "activations", max_bytes=int(self.cfg.store_max_gb * 2**30)
        )

    @property
    def _store_root(self) -> Path | None:
        return self.store.root if self.store is not None else None

    def _label_rows(self, task: Task) -> torch.Tensor:
        """The LM-head rows of a task's label words (computed once per task and process)."""
        return _label_rows(self.cfg.model, tuple(task.labels), self._store_root)

    def features(self, task: Task, texts: list[str]) -> Features:
        """Pivot activations, label logits and forward time of the frozen backbone."""
        return self.prompt_features(task, self._prompts(task, texts)[0])

    def prompt_features(self, task: Task, prompts: list[str]) -> Features:
        """:meth:`features` of prompts already built (:meth:`_prompts`)."""

        def compute(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor, float]:
            f = pivot_features(
                self.backbone, batch, self.layers, self.cfg.batch_size, self.cfg.shortcut
            )
            return f.acts, f.final, f.seconds

        if self.store is not None:
            acts, final, seconds = self.store.features(
                self.cfg.model, self.layers, prompts, compute, self.cfg.shortcut
            )
        else:
            acts, final, seconds = compute(prompts)
        rows = self._label_rows(task)
        return Features(acts, final @ rows.T, rows, seconds)

    def sequence_features(
        self, task: Task, prompts: list[str]
    ) -> tuple[Features, SequenceFeatures]:
        """Every prompt token's states (the "no shortcut" ablation; never from the store),
        and the features the shortcut would have kept of them."""
        seq = sequence_features(self.backbone, prompts, self.layers, self.cfg.batch_size)
        rows = self._label_rows(task)
        feats = Features(seq.summary(self.cfg.shortcut), seq.final @ rows.T, rows, seq.seconds)
        return feats, seq

    # ---- training upload -----------------------------------------------------------------
    @property
    def space(self) -> str:
        """Where the side output is added: probabilities (one-shot) or logits (refresh)."""
        return "logit" if self.cfg.refresh_step > 0 else "prob"

    def label_basis(self, task: Task) -> torch.Tensor:
        """The task's masked label basis ``U_t`` (d, C) float64, the same on every device."""
        labels = tuple(task.labels)
        return _label_basis(self.secret, self.cfg.model, task.name, labels, self._store_root)

    def _differences(
        self,
        feats: Features,
        labels: torch.Tensor,
        side: torch.Tensor | None,
        first_id: bytes,
        basis: torch.Tensor,
    ) -> np.ndarray:
        """Masked prediction differences of a batch, as coefficients in the task's basis.

        One-shot: ``pinv(W_t)·(onehot(y) − softmax(z))``. Refresh: the cross-entropy gradient
        ``W_tᵀ·(onehot(y) − softmax(z + W_t·s))`` against the server's decoded output ``s``
        for each sample (zero for a sample the server has no output for yet). Target noise
        is drawn in all d dimensions; only its part in the label span is sent (the rest
        never reaches a prediction).
        """
        q = self.secret.rotation(self.backbone.hidden_size)
        if self.space == "prob":
            target = lift(feats.rows, residual(feats.logits, labels))
        else:
            if side is None:
                side = torch.zeros(len(labels), self.backbone.hidden_size)
            target = gradient_difference(feats.logits, feats.rows, labels, side)
        target = add_target_noise(
            target, self.cfg.target_noise, self.secret.sample_id("noise", first_id.hex())
        )
        return to_coefficients((target.double() @ q.T).numpy(), basis.numpy())

    def upload(
        self,
        server_round: int,
        held: set[bytes],
        held_side: dict[bytes, np.ndarray] | None = None,
    ) -> Upload:
        """Forward the samples the server does not hold yet and build their masked targets.

        With ``refresh_step > 0`` the server sends ``held_side``, its masked outputs for the
        samples it holds of its current task (as coefficients in the task's label basis);
        those samples get fresh differences against them
        (``Upload.refresh``), with their pivot states from the device's store and no new
        forward pass.
        """
        index = self.task_index(server_round)
        task = self.task(index)
        examples = self._shard(index, "train")
        ids = [self.secret.sample_id(task.name, ex.text) for ex in examples]
        new = [(i, ex) for i, ex in zip(ids, examples, strict=True) if i not in held]
        if self.cfg.samples_per_round:
            new = new[: self.cfg.samples_per_round]
        d = self.backbone.hidden_size
        basis = self.label_basis(task)
        refresh = None
        if self.space == "logit" and held_side:
            old = [(i, ex) for i, ex in zip(ids, examples, strict=True) if i in held_side]
            if old:
                feats = self.features(task, [ex.text for _, ex in old])
                labels = torch.tensor([ex.label for _, ex in old])
                coefficients = np.stack([held_side[i] for i, _ in old])
                masked = torch.from_numpy(from_coefficients(coefficients, basis.numpy()))
                side = unmask(masked, self.secret.rotation(d))
                refresh = {
                    "ids": ids_to_array([i for i, _ in old]),
                    "targets": self._differences(feats, labels, side, old[0][0], basis),
                }
        if not new:
            arrays = encode_activations(torch.zeros(0, len(self.layers), d), self.cfg.precision)
            width = len(task.labels)
            arrays.update(ids=ids_to_array([]), targets=np.zeros((0, width), np.float32))
            if self.cfg.upload_sequence:
                arrays["lengths"] = np.zeros(0, np.int64)
            return Upload(self.task_key(index), arrays, 0.0, refresh)
        prompts, tokens = self._prompts(task, [ex.text for _, ex in new])
        labels = torch.tensor([ex.label for _, ex in new])
        if self.cfg.upload_sequence:  # the "no shortcut" ablation: every token's states
            feats, sequences = self.sequence_features(task, prompts)
            arrays = encode_activations(sequences.states, self.cfg.precision)
            arrays["lengths"] = sequences.lengths.numpy()
        else:
            feats = self.prompt_features(task, prompts)
            arrays = encode_activations(feats.acts, self.cfg.precision)
        arrays.update(
            ids=ids_to_array([i for i, _ in new]),
            targets=self._differences(feats, labels, None, new[0][0], basis),
        )
        flops = forward_flops(_matmul_params(self.cfg.model, self._store_root), sum(tokens))
        upload = Upload(self.task_key(index), arrays, feats.seconds, refresh, flops)
        upload.basis = basis.float().numpy()
        return upload

    # ---- local evaluation ----------------------------------------------------------------
    def test_features(self, index: int, store: dict | None = None) -> dict[str, torch.Tensor]:
        """Backbone outputs of this device's test rows of a task, computed once per device.

        ``store`` is the device's persistent state (Flower's ``Context.state`` in the app).
        """
        name = self.task(index).name
        if store is not None and name in store:
            return store[name]
        examples = self._shard(index, "test")
        feats = self.features(self.task(index), [ex.text for ex in examples])
        out = {
            "acts": feats.acts,
            "logits": feats.logits,
            "labels": torch.tensor([ex.label for ex in examples], dtype=torch.long),
        }
        if store is not None:
            store[name] = out
        return out

    def _side_outputs(
        self, side_network, feats: dict[int, dict[str, torch.Tensor]]
    ) -> dict[int, torch.Tensor]:
        """The side network's (masked) outputs on each task's test rows.

        Every method but the oracle sums all tasks' adapters whatever the task, so all tasks'
        rows go through the network in one batch; the oracle is told each task (``route``).
        """
        if self.cfg.method != "oracle":
            side_network.route = None
            if not feats:
                return {}
            out = side_output(side_network, torch.cat([f["acts"] for f in feats.values()]))
            sizes = [len(f["acts"]) for f in feats.values()]
            return dict(zip(feats, out.split(sizes), strict=True))
        sides = {}
        for index, task_feats in feats.items():
            key = self.task_key(index)
            if key in side_network.task_keys:
                side_network.route = key
                sides[index] = side_output(side_network, task_feats["acts"])
            else:  # the oracle has no adapters for this task yet
                sides[index] = torch.zeros_like(task_feats["acts"][:, 0])
        side_network.route = None
        return sides

    def evaluate(self, server_round: int, side_network, store: dict | None = None):
        """Evaluate the downloaded side network on every task this device has met so far.

        The next task of the stream is evaluated too, reported apart as ``upcoming``: it is
        what forward transfer needs (accuracy on a task before training on it).
        """
        q = self.secret.rotation(self.backbone.hidden_size)
        current = self.task_index(server_round)
        indices = range(min(current + 2, len(self.specs)))
        feats = {i: self.test_features(i, store) for i in indices}
        feats = {i: f for i, f in feats.items() if f["labels"].numel()}
        sides = self._side_outputs(side_network, feats)
        results = []
        for index, task_feats in feats.items():
            side = unmask(sides[index], q)
            rows = self._label_rows(self.task(index))
            pred = additive_prediction(task_feats["logits"], rows, side, self.space)
            results.append(
                TaskEval(
                    task_key=self.task_key(index),
                    correct=int((pred == task_feats["labels"]).sum()),
                    zero_shot_correct=int(
                        (task_feats["logits"].argmax(-1) == task_feats["labels"]).sum()
                    ),
                    total=int(task_feats["labels"].numel()),
                    upcoming=index > current,
                )
            )
        return results
