"""PAE MobiLLM's assisting server as a Flower strategy, with OA-Adapter task subspaces.

Each round: sampled devices upload the activations and masked prediction differences of
samples the server does not cache yet; the server trains the additive side network on its
cache of the current task; then devices download the side network and report accuracy
counts. A device announces a task only by an opaque key: a new key opens a new OA-Adapter
subspace and freezes the previous task's.

Every reply is checked before it touches anything (``flower_pae.server.validation``): a
reply that breaks the protocol is rejected with a logged reason and the round goes on with
the others. With ``checkpoint_every`` the whole server state is checkpointed into the run
directory, and :meth:`PAEStrategy.resume` continues a stopped run where it stopped.
"""

from __future__ import annotations

import copy
import importlib
import logging
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore.inflatable.inflatable_object import no_object_id_recompute

from flower_pae import cl_metrics
from flower_pae.runlog import RunRecorder
from flower_pae.server.cache import ActivationCache
from flower_pae.server.checkpoint import CheckpointError, load_state, save_state
from flower_pae.server.robust import clip_target_norms, disagreeing_devices
from flower_pae.server.validation import (
    EVALUATE_RECORDS,
    MAX_SAMPLES_PER_UPLOAD,
    MAX_UPLOAD_BYTES,
    TRAIN_RECORDS,
    UploadError,
    check_device_metrics,
    check_record_size,
    check_records,
    decode_arrays,
    evaluation_counts,
    summarize_sequence_upload,
    task_key_of,
    validate_basis,
    validate_refresh,
    validate_upload,
)
from flower_pae.side_network import LadderSideNetwork, SideNetworkTrainer, TrainerConfig
from flower_pae.wire import (
    BASIS,
    CONFIG,
    DOWNLOAD_PRECISIONS,
    HELD,
    METRICS,
    REFRESH,
    SHORTCUTS,
    UPLOAD,
    array_record,
    array_to_ids,
    from_coefficients,
    ids_to_array,
    side_network_records,
    to_coefficients,
)

log = logging.getLogger("flower_pae")

# The side network's input standardizer: in a lossy download it travels as float16.
STANDARDIZER = ("input_mean", "input_std")


@dataclass
class _TaskLog:
    """What the server knows of one task: its key, when it started and ended training."""

    key: str
    first_round: int
    last_round: int


@dataclass
class TrainReply:
    """A training reply that passed every check: what the server may take from it."""

    task_key: str
    arrays: dict[str, np.ndarray]  # targets decoded to masked vectors (N, d)
    shape: tuple[int, int] | None  # (layers, hidden) of its activations, None if empty
    refresh: tuple[list[bytes], np.ndarray] | None  # refreshed (ids, masked gradients (N, d))
    basis: np.ndarray | None = None  # the task's label basis it sent (d, C), if any


