"""PAE MobiLLM's assisting server as a Flower strategy, with OA-Adapter task subspaces.

Each round: sampled devices upload the activations and masked prediction differences of
samples the server does not cache yet; the server trains the additive side network on its
cache of the current task; then devices download the side network and report accuracy
counts. A device announces a task only by an opaque key: a new key opens a new OA-Adapter
subspace and freezes the previous task's.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flower_pae import cl_metrics
from flower_pae.runlog import RunRecorder
from flower_pae.server.cache import ActivationCache
from flower_pae.server.validation import UploadError, validate_upload
from flower_pae.side_network import LadderSideNetwork, SideNetworkTrainer, TrainerConfig
from flower_pae.wire import (
    CONFIG,
    HELD,
    METRICS,
    UPLOAD,
    array_record,
    ids_to_array,
    record_arrays,
    side_network_records,
)

log = logging.getLogger("flower_pae")


@dataclass
class _TaskLog:
    """What the server knows of one task: its key, when it started and ended training."""

    key: str
    first_round: int
    last_round: int


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
    ) -> None:
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
        self.rejected: list[dict] = []
        self.expected_shape: tuple[int, int] | None = None
        self.accuracy: dict[int, dict[str, float]] = {}
        self.upcoming: dict[int, dict[str, float]] = {}
        self.zero_shot: dict[str, float] = {}

    # ---- hooks ----------------------------------------------------------------------------
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
        messages = []
        for node in self.sample_nodes(grid, self.devices_per_round):
            content = RecordDict(
                {
                    CONFIG: ConfigRecord({**config, "round": server_round}),
                    HELD: array_record({"ids": ids_to_array(sorted(self.held[node]))}),
                }
            )
            messages.append(Message(content, dst_node_id=node, message_type="train"))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Cache the uploads, open/freeze task subspaces, then train the current task."""
        new_samples = 0
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "round %d: device %d failed: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            try:
                task_key, arrays = self._accept_upload(reply)
            except UploadError as err:
                self._reject(server_round, reply, str(err))
                continue
            self._see_task(task_key, server_round)
            kept = self.cache.add(task_key, arrays)
            self.held[reply.metadata.src_node_id].update(
                i for i in map(bytes, arrays["ids"]) if i in self.cache
            )
            new_samples += kept
        metrics = {"new_samples": new_samples}
        current = self.net.current_task if self.net is not None else None
        if current is not None and self.cache.task_size(current) > 0:
            self.tasks[current].last_round = server_round
            acts, targets = self.training_data(current)
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
        for name, value in metrics.items():
            self.recorder.metric(server_round, name, value, task=current)
        for name, value in self.cache.stats.as_dict().items():
            self.recorder.metric(server_round, f"cache_{name}", value)
        return None, MetricRecord(metrics)

    def training_data(self, current: str):
        """What the server trains on this round: the current task's cache (or all, with replay)."""
        keys = [k for k in self.tasks if self.cache.task_size(k)] if self.replay else [current]
        parts = [self.cache.training_data(k) for k in keys]
        return torch.cat([a for a, _ in parts]), torch.cat([t for _, t in parts])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the side network to a fraction of devices for local evaluation."""
        if self.net is None:
            return []
        nodes = sorted(grid.get_node_ids())
        count = max(1, round(self.fraction_evaluate * len(nodes)))
        messages = []
        for node in self.sample_nodes(grid, count):
            content = side_network_records(self.net.meta(), self.net.state_dict())
            content[CONFIG] = ConfigRecord({**config, "round": server_round})
            messages.append(Message(content, dst_node_id=node, message_type="evaluate"))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Sum devices' correct/total counts per task into accuracies."""
        sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
        upcoming: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "round %d: evaluation on device %d failed: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            node = reply.metadata.src_node_id
            seen, ahead = _task_counts(reply.content[METRICS])
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
        """Run ``num_rounds`` rounds of upload → server training → device evaluation."""
        self.summary()
        _wait_for_nodes(grid, self.num_devices, timeout)
        result = Result()
        for server_round in range(1, num_rounds + 1):
            t0 = time.perf_counter()
            train_msgs = list(
                self.configure_train(
                    server_round, ArrayRecord(), train_config or ConfigRecord(), grid
                )
            )
            replies = self._exchange(grid, server_round, "train", train_msgs, timeout)
            _, train_metrics = self.aggregate_train(server_round, replies)
            eval_msgs = list(
                self.configure_evaluate(
                    server_round, ArrayRecord(), evaluate_config or ConfigRecord(), grid
                )
            )
            eval_replies = self._exchange(grid, server_round, "evaluate", eval_msgs, timeout)
            eval_metrics = self.aggregate_evaluate(server_round, eval_replies)
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = eval_metrics
            seconds = time.perf_counter() - t0
            self.recorder.metric(server_round, "round_seconds", seconds)
            log.info(
                "round %d/%d done in %.1fs: %s",
                server_round,
                num_rounds,
                seconds,
                ", ".join(f"{k}={v:.3f}" for k, v in (eval_metrics or {}).items()),
            )
        self.recorder.write(self.final_summary(num_rounds))
        return result

    def _exchange(
        self, grid: Grid, server_round: int, phase: str, messages: list[Message], timeout: float
    ) -> list[Message]:
        for msg in messages:
            self.recorder.message(server_round, phase, msg, "down")
        replies = _send_and_receive(grid, messages, timeout, f"round {server_round} {phase}")
        for reply in replies:
            n, key = 0, None
            if not reply.has_error() and phase == "train" and UPLOAD in reply.content:
                n = int(reply.content[UPLOAD]["ids"].shape[0])
                key = str(reply.content[CONFIG].get("task_key"))
            self.recorder.message(server_round, phase, reply, "up", task_key=key, num_samples=n)
        if len(replies) < len(messages):
            log.warning(
                "round %d %s: %d of %d devices did not answer in time",
                server_round,
                phase,
                len(messages) - len(replies),
                len(messages),
            )
        return replies

    # ---- helpers -------------------------------------------------------------------------
    def _accept_upload(self, reply: Message) -> tuple[str, dict[str, np.ndarray]]:
        content = reply.content
        if UPLOAD not in content or CONFIG not in content:
            raise UploadError("reply has no upload record")
        task_key = str(content[CONFIG].get("task_key", ""))
        arrays = record_arrays(content[UPLOAD])
        shape = validate_upload(arrays, task_key, self.expected_shape)
        if self.expected_shape is None and shape is not None:
            self.expected_shape = shape
            self.net = self.make_network(*shape)
            self.trainer = SideNetworkTrainer(self.net, self.trainer_config)
        return task_key, arrays

    def _reject(self, server_round: int, reply: Message, reason: str) -> None:
        node = reply.metadata.src_node_id
        log.warning("round %d: rejected upload of device %d: %s", server_round, node, reason)
        self.rejected.append({"round": server_round, "node_id": node, "reason": reason})
        self.recorder.metric(server_round, "rejected_uploads", 1, node_id=node)

    def _see_task(self, key: str, server_round: int) -> None:
        """Open a subspace for a new task key; the previous task's training ends."""
        if key in self.tasks:
            return
        current = self.net.current_task
        if current is not None and self.net.method != "sequential":
            self.net.freeze_task(current)
        self.net.add_task(key)
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
            "rejected_uploads": self.rejected,
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


def _task_counts(metrics: MetricRecord) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Parse ``<key>/[upcoming_]correct|zero_shot_correct|total`` of an evaluation reply.

    Returns (counts of tasks the device has met, counts of its upcoming task).
    """
    seen: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
    ahead: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
    slots = {"correct": 0, "zero_shot_correct": 1, "total": 2}
    for name, value in metrics.items():
        key, _, what = name.rpartition("/")
        target = seen
        if what.startswith("upcoming_"):
            target, what = ahead, what.removeprefix("upcoming_")
        if key and what in slots:
            target[key][slots[what]] = float(value)
    return seen, ahead


def _bytes_by_phase(messages) -> dict[str, int]:
    """Total payload bytes per "phase/direction"."""
    totals = messages.groupby(["phase", "direction"])["payload_bytes"].sum()
    return {f"{phase}/{direction}": int(v) for (phase, direction), v in totals.items()}


def _send_and_receive(
    grid: Grid, messages: list[Message], timeout: float, what: str
) -> list[Message]:
    """``grid.send_and_receive`` that logs progress every few seconds on long phases."""
    pending = set(grid.push_messages(messages))
    total, replies = len(pending), []
    start = last_log = time.monotonic()
    while pending and time.monotonic() - start < timeout:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending and time.monotonic() - last_log > 15:
            last_log = time.monotonic()
            log.info(
                "%s: %d/%d devices replied (%.0fs)",
                what,
                total - len(pending),
                total,
                last_log - start,
            )
        if pending:
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
        out_lr=cfg.out_lr,
        out_momentum=cfg.out_momentum,
        weight_decay=cfg.weight_decay,
        # the oracle's tasks never share a forward pass: nothing to keep orthogonal
        lambda_orth=0.0 if cfg.method == "oracle" else cfg.lambda_orth,
        seed=cfg.seed,
    )