class PAEStrategy(Strategy):
    """Server-assisted additive side-tuning (PAE MobiLLM) with OA-Adapter subspaces.

    Parameters
    ----------
    make_network : Callable[[int, int], LadderSideNetwork]
        Builds the additive side network for (layers, hidden size) once the first upload
        shows them: the server never loads the backbone. Its last map writes into the
        devices' masked space.
    trainer : TrainerConfig
        How the server trains the side network on its cache each round.
    cache : ActivationCache
        Activations and masked targets, uploaded once per sample.
    recorder : RunRecorder
        Writes every message and metric into the run directory.
    devices_per_round : int
        Devices sampled for training each round (0: all).
    fraction_evaluate : float
        Fraction of devices that evaluate each round.
    num_devices : int
        Devices to wait for before the first round.
    seed : int
        Seed of device sampling.
    replay : bool
        Train on every task cached so far, not only the current one (the "multitask" upper
        bound: full replay; PAE and OA-Adapter do not replay).
    route_by_task : bool
        Train each task's adapters alone (the "oracle" upper bound, whose devices are told
        the task at inference).
    evaluate_every : int
        Evaluate every this many rounds (1: every round); the last round and every multiple of
        ``task_rounds`` (the end of each task, when devices move together) always evaluate,
        since the accuracy matrix is read there. Saves a side-network download per device.
    task_rounds : int
        Rounds per task of an aligned schedule (0: unknown).
    refresh_step : float
        0: one-shot differences, uploaded once per sample. ``η > 0``: the refresh phase of
        DESIGN.md: training messages carry the server's masked outputs ``s̃`` for the samples
        it holds of that device (:meth:`held_outputs`), devices answer with masked
        cross-entropy gradients ``g̃`` against them, and the server regresses on ``s̃ + η·g̃``
        (one functional gradient step per round).
    clip_targets : float
        Poisoning defence: before each round's training, every target's norm is clipped at
        this many times the median target norm of its task (0: off). Norms survive the
        devices' rotation, so the masked training stays exact.
    agreement_neighbours : int
        Poisoning defence against flipped differences (0: off): devices whose differences
        point, on average, against the mean difference of the ``k`` most similar samples
        (last layer's pivot state) of other devices are left out of the round's training
        (:func:`~flower_pae.server.robust.disagreeing_devices`). One-shot: on each task's
        cached differences; refresh phase: on the round's gradients (an excluded device's
        samples get no step). Cosines survive the rotation, so masked training stays exact.
    keep_activations : bool
        ``False`` is the "no cache" ablation: after each round's training the server forgets
        the samples (activations, targets, which device holds what), so devices forward and
        upload every sample again every round. One-shot differences only (the refresh phase
        needs the server's outputs for the samples it holds).
    sequence_shortcut : {"pivot", "mean"}, optional
        The "no shortcut" ablation: devices upload every prompt token's states, and the server
        keeps of each prompt what this shortcut keeps (the side network is token-wise, so its
        output at the pivot reads nothing else). ``None`` (the protocol) refuses such uploads.
    download_precision : {"fp16", "fp32", "int8"}
        How the side network's weight matrices travel to evaluating devices: ``"fp16"``
        halves the download, ``"int8"`` (one float16 scale per row) quarters it; with either,
        the standardizer travels as float16 too. The device computes in float32; gates,
        thresholds and the protected directions always travel as float32, so which
        dimensions are active and which outputs are protected is exactly the server's.
    max_upload_samples, max_upload_bytes : int
        Caps on one reply's upload (and refresh) record; a larger one is rejected unread.
    checkpoint_dir : Path, optional
        Where :meth:`save_checkpoint` writes and :meth:`resume` reads the server's state.
    checkpoint_every : int
        Checkpoint after every this many rounds, and after the last (0: never).
    stop_after : int
        Stop after this round, checkpointed, as if the run had been interrupted there
        (0: run every round); :meth:`resume` continues it.
    overlap : bool
        Let rounds overlap where the results cannot tell (:meth:`start`): the devices upload
        the next round's samples, and evaluate the last round's network, while the server
        trains. ``False`` runs each round's phases one after another.
    """

    def __init__(
        self,
        make_network: Callable[[int, int], LadderSideNetwork],
        trainer: TrainerConfig,
        cache: ActivationCache,
        recorder: RunRecorder,
        *,
        devices_per_round: int = 0,
        fraction_evaluate: float = 1.0,
        num_devices: int = 1,
        seed: int = 0,
        replay: bool = False,
        route_by_task: bool = False,
        refresh_step: float = 0.0,
        evaluate_every: int = 1,
        task_rounds: int = 0,
        clip_targets: float = 0.0,
        agreement_neighbours: int = 0,
        download_precision: str = "fp16",
        keep_activations: bool = True,
        sequence_shortcut: str | None = None,
        max_upload_samples: int = MAX_SAMPLES_PER_UPLOAD,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        checkpoint_dir: Path | None = None,
        checkpoint_every: int = 0,
        stop_after: int = 0,
        overlap: bool = True,
    ) -> None:
        if refresh_step < 0:
            raise ValueError(f"refresh_step must be >= 0, got {refresh_step}")
        if clip_targets < 0:
            raise ValueError(f"clip_targets must be >= 0, got {clip_targets}")
        if download_precision not in DOWNLOAD_PRECISIONS:
            raise ValueError(
                f"download_precision must be one of {DOWNLOAD_PRECISIONS}, "
                f"got {download_precision!r}"
            )
        if sequence_shortcut not in (None, *SHORTCUTS):
            raise ValueError(f"sequence_shortcut must be one of {SHORTCUTS} or None")
        if not keep_activations and refresh_step:
            raise ValueError("keep_activations=False needs one-shot differences (refresh_step=0)")
        if agreement_neighbours < 0:
            raise ValueError(f"agreement_neighbours must be >= 0, got {agreement_neighbours}")
        if checkpoint_every < 0 or stop_after < 0:
            raise ValueError("checkpoint_every and stop_after must be >= 0")
        if (checkpoint_every or stop_after) and checkpoint_dir is None:
            raise ValueError("checkpoint_every and stop_after need a checkpoint_dir")
        self.refresh_step = refresh_step
        self.evaluate_every = evaluate_every
        self.task_rounds = task_rounds
        self.clip_targets = clip_targets
        self.agreement_neighbours = agreement_neighbours
        self.download_precision = download_precision
        self.keep_activations = keep_activations
        self.sequence_shortcut = sequence_shortcut
        self.max_upload_samples = max_upload_samples
        self.max_upload_bytes = max_upload_bytes
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.stop_after = stop_after
        self.overlap = overlap
        self.completed_rounds = 0
        self._round_clock = time.perf_counter()  # when the last round closed
        # what a checkpoint taken between rounds leaves out (see start)
        self._pending: dict | None = None
        self._nodes: list[int] | None = None  # the devices of the run (for checkpoints)
        self.replay = replay
        self.route_by_task = route_by_task
        self.make_network = make_network
        self.net: LadderSideNetwork | None = None
        self.trainer_config = trainer
        self.trainer: SideNetworkTrainer | None = None
        self.cache = cache
        self.recorder = recorder
        self.devices_per_round = devices_per_round
        self.fraction_evaluate = fraction_evaluate
        self.num_devices = num_devices
        self.rng = random.Random(seed)
        self.tasks: dict[str, _TaskLog] = {}
        self.held: dict[int, set[bytes]] = defaultdict(set)
        self.uploader: dict[bytes, int] = {}  # cached sample -> the device that first sent it
        self.bases: dict[str, np.ndarray] = {}  # task key -> masked label basis (d, C)
        self.rejected: list[dict] = []
        self.expected_shape: tuple[int, int] | None = None
        self.accuracy: dict[int, dict[str, float]] = {}
        self.upcoming: dict[int, dict[str, float]] = {}
        self.zero_shot: dict[str, float] = {}

    # ---- hooks ----------------------------------------------------------------------------
    def should_evaluate(self, server_round: int, num_rounds: int) -> bool:
        """Evaluate every ``evaluate_every`` rounds, at every task end and in the last round."""
        return (
            self.evaluate_every <= 1
            or server_round % self.evaluate_every == 0
            or server_round == num_rounds
            or (self.task_rounds > 0 and server_round % self.task_rounds == 0)
        )

    def sample_nodes(self, grid: Grid, count: int) -> list[int]:
        """Devices for a phase; override for availability models."""
        nodes = sorted(grid.get_node_ids())
        if count <= 0 or count >= len(nodes):
            return nodes
        return sorted(self.rng.sample(nodes, count))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask each sampled device for its new samples, telling it which ids we hold."""
        nodes = self.sample_nodes(grid, self.devices_per_round)
        return self.upload_messages(server_round, nodes, config)

    def upload_messages(
        self, server_round: int, nodes: list[int], config: ConfigRecord
    ) -> list[Message]:
        """One upload request per device of ``nodes``, with the ids the server holds of it."""
        messages = []
        for node in nodes:
            held = sorted(self.held[node])
            record = {"ids": ids_to_array(held)}
            current = self.net.current_task if self.net is not None else None
            if self.refresh_step and current in self.bases:
                # the refresh phase: the server's own (masked) outputs for the samples it holds
                # of the task it trains, all a device needs for their cross-entropy gradient
                # (not the whole network), as coefficients in the task's basis
                side_ids = [i for i in held if self.cache.task_of(i) == current]
                side = to_coefficients(self.held_outputs(side_ids), self.bases[current])
                record.update(side_ids=ids_to_array(side_ids), side=side)
            content = RecordDict(
                {
                    CONFIG: ConfigRecord({**config, "round": server_round}),
                    HELD: array_record(record),
                }
            )
            messages.append(Message(content, dst_node_id=node, message_type="train"))
        return messages

    @torch.no_grad()
    def held_outputs(self, ids: list[bytes]) -> np.ndarray:
        """The side network's current masked outputs ``s̃`` (float32, (len(ids), d)) for cached
        samples, each through its own task's adapters where tasks are routed (the oracle)."""
        was_training = self.net.training
        self.net.eval()
        out = np.zeros((len(ids), self.net.out_dim), np.float32)
        by_task: dict[str, list[int]] = defaultdict(list)
        for n, sample_id in enumerate(ids):
            by_task[self.cache.task_of(sample_id)].append(n)
        for task_key, rows in by_task.items():
            self.net.route = task_key if self.route_by_task else None
            acts = self.cache.activations([ids[n] for n in rows]).to(self.net.alpha.dtype)
            out[rows] = self.net(acts).float().numpy()
        self.net.route = None
        self.net.train(was_training)
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Cache the uploads, open/freeze task subspaces, then train the current task
        (:meth:`cache_uploads`, then :meth:`train_cached`)."""
        return self.train_cached(server_round, self.cache_uploads(server_round, replies))

    def cache_uploads(self, server_round: int, replies: Iterable[Message]) -> dict[str, float]:
        """Check and cache a round's uploads, opening task subspaces as devices meet tasks.

        A reply that fails a check (:meth:`accept_train_reply`) is rejected with its reason
        and changes nothing; the others are cached. Returns the round's metrics so far.
        """
        # In node order, not arrival order: the cache's blocks, hence the order of the training
        # data (batches, the standardizer's sums), must not depend on which device was faster.
        replies = sorted(replies, key=lambda reply: reply.metadata.src_node_id)
        expected = self.expected_shape or self.agreed_shape(replies)
        new_samples = 0
        differences: list[tuple[int, str, list[bytes], np.ndarray, bool]] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning(
                    "round %d: device %d failed: %s", server_round, node, reply.error.reason
                )
                continue
            try:
                accepted = self.accept_train_reply(reply, expected)
            except UploadError as err:
                self._reject(server_round, reply, "train", str(err))
                continue
            if self.net is None and accepted.shape is not None:
                self._open_network(accepted.shape)
            task_key, arrays = accepted.task_key, accepted.arrays
            if accepted.basis is not None:
                self.bases.setdefault(task_key, accepted.basis)
            ids = array_to_ids(arrays["ids"])
            if self.net is None or (task_key not in self.tasks and not ids):
                # nothing to learn from: a task key opens a subspace only with samples
                self._record_device_metrics(server_round, reply, task_key)
                continue
            self._see_task(task_key, server_round)
            fresh = self._fresh_rows(ids)
            kept = self.cache.add(task_key, arrays)
            if len(ids) > kept:
                # replayed ids (already cached): the cache keeps what it holds, and counts them
                log.info(
                    "round %d: device %d replayed %d cached sample(s); ignored",
                    server_round,
                    node,
                    len(ids) - kept,
                )
                self.recorder.metric(
                    server_round, "replayed_samples", len(ids) - kept, task=task_key, node_id=node
                )
            self.held[node].update(i for i in ids if i in self.cache)
            fresh_ids = [ids[n] for n in fresh]
            self.uploader.update(dict.fromkeys(fresh_ids, node))
            new_samples += kept
            if self.refresh_step:
                differences.append((node, task_key, fresh_ids, arrays["targets"][fresh], True))
                if accepted.refresh is not None:
                    differences.append((node, task_key, *accepted.refresh, False))
            self._record_device_metrics(server_round, reply, task_key)
        metrics = {"new_samples": new_samples}
        if differences:
            refreshed, excluded = self.apply_differences(differences)
            metrics["refreshed_samples"] = refreshed
            if self.agreement_neighbours:
                metrics["excluded_devices"] = len(excluded)
        return metrics

    def train_cached(
        self, server_round: int, metrics: dict[str, float]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Train the current task on its cached samples; record the round's ``metrics``."""
        current = self.net.current_task if self.net is not None else None
        if current is not None and self.cache.task_size(current) > 0:
            self.tasks[current].last_round = server_round
            acts, targets, defence = self.training_data(current)
            self.net.route = current if self.route_by_task else None
            if not self.net.standardizer_fitted:
                self.net.fit_standardizer(acts)
            start = time.perf_counter()
            losses = self.trainer.fit(acts, targets)
            metrics.update(
                train_seconds=time.perf_counter() - start,
                train_loss=float(losses["loss"][-1]),
                train_samples=len(acts),
            )
            metrics.update(defence)
        for name, value in metrics.items():
            self.recorder.metric(server_round, name, value, task=current)
        for name, value in self.cache.stats.as_dict().items():
            self.recorder.metric(server_round, f"cache_{name}", value)
        if not self.keep_activations:
            self.forget_samples()
        return None, MetricRecord(metrics)

    def forget_samples(self) -> None:
        """The "no cache" ablation: drop every cached sample and what devices are known to
        hold, so the next round's devices upload all of theirs again."""
        self.cache.clear()
        self.held.clear()
        self.uploader.clear()

    def agreed_shape(self, replies: list[Message]) -> tuple[int, int] | None:
        """The activation shape most of this call's uploads declare, while none is fixed.

        The first uploads fix the (layers, hidden) shape every later upload must have; taking
        the majority (ties: the first seen) keeps one bad first reply from fixing a wrong one.
        """
        shapes = []
        for reply in replies:
            try:
                shape = tuple(int(v) for v in reply.content[UPLOAD]["acts"].shape)
            except Exception:  # no upload, not an array record, ...: its own checks reject it
                continue
            if len(shape) == 3 and shape[0] > 0:
                shapes.append(shape[1:])
        return Counter(shapes).most_common(1)[0][0] if shapes else None

    def accept_train_reply(
        self, reply: Message, expected: tuple[int, int] | None = None
    ) -> TrainReply:
        """Every check of a training reply, with no side effect; raises :class:`UploadError`.

        The phase, the record names and types, the task key, the size caps (before decoding),
        the upload's keys, shapes, dtypes and finiteness, the device's figures and, in the
        refresh phase, the refresh record (only samples this device uploaded before).
        """
        phase = reply.metadata.message_type
        if phase != "train":
            raise UploadError(f"a {phase!r} reply in the training phase")
        content = reply.content
        check_records(content, "train", TRAIN_RECORDS, {UPLOAD, CONFIG})
        task_key = task_key_of(content[CONFIG])
        caps = {"max_samples": self.max_upload_samples, "max_bytes": self.max_upload_bytes}
        check_record_size(content[UPLOAD], "upload", **caps)
        arrays = decode_arrays(content[UPLOAD], "upload")
        if "lengths" in arrays:
            arrays = summarize_sequence_upload(arrays, self.sequence_shortcut)
        expected = self.expected_shape or expected
        known = self.bases.get(task_key)
        sent = None
        if BASIS in content:
            check_record_size(content[BASIS], "basis record", **caps)
            hidden = _hidden_size(arrays, expected)
            if hidden is None:
                raise UploadError("a basis record without activations that fix its size")
            sent = validate_basis(decode_arrays(content[BASIS], "basis"), hidden, known)
        basis = sent if sent is not None else known
        width = None if basis is None else basis.shape[1]
        shape = validate_upload(arrays, task_key, expected, self.max_upload_samples, width)
        if METRICS in content:
            check_device_metrics(content[METRICS])
        refresh = None
        if REFRESH in content:
            if not self.refresh_step or shape is None or basis is None:
                raise UploadError("refresh record sent outside the refresh phase")
            check_record_size(content[REFRESH], "refresh record", **caps)
            refreshed = decode_arrays(content[REFRESH], "refresh")
            validate_refresh(refreshed, basis.shape[1], self.max_upload_samples)
            ids = array_to_ids(refreshed["ids"])
            held = self.held.get(reply.metadata.src_node_id, set())
            foreign = sum(i not in held or i not in self.cache for i in ids)
            if foreign:
                raise UploadError(f"refresh for {foreign} sample(s) this device never uploaded")
            if any(self.cache.task_of(i) != task_key for i in ids):
                raise UploadError("refresh for samples of another task than the reply's")
            refresh = (ids, from_coefficients(refreshed["targets"], basis))
        arrays_shape = (int(arrays["acts"].shape[1]), int(arrays["acts"].shape[2]))
        if basis is not None:
            arrays["targets"] = from_coefficients(arrays["targets"], basis)
        else:  # no samples (validate_upload): nothing to decode
            arrays["targets"] = np.zeros((0, arrays_shape[1]), np.float32)
        n = len(arrays["ids"])
        return TrainReply(task_key, arrays, arrays_shape if n else None, refresh, sent)

    def _fresh_rows(self, ids: list[bytes]) -> list[int]:
        """Rows of an upload whose ids the cache does not hold yet (first occurrence)."""
        seen: set[bytes] = set()
        rows = []
        for n, sample_id in enumerate(ids):
            if sample_id not in self.cache and sample_id not in seen:
                rows.append(n)
            seen.add(sample_id)
        return rows

    def training_data(self, current: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """What the server trains on this round: the current task's cache (or all, with replay).

        Returns activations and targets (after :meth:`defend_targets`, task by task) and what
        the defences did (their metrics, summed over tasks; empty when they are off).
        """
        keys = [k for k in self.tasks if self.cache.task_size(k)] if self.replay else [current]
        acts, targets, defence = [], [], Counter()
        for key in keys:
            a, t = self.cache.training_data(key)
            a, t, report = self.defend_targets(key, a, t)
            acts.append(a)
            targets.append(t)
            defence.update(report)
        return torch.cat(acts), torch.cat(targets), dict(defence)

    def defend_targets(
        self, task_key: str, acts: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """Poisoning defences on one task's cached samples, before training on them.

        Norm clipping at ``clip_targets`` × the median norm, then (one-shot differences only:
        refreshed targets are the server's outputs plus a step, checked in
        :meth:`apply_differences`) the rows of the devices that :func:`disagreeing_devices`
        names are left out. Override for another defence; it must depend on norms and
        cosines of targets (rotation-invariant figures) only, or masked training stops being
        exact.
        """
        report: dict[str, int] = {}
        if self.clip_targets:
            targets, report["clipped_targets"] = clip_target_norms(targets, self.clip_targets)
        if self.agreement_neighbours and not self.refresh_step:
            owners = torch.tensor([self.uploader[i] for i in self.cache.task_ids(task_key)])
            excluded = disagreeing_devices(acts[:, -1], targets, owners, self.agreement_neighbours)
            keep = ~torch.isin(owners, torch.tensor(excluded, dtype=owners.dtype))
            acts, targets = acts[keep], targets[keep]
            report["excluded_devices"] = len(excluded)
            report["excluded_samples"] = int((~keep).sum())
            if excluded:
                log.warning(
                    "task %s: left out %d device(s) whose differences disagree with their "
                    "neighbours': %s",
                    task_key,
                    len(excluded),
                    excluded,
                )
        return acts, targets, report

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the side network to a fraction of devices for local evaluation."""
        return self.evaluate_messages(server_round, self.evaluation_nodes(grid), config)

    def evaluation_nodes(self, grid: Grid) -> list[int]:
        """The devices that evaluate this round (none before :attr:`can_evaluate`)."""
        if not self.can_evaluate:
            return []
        count = max(1, round(self.fraction_evaluate * len(list(grid.get_node_ids()))))
        return self.sample_nodes(grid, count)

    @property
    def can_evaluate(self) -> bool:
        """Whether there is a side network to send (the first trained round makes one)."""
        return self.net is not None

    def evaluate_messages(
        self, server_round: int, nodes: list[int], config: ConfigRecord
    ) -> list[Message]:
        """The side network, packed once, in one evaluation request per device of ``nodes``."""
        if not nodes:
            return []
        matrices = {name for name, p in self.net.named_parameters() if p.ndim >= 2}
        # packed once: every device gets the same network (the records are only read)
        packed = side_network_records(
            self.net.meta(),
            self.net.state_dict(),
            matrices,
            self.download_precision,
            halved=STANDARDIZER,
        )
        messages = []
        for node in nodes:
            content = RecordDict(dict(packed.items()))
            content[CONFIG] = ConfigRecord({**config, "round": server_round})
            messages.append(Message(content, dst_node_id=node, message_type="evaluate"))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Sum devices' correct/total counts per task into accuracies."""
        sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
        upcoming: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
        for reply in sorted(replies, key=lambda reply: reply.metadata.src_node_id):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning(
                    "round %d: evaluation on device %d failed: %s",
                    server_round,
                    node,
                    reply.error.reason,
                )
                continue
            try:
                seen, ahead = self.accept_evaluate_reply(reply)
            except UploadError as err:
                self._reject(server_round, reply, "evaluate", str(err))
                continue
            for key, counts in ahead.items():
                upcoming[key] += counts
            for key, counts in seen.items():
                sums[key] += counts
                if counts[2]:
                    self.recorder.metric(
                        server_round, "accuracy", counts[0] / counts[2], task=key, node_id=node
                    )
        out = {}
        for key, (correct, zero_shot, total) in upcoming.items():
            if total:
                self.upcoming.setdefault(server_round, {})[key] = correct / total
                self.recorder.metric(server_round, "upcoming_accuracy", correct / total, task=key)
                self.zero_shot.setdefault(key, zero_shot / total)
        for key, (correct, zero_shot, total) in sums.items():
            if not total:
                continue
            out[f"{key}/accuracy"] = correct / total
            self.accuracy.setdefault(server_round, {})[key] = correct / total
            self.recorder.metric(server_round, "accuracy", correct / total, task=key)
            self.recorder.metric(server_round, "zero_shot_accuracy", zero_shot / total, task=key)
            self.recorder.metric(server_round, "test_samples", total, task=key)
            self.zero_shot.setdefault(key, zero_shot / total)
        return MetricRecord(out) if out else None

    def accept_evaluate_reply(
        self, reply: Message
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Checks of an evaluation reply: the phase, only a metrics record, valid counts.

        Returns ``(counts of tasks met, counts of the upcoming task)`` as
        :func:`~flower_pae.server.validation.evaluation_counts` parses them.
        """
        phase = reply.metadata.message_type
        if phase != "evaluate":
            raise UploadError(f"a {phase!r} reply in the evaluation phase")
        check_records(reply.content, "evaluate", EVALUATE_RECORDS, EVALUATE_RECORDS)
        return evaluation_counts(reply.content[METRICS])

    def summary(self) -> None:
        log.info(
            "PAEStrategy: %d devices, %s per round, evaluate fraction %.2f",
            self.num_devices,
            self.devices_per_round or "all",
            self.fraction_evaluate,
        )

    # ---- the protocol --------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
    ) -> Result:
        """Run ``num_rounds`` rounds of upload → server training → device evaluation.

        With :attr:`overlap_rounds` the rounds overlap where the results cannot tell: the next
        round's devices are asked for their uploads before this round's training starts, and
        this round's evaluation replies are collected after the next round's training. Every
        round trains on the same cache, evaluates the same network and samples the same
        devices as in sequence. A round's evaluation requests go out as soon as it is trained,
        before the previous round is closed. A checkpoint is then taken with that evaluation
        and the next round's uploads still out: it names their devices, and a resumed run
        asks them again. The last round (and a ``stop_after`` one) finishes whole before its
        checkpoint.

        After :meth:`resume` it continues after the checkpointed round; with ``stop_after`` it
        stops (checkpointed, with the outputs written so far) after that round.

        The hooks it calls, to override: :meth:`configure_train` (sampling) and
        :meth:`upload_messages`, :meth:`cache_uploads` and :meth:`train_cached` (what
        :meth:`aggregate_train` does in one), :meth:`evaluation_nodes` and
        :meth:`evaluate_messages` (what :meth:`configure_evaluate` does in one),
        :meth:`aggregate_evaluate`.
        """
        self.summary()
        # torch imports its compiler stack (≈1–2 s) when the first optimizer is built, i.e.
        # in round 1 while every device waits; import it now, while the devices start.
        threading.Thread(
            target=importlib.import_module, args=("torch._dynamo",), daemon=True
        ).start()
        _wait_for_nodes(grid, self.num_devices, timeout)
        self._check_nodes(sorted(grid.get_node_ids()))
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result()
        if self.completed_rounds:
            log.info("resuming after round %d of %d", self.completed_rounds, num_rounds)
        self._round_clock = time.perf_counter()
        uploads: _Pushed | None = None  # the next round's upload requests, already out
        evaluating: tuple[int, _Pushed, MetricRecord | None] | None = None
        first = self.completed_rounds + 1
        if self._pending is not None:
            # resumed from a checkpoint taken with a round's evaluation and the next round's
            # uploads out: ask the same devices again
            r, known = self._pending["round"], set(grid.get_node_ids())
            log.info("round %d was trained before the checkpoint: its evaluation goes out again", r)
            if 0 < self.stop_after <= r:
                log.warning(
                    "stop_after=%d: the checkpoint is past that round's training; the run goes "
                    "on to round %d",
                    self.stop_after,
                    num_rounds,
                )
            pending = {
                k: [n for n in self._pending[k] if n in known] for k in ("evaluate", "train")
            }
            messages = self.evaluate_messages(r, pending["evaluate"], evaluate_config)
            evaluating = (r, self._push(grid, r, "evaluate", messages), None)
            messages = self.upload_messages(r + 1, pending["train"], train_config)
            uploads = self._push(grid, r + 1, "train", messages)
            first, self._pending = r + 1, None
        for server_round in range(first, num_rounds + 1):
            if uploads is None:
                messages = self.configure_train(server_round, ArrayRecord(), train_config, grid)
                uploads = self._push(grid, server_round, "train", list(messages))
            metrics = self.cache_uploads(server_round, self._collect(grid, uploads, timeout))
            # sampled before the next round's uploads: the same devices as in sequence
            evaluate = self.should_evaluate(server_round, num_rounds)
            nodes = self.evaluation_nodes(grid) if evaluate else []
            stop = server_round == self.stop_after and server_round < num_rounds
            last = stop or server_round == num_rounds
            checkpoint = stop or self.checkpoint_due(server_round, num_rounds)
            overlap = self.overlap_rounds and not last
            uploads = None
            if overlap:
                # the devices work on these while the server trains; recorded when collected
                messages = self.configure_train(server_round + 1, ArrayRecord(), train_config, grid)
                uploads = self._push(grid, server_round + 1, "train", list(messages))
            _, train_metrics = self.train_cached(server_round, metrics)
            # out at once, so that the devices evaluate while the server closes the previous
            # round and checkpoints; recorded when collected, so a checkpoint taken now
            # holds neither these requests nor their replies
            messages = self.evaluate_messages(server_round, nodes, evaluate_config)
            evaluation = self._push(grid, server_round, "evaluate", messages)
            if evaluating is not None:
                self._finish_round(grid, *evaluating, result, num_rounds, timeout)
            evaluating = (server_round, evaluation, train_metrics)
            if overlap and checkpoint:
                # the round is trained, its evaluation and the next round's uploads not yet
                # collected: the checkpoint names their devices, and a resumed run asks again
                upload_nodes = [m.metadata.dst_node_id for m in uploads.messages]
                self._pending = {"round": server_round, "evaluate": nodes, "train": upload_nodes}
                self.save_checkpoint()
                self._pending = None
            if not overlap:
                self._finish_round(grid, *evaluating, result, num_rounds, timeout)
                evaluating = None
                if checkpoint:
                    self.save_checkpoint()
            if stop:
                log.info(
                    "stopped after round %d of %d (stop_after); resume=true continues the run",
                    server_round,
                    num_rounds,
                )
                summary = self.final_summary(server_round)
                summary.update(stopped_after=server_round, planned_rounds=num_rounds)
                self.recorder.write(summary)
                return result
        self.recorder.write(self.final_summary(num_rounds))
        return result

    @property
    def overlap_rounds(self) -> bool:
        """Whether rounds overlap (:meth:`start`): asked for, and the next round's upload
        requests do not depend on this round's training (they do in the refresh phase, which
        sends the trained outputs, and in the "no cache" ablation, which forgets the samples
        after training)."""
        return self.overlap and not self.refresh_step and self.keep_activations

    def _finish_round(
        self,
        grid: Grid,
        server_round: int,
        evaluation: _Pushed,
        train_metrics: MetricRecord | None,
        result: Result,
        num_rounds: int,
        timeout: float,
    ) -> None:
        """Collect a round's evaluation replies and close the round."""
        eval_metrics = self.aggregate_evaluate(
            server_round, self._collect(grid, evaluation, timeout)
        )
        if train_metrics is not None:
            result.train_metrics_clientapp[server_round] = train_metrics
        if eval_metrics is not None:
            result.evaluate_metrics_clientapp[server_round] = eval_metrics
        now = time.perf_counter()
        seconds, self._round_clock = now - self._round_clock, now
        # since the previous round closed (its checkpoint included): with overlapping rounds,
        # the next round's training falls in this interval; the intervals add up to the time
        # from the first request to the last round's close
        self.recorder.metric(server_round, "round_seconds", seconds)
        log.info(
            "round %d/%d done in %.1fs: %s",
            server_round,
            num_rounds,
            seconds,
            ", ".join(f"{k}={v:.3f}" for k, v in (eval_metrics or {}).items()),
        )
        self.completed_rounds = server_round

    def _push(self, grid: Grid, server_round: int, phase: str, messages: list[Message]) -> _Pushed:
        """Send a phase's requests; they are recorded when their replies are collected.

        Not before: measuring a message writes into its objects (Flower caches each object's
        id in it), while Flower's worker threads may still be serializing the same objects
        for Ray, which then fails ("dictionary changed size during iteration"). It did, in a
        few runs of the old code, which recorded requests as soon as they were pushed.
        """
        return _Pushed(server_round, phase, messages, list(grid.push_messages(messages)))

    def _record_requests(self, pushed: _Pushed, answered: bool) -> None:
        """Measure and record a phase's requests, once ``answered`` (all of them) or on a copy.

        Measuring writes Flower's object ids into a message's objects, and Flower may still
        be serializing a request no device has answered; a phase's requests share records,
        so then all of them are measured on a copy.
        """
        messages = pushed.messages if answered else copy.deepcopy(pushed.messages)
        # every evaluation request carries the same side network: Flower's context hashes
        # each shared object once, not once per request
        with no_object_id_recompute():
            for msg in messages:
                self.recorder.message(pushed.server_round, pushed.phase, msg, "down")
        pushed.messages = []

    def _collect(self, grid: Grid, pushed: _Pushed, timeout: float) -> list[Message]:
        """The replies to a pushed phase (waiting up to ``timeout`` after its push); records
        them, and which devices failed or did not answer."""
        server_round, phase = pushed.server_round, pushed.phase
        replies = _receive_replies(
            grid, pushed.ids, timeout, f"round {server_round} {phase}", pushed.at
        )
        self._record_requests(pushed, answered=len(replies) == pushed.count)
        for reply in replies:
            n, key = 0, None
            if not reply.has_error() and phase == "train" and UPLOAD in reply.content:
                n = int(reply.content[UPLOAD]["ids"].shape[0])
                key = str(reply.content[CONFIG].get("task_key"))
            self.recorder.message(server_round, phase, reply, "up", task_key=key, num_samples=n)
        # Availability: devices that failed (error reply) or did not answer within timeout.
        failed = sum(reply.has_error() for reply in replies)
        self.recorder.metric(server_round, f"{phase}_failed", failed)
        self.recorder.metric(server_round, f"{phase}_timed_out", pushed.count - len(replies))
        if len(replies) < pushed.count:
            log.warning(
                "round %d %s: %d of %d devices did not answer in time",
                server_round,
                phase,
                pushed.count - len(replies),
                pushed.count,
            )
        return replies

    # ---- helpers -------------------------------------------------------------------------
    def _record_device_metrics(self, server_round: int, reply: Message, task_key: str) -> None:
        """Per-device figures of a training reply (seconds, peak RSS, FLOPs) into metrics."""
        if METRICS not in reply.content:
            return
        reported = reply.content[METRICS]
        for name in ("forward_seconds", "peak_rss_mb", "flops"):
            if name in reported:
                node = reply.metadata.src_node_id
                value = float(reported[name])
                self.recorder.metric(server_round, name, value, task=task_key, node_id=node)

    def _open_network(self, shape: tuple[int, int]) -> None:
        """Build the side network (and its trainer) once the first upload fixes its shape."""
        self.expected_shape = shape
        self.net = self.make_network(*shape)
        self.trainer = SideNetworkTrainer(self.net, self.trainer_config)

    @torch.no_grad()
    def apply_differences(
        self, differences: list[tuple[int, str, list[bytes], np.ndarray, bool]]
    ) -> tuple[int, list[int]]:
        """Turn devices' masked gradients ``g̃`` into regression targets ``s̃ + η·g̃``.

        ``s̃`` is the side network's output now, before this round's training: the outputs the
        devices got with their training message and computed their gradients against. A new
        sample's gradient was computed against ``s = 0`` (the device had no output for it):
        it is used only where the output is exactly zero (no network or zero-initialised
        output maps); elsewhere its target is ``s̃`` (no step) until its first refresh.
        With ``agreement_neighbours``, the devices whose gradients of this round disagree with
        their neighbours' (:func:`disagreeing_devices`, task by task) get no step.
        Returns the number of targets set and the excluded devices.
        """
        excluded = self.disagreeing_gradients(differences)
        count = 0
        was_training = self.net.training
        self.net.eval()
        for node, task_key, ids, grads, fresh in differences:
            if not ids:
                continue
            self.net.route = task_key if self.route_by_task else None
            dtype = self.net.alpha.dtype
            side = self.net(self.cache.activations(ids).to(dtype)).float().numpy()
            step = self.refresh_step * np.asarray(grads, np.float32)
            if fresh:
                step *= ~np.any(side != 0, axis=1, keepdims=True)
            if node in excluded:
                step *= 0.0
            self.cache.set_targets(ids, side + step)
            count += len(ids)
        self.net.route = None
        self.net.train(was_training)
        return count, excluded

    def disagreeing_gradients(
        self, differences: list[tuple[int, str, list[bytes], np.ndarray, bool]]
    ) -> list[int]:
        """The devices :func:`disagreeing_devices` names on this round's gradients, per task."""
        if not self.agreement_neighbours:
            return []
        excluded: list[int] = []
        for task_key in dict.fromkeys(d[1] for d in differences):
            rows = [d for d in differences if d[1] == task_key and d[2]]
            if len({d[0] for d in rows}) < 3:
                continue
            ids = [i for d in rows for i in d[2]]
            owners = torch.tensor([d[0] for d in rows for _ in d[2]])
            grads = torch.from_numpy(np.concatenate([np.asarray(d[3], np.float32) for d in rows]))
            acts = self.cache.activations(ids)[:, -1]
            found = disagreeing_devices(acts, grads, owners, self.agreement_neighbours)
            if found:
                log.warning(
                    "task %s: no step for %d device(s) whose gradients disagree with their "
                    "neighbours': %s",
                    task_key,
                    len(found),
                    found,
                )
            excluded += found
        return excluded

    def _reject(self, server_round: int, reply: Message, phase: str, reason: str) -> None:
        """Log and record a reply that failed a check (it changes nothing else)."""
        node = reply.metadata.src_node_id
        log.warning(
            "round %d: rejected %s reply of device %d: %s", server_round, phase, node, reason
        )
        self.rejected.append(
            {"round": server_round, "phase": phase, "node_id": node, "reason": reason}
        )
        self.recorder.metric(server_round, "rejected_uploads", 1, node_id=node)

    # ---- checkpoint and resume -------------------------------------------------------------
    def checkpoint_due(self, server_round: int, num_rounds: int) -> bool:
        """Whether to checkpoint after ``server_round``: every ``checkpoint_every`` rounds and
        after the last."""
        every = self.checkpoint_every
        return bool(every) and (server_round % every == 0 or server_round == num_rounds)

    def state(self) -> tuple[dict, dict]:
        """The server's whole state after :attr:`completed_rounds`: ``(JSON-able, tensors)``.

        The side network (meta and weights: task subspaces, frozen flags, gates), the task
        log and the tasks' label bases, the ids each device is known to hold, accuracies,
        rejected replies, the device sampling generator, the trainer (optimizers and shuffling
        generator) and the run's recorded rows. :meth:`save_checkpoint` adds the cache's
        index and keeps the recorded rows in journals (both write their own files).
        """
        version, internal, gauss = self.rng.getstate()
        state = {
            "round": self.completed_rounds,
            "pending": self._pending,
            "expected_shape": list(self.expected_shape) if self.expected_shape else None,
            "net_meta": self.net.meta() if self.net is not None else None,
            "tasks": [[t.key, t.first_round, t.last_round] for t in self.tasks.values()],
            "held": {str(node): sorted(i.hex() for i in ids) for node, ids in self.held.items()},
            "uploader": {i.hex(): node for i, node in self.uploader.items()},
            "rejected": self.rejected,
            "accuracy": _str_keys(self.accuracy),
            "upcoming": _str_keys(self.upcoming),
            "zero_shot": self.zero_shot,
            "rng": [version, list(internal), gauss],
            "nodes": self._nodes,
            "recorder": self.recorder.state(),
        }
        tensors = {
            "net": self.net.state_dict() if self.net is not None else {},
            "trainer": self.trainer.state_dict() if self.trainer is not None else None,
            "bases": {key: torch.tensor(basis) for key, basis in self.bases.items()},
        }
        return state, tensors

    def save_checkpoint(self) -> Path:
        """Checkpoint the state after :attr:`completed_rounds` into ``checkpoint_dir``.

        The cache's new blocks and the recorder's new rows are written first, then
        ``state.pt`` replaces the previous one atomically, then superseded block files go: a
        run killed at any point leaves one whole checkpoint behind.
        """
        if self.checkpoint_dir is None:
            raise CheckpointError("this strategy has no checkpoint_dir")
        start = time.perf_counter()
        state, tensors = self.state()
        state["cache"] = self.cache.checkpoint(self.checkpoint_dir)
        state["recorder"] = self.recorder.checkpoint(self.checkpoint_dir)
        path = save_state(self.checkpoint_dir, state, tensors)
        self.cache.prune_checkpoint(self.checkpoint_dir)
        log.info(
            "round %d: checkpoint written to %s in %.2fs",
            self._pending["round"] if self._pending else self.completed_rounds,
            self.checkpoint_dir,
            time.perf_counter() - start,
        )
        return path

    def resume(self) -> int:
        """Load the last checkpoint of ``checkpoint_dir``; :meth:`start` then continues after it.

        Returns
        -------
        int
            The last completed round of the checkpoint.
        """
        if self.checkpoint_dir is None:
            raise CheckpointError("this strategy has no checkpoint_dir to resume from")
        if self.completed_rounds or len(self.cache):
            raise CheckpointError("resume() needs a fresh strategy")
        state, tensors = load_state(self.checkpoint_dir)
        self.cache.restore(self.checkpoint_dir, state["cache"])
        if state["net_meta"] is not None:
            self.expected_shape = tuple(state["expected_shape"])
            self.net = LadderSideNetwork.from_state(state["net_meta"], tensors["net"])
            self.trainer = SideNetworkTrainer(self.net, self.trainer_config)
            self.trainer.load_state_dict(tensors["trainer"])
        self.tasks = {k: _TaskLog(k, first, last) for k, first, last in state["tasks"]}
        self.held = defaultdict(set)
        for node, ids in state["held"].items():
            self.held[int(node)] = {bytes.fromhex(i) for i in ids}
        self.uploader = {bytes.fromhex(i): int(node) for i, node in state["uploader"].items()}
        if "bases" in tensors:
            self.bases = {k: b.numpy() for k, b in tensors["bases"].items()}
        else:  # a checkpoint that kept them in its JSON state
            self.bases = {k: np.asarray(b, np.float32) for k, b in state["bases"].items()}
        self.rejected = list(state["rejected"])
        self.accuracy = _int_keys(state["accuracy"])
        self.upcoming = _int_keys(state["upcoming"])
        self.zero_shot = dict(state["zero_shot"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._nodes = state["nodes"]
        self.recorder.restore(state["recorder"], self.checkpoint_dir)
        self.completed_rounds = int(state["round"])
        self._pending = state.get("pending")
        log.info("resumed from %s after round %d", self.checkpoint_dir, self.completed_rounds)
        return self.completed_rounds

    def _check_nodes(self, nodes: list[int]) -> None:
        """Remember the run's devices; on resume, warn if they are not the checkpoint's."""
        if self._nodes is not None and self._nodes != nodes:
            log.warning(
                "resumed with other node ids than the checkpoint's: the ids each device holds "
                "are lost (devices upload again; the cache ignores the replays) and device "
                "sampling differs, so results will not match an uninterrupted run"
            )
        self._nodes = nodes

    def protected_directions(self) -> torch.Tensor | None:
        """What a task opening now must not write to: the earlier tasks' masked label bases
        (the network orthonormalizes them).

        Task ``j`` reads the side output only through its label rows, ``W_j·Qᵀ·s``, which is
        zero off ``span(U_j)``. An output kept off ``span(U_j)`` leaves task ``j``'s predictions
        exactly as they were, without a task id at inference. The new task reaches its own
        predictions through the part of its span outside the earlier ones; where spans
        overlap (cosines up to 0.7 between the CL benchmark's tasks) that costs it reach, and
        a task whose label words an earlier task already has (yelp after amazon) cannot move
        its predictions at all: the earlier task's adapters answer for it.
        Not for one shared output map (``"sequential"``, multitask) nor a task router (oracle).
        """
        if self.net.method == "sequential" or self.route_by_task:
            return None
        earlier = [self.bases[k] for k in self.net.task_keys if k in self.bases]
        if not earlier:
            return None
        return torch.from_numpy(np.concatenate(earlier, axis=1).astype(np.float64))

    def _see_task(self, key: str, server_round: int) -> None:
        """Open a subspace for a new task key; the previous task's training ends."""
        if key in self.tasks:
            return
        current = self.net.current_task
        if current is not None and self.net.method != "sequential":
            self.net.freeze_task(current)
        self.net.add_task(key, self.protected_directions())
        self.tasks[key] = _TaskLog(key, first_round=server_round, last_round=server_round)
        log.info("round %d: new task %s opened (%d tasks)", server_round, key, len(self.tasks))

    def final_summary(self, num_rounds: int) -> dict:
        """Final figures: accuracy matrix, AA/BWT/FWT, ranks and parameters, cache and bytes."""
        order = list(self.tasks)
        matrix = np.full((len(order), len(order)), np.nan)
        for i, key in enumerate(order):
            end = self.tasks[key].last_round
            for j, other in enumerate(order):
                matrix[i, j] = self.accuracy.get(end, {}).get(other, np.nan)
                if j == i + 1:  # accuracy on the next task before it is trained (FWT)
                    matrix[i, j] = self.upcoming.get(end, {}).get(other, np.nan)
        baseline = np.array([self.zero_shot.get(k, np.nan) for k in order])
        last = self.accuracy.get(num_rounds, {})
        net = self.net
        summary = {
            "rounds": num_rounds,
            "method": net.method if net is not None else None,
            "task_keys": order,
            "task_rounds": {k: [t.first_round, t.last_round] for k, t in self.tasks.items()},
            "final_accuracy": last,
            "zero_shot_accuracy": dict(zip(order, baseline.tolist(), strict=True)),
            "accuracy_matrix": matrix.tolist(),
            "cache": self.cache.stats.as_dict(),
            "rank_report": net.rank_report() if net is not None else [],
            "active_params": net.active_params() if net is not None else 0,
            # in round order (with overlapping rounds, a round's evaluation replies are taken
            # after the next round's uploads)
            "rejected_uploads": sorted(
                self.rejected, key=lambda r: (r["round"], r["phase"] != "train", r["node_id"])
            ),
            "bytes": _bytes_by_phase(self.recorder.messages_frame()),
        }
        if len(order):
            summary.update(
                average_accuracy=cl_metrics.average_accuracy(matrix),
                backward_transfer=cl_metrics.backward_transfer(matrix),
                forward_transfer=cl_metrics.forward_transfer(matrix, baseline),
            )
        for row in summary["rank_report"]:
            self.recorder.metric(
                num_rounds, f"active_rank/{row['layer']}", row["active_rank"], task=row["task"]
            )
            self.recorder.metric(
                num_rounds, f"active_params/{row['layer']}", row["active_params"], task=row["task"]
            )
        return summary


def _hidden_size(arrays: dict[str, np.ndarray], expected: tuple[int, int] | None) -> int | None:
    """The hidden size an upload declares (its activations), else the one already fixed."""
    acts = arrays.get("acts")
    if acts is not None and acts.ndim == 3 and acts.shape[0] > 0:
        return int(acts.shape[2])
    return expected[1] if expected is not None else None


def _str_keys(values: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {str(k): dict(v) for k, v in values.items()}


def _int_keys(values: dict[str, dict[str, float]]) -> dict[int, dict[str, float]]:
    return {int(k): dict(v) for k, v in values.items()}


def _bytes_by_phase(messages) -> dict[str, int]:
    """Total payload bytes per "phase/direction"."""
    totals = messages.groupby(["phase", "direction"])["payload_bytes"].sum()
    return {f"{phase}/{direction}": int(v) for (phase, direction), v in totals.items()}


@dataclass
class _Pushed:
    """A phase's requests, sent: which round and phase, the requests not yet recorded, their
    ids, when they left (Unix seconds, Flower's clock for ``created_at``)."""

    server_round: int
    phase: str
    messages: list[Message]
    ids: list[str]
    at: float = field(default_factory=time.time)

    @property
    def count(self) -> int:
        return len(self.ids)


def _receive_replies(
    grid: Grid, message_ids: list[str], timeout: float, what: str, pushed_at: float
) -> list[Message]:
    """The replies to messages pushed at ``pushed_at`` (Unix seconds) that their devices built
    within ``timeout`` of it, as ``grid.send_and_receive`` waits for them; logs progress every
    few seconds on long phases.

    With overlapping rounds a phase may be collected after its deadline (the server was
    training): what is there is still taken, and such a reply counts as in time by its own
    ``created_at``, so the same replies count as in a round run in sequence. Replies pulled
    before the deadline are in time whatever their device's clock says.
    """
    pending = set(message_ids)
    total, replies = len(pending), []
    deadline = pushed_at + timeout
    last_log = time.time()
    while pending:
        late = time.time() > deadline
        got = list(grid.pull_messages(pending))
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        replies.extend(m for m in got if not late or m.metadata.created_at <= deadline)
        if not pending or time.time() >= deadline:
            break
        if time.time() - last_log > 15:
            last_log = time.time()
            log.info(
                "%s: %d/%d devices replied (%.0fs)",
                what,
                total - len(pending),
                total,
                last_log - pushed_at,
            )
        time.sleep(0.1)
    return replies


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(list(grid.get_node_ids()))} of {count} devices "
                f"connected within {timeout}s"
            )
        time.sleep(0.2)


def default_trainer_config(cfg) -> TrainerConfig:
    """Map run settings onto the side-network trainer."""
    return TrainerConfig(
        epochs=cfg.server_epochs,
        batch_size=cfg.server_batch_size,
        lr=cfg.lr,
        gate_lr=cfg.gate_lr,
        out_lr=cfg.out_lr,
        out_momentum=cfg.out_momentum,
        weight_decay=cfg.weight_decay,
        # the oracle's tasks never share a forward pass: nothing to keep orthogonal
        lambda_orth=0.0 if cfg.method == "oracle" else cfg.lambda_orth,
        seed=cfg.seed,
    )
