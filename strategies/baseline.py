"""What the baselines' strategies share: the run directory, and the flow of server training.

:class:`BaselineRun` records every message (both directions, Flower-serialized size) and the
devices' cost figures through the :class:`~flower_pae.runlog.RunRecorder`, sums evaluation
counts into accuracies, and writes the ``summary.json`` keys ``analysis`` reads. Used by
:class:`strategies.fedavg_lora.FedAvgLoRAStrategy`,
:class:`strategies.split_lora.SplitLoRAStrategy` and :class:`strategies.mobillm.MobiLLMStrategy`.

:class:`StatesStrategy` is the flow of the two baselines whose server trains on the states its
devices upload (split learning, MobiLLM): their rounds, the rejection of bad uploads, the
start-up line and the summary. The checks every upload goes through (:func:`read_states`,
:func:`check_names`, :func:`check_lengths`, :func:`labelled_upload`) are here too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flower_pae import cl_metrics
from flower_pae.baselines.base import StatesUpload
from flower_pae.runlog import RunRecorder
from flower_pae.server.validation import UploadError, evaluation_counts

log = logging.getLogger("flower_pae")

CONFIG = "config"  # ConfigRecord: round settings (server → device); the task key (device → server)
METRICS = "metrics"  # the device's MetricRecord
STATES = "states"  # ArrayRecord (device → server): states, lengths (+ labels when training)
LOGITS = "logits"  # ArrayRecord (server → device): logits (+ zero_shot), float32 (N, C)
SCORES = f"{MessageType.EVALUATE}.scores"  # the second evaluation round trip
# Per-device cost figures of a training states upload that go into metrics.parquet (node_id
# set): the device's forward ("forward_seconds", as PAE's devices report it).
FORWARD_COST_METRICS = ("forward_seconds", "peak_rss_mb", "tokens", "flops")
# ... and of any baseline's evaluation reply: the forward of the test rows.
EVAL_COST_METRICS = ("eval_seconds", "eval_flops")
MAX_LABEL_WORDS = 1000


class BaselineRun:
    """Mixin of a baseline strategy: recording, accuracies and the final summary.

    Parameters
    ----------
    recorder : RunRecorder
        Writes every message and metric into the run directory.
    num_devices : int
        The federation's devices.
    method : str
        The method name written into ``summary.json``.
    """

    def _init_run(self, recorder: RunRecorder, num_devices: int, method: str) -> None:
        self.recorder = recorder
        self.num_devices = num_devices
        self.method = method
        self.tasks: dict[str, list[int]] = {}  # task key → [first round, last round] trained
        self.accuracy: dict[int, dict[str, float]] = {}
        self.zero_shot: dict[str, float] = {}
        self.adapter_params = 0
        self._round_start = time.perf_counter()

    # ---- recording ---------------------------------------------------------------------------
    def _record_sent(self, server_round: int, phase: str, messages: list[Message]) -> None:
        for msg in messages:
            self.recorder.message(server_round, phase, msg, "down")

    def _record_replies(
        self, server_round: int, phase: str, replies: list[Message], failures: str = ""
    ) -> None:
        """Record each reply with its serialized size, then the phase's failures (metric
        ``failures``, by default ``<phase>_failed``)."""
        for reply in replies:
            key, n = None, 0
            if not reply.has_error() and phase == "train":
                key = task_key(reply)
                n = int(reply.content[METRICS].get("num-examples", 0))
            self.recorder.message(server_round, phase, reply, "up", task_key=key, num_samples=n)
        failed = sum(reply.has_error() for reply in replies)
        self.recorder.metric(server_round, failures or f"{phase}_failed", failed)
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "round %d %s: device %d failed: %s",
                    server_round,
                    phase,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )

    def _record_device_cost(
        self, server_round: int, reply: Message, names: tuple[str, ...], task: str | None
    ) -> None:
        """Per-device cost figures of a reply into metrics (node id set)."""
        reported = reply.content[METRICS]
        node = reply.metadata.src_node_id
        for name in names:
            if name in reported:
                self.recorder.metric(server_round, name, float(reported[name]), task, node)

    def _record_trained(
        self, server_round: int, reply: Message, key: str, names: tuple[str, ...]
    ) -> None:
        """Task ``key`` trained this round (for the accuracy matrix), and what it cost."""
        self.tasks.setdefault(key, [server_round, server_round])[1] = server_round
        self._record_device_cost(server_round, reply, names, key)

    # ---- evaluation --------------------------------------------------------------------------
    def _accuracies(
        self, server_round: int, replies: list[Message], cost: tuple[str, ...] = ()
    ) -> dict[str, float]:
        """Sum the devices' correct/total counts per task into accuracies (as PAE does).

        ``cost``: the replies' metric names that are cost figures, not counts; recorded per
        device for the replies whose counts are valid.
        """
        sums: dict[str, np.ndarray] = {}
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            reported = reply.content[METRICS]
            try:
                seen, _ = evaluation_counts({k: v for k, v in reported.items() if k not in cost})
            except UploadError as err:
                log.warning("round %d: bad evaluation from device %d: %s", server_round, node, err)
                self.recorder.metric(server_round, "rejected_evaluations", 1, node_id=node)
                continue
            self._record_device_cost(server_round, reply, cost, None)
            for key, counts in seen.items():
                sums[key] = sums.get(key, np.zeros(3)) + counts
                if counts[2]:
                    self.recorder.metric(
                        server_round, "accuracy", counts[0] / counts[2], task=key, node_id=node
                    )
        out = {}
        for key, (correct, zero_shot, total) in sums.items():
            if not total:
                continue
            out[f"{key}/accuracy"] = correct / total
            self.accuracy.setdefault(server_round, {})[key] = correct / total
            self.zero_shot.setdefault(key, zero_shot / total)
            self.recorder.metric(server_round, "accuracy", correct / total, task=key)
            self.recorder.metric(server_round, "zero_shot_accuracy", zero_shot / total, task=key)
            self.recorder.metric(server_round, "test_samples", total, task=key)
        self.recorder.metric(server_round, "round_seconds", time.perf_counter() - self._round_start)
        log.info(
            "round %d done: %s",
            server_round,
            ", ".join(f"{k}={v:.3f}" for k, v in out.items()) or "no accuracy",
        )
        return out

    # ---- the run -----------------------------------------------------------------------------
    def final_summary(self, num_rounds: int) -> dict:
        """The keys ``analysis`` reads, as :meth:`PAEStrategy.final_summary` writes them."""
        order = list(self.tasks)
        matrix = np.full((len(order), len(order)), np.nan)
        for i, key in enumerate(order):
            end = self.tasks[key][1]
            for j, other in enumerate(order):
                matrix[i, j] = self.accuracy.get(end, {}).get(other, np.nan)
        baseline = np.array([self.zero_shot.get(k, np.nan) for k in order])
        summary = {
            "rounds": num_rounds,
            "method": self.method,
            "task_keys": order,
            "task_rounds": self.tasks,
            "final_accuracy": self.accuracy.get(num_rounds, {}),
            "zero_shot_accuracy": dict(zip(order, baseline.tolist(), strict=True)),
            "accuracy_matrix": matrix.tolist(),
            "adapter_params": self.adapter_params,
            "bytes": self._bytes_by_phase(),
            "device_cost": self._device_cost(),
        }
        if order:
            summary.update(
                average_accuracy=cl_metrics.average_accuracy(matrix),
                backward_transfer=cl_metrics.backward_transfer(matrix),
                forward_transfer=cl_metrics.forward_transfer(matrix, baseline),
            )
        return summary

    def _bytes_by_phase(self) -> dict[str, int]:
        """Total payload bytes per "phase/direction" (the key PAE's summary uses too)."""
        frame = self.recorder.messages_frame()
        totals = frame.groupby(["phase", "direction"])["payload_bytes"].sum()
        return {f"{phase}/{direction}": int(v) for (phase, direction), v in totals.items()}

    def _device_cost(self) -> dict[str, float]:
        """Totals over devices and rounds of the figures they reported."""
        frame = self.recorder.metrics_frame()
        per_node = frame[frame["node_id"].notna()]
        total = per_node.groupby("metric")["value"].sum()
        peak = per_node.loc[per_node["metric"] == "peak_rss_mb", "value"]
        return {
            "local_train_seconds": float(total.get("local_train_seconds", 0.0)),
            "train_flops": float(total.get("flops", 0.0)),
            "train_tokens": float(total.get("tokens", 0.0)),
            "eval_seconds": float(total.get("eval_seconds", 0.0)),
            "eval_flops": float(total.get("eval_flops", 0.0)),
            "peak_rss_mb_max": float(peak.max()) if len(peak) else float("nan"),
        }


def task_key(reply: Message) -> str:
    """The opaque task key a device reports with its reply."""
    return str(reply.content[CONFIG].get("task_key", ""))


# ---- decoding a states upload --------------------------------------------------------------------


def read_states(reply: Message, max_bytes: float = float("inf")) -> dict[str, np.ndarray]:
    """The arrays of a reply's states record; its size is read before they are decoded
    (``max_bytes``: MobiLLM's ``max_upload_mb`` cap)."""
    content = reply.content
    if STATES not in content.array_records or CONFIG not in content.config_records:
        raise UploadError(f"a reply needs the records {STATES!r} and {CONFIG!r}")
    size = sum(len(a.data) for a in content[STATES].values())
    if size > max_bytes:
        raise UploadError(
            f"the {STATES} record has {size / 2**20:.1f} MB, over max_upload_mb = "
            f"{max_bytes / 2**20:g} (raise max_upload_mb, or lower max_train or layers)"
        )
    return {k: v.numpy() for k, v in content[STATES].items()}


def check_names(arrays: dict[str, np.ndarray], names: set[str], train: bool) -> None:
    """The record holds exactly ``names``, and the labels when training."""
    expected = names | {"labels"} if train else names
    if set(arrays) != expected:
        raise UploadError(f"{STATES} must hold exactly {sorted(expected)}, got {sorted(arrays)}")


def check_lengths(lengths: np.ndarray, states: np.ndarray) -> None:
    """``lengths`` are positive integers, one per sample, adding up to the states' tokens."""
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or (lengths < 1).any():
        raise UploadError("lengths must be positive integers, one per sample")
    if int(lengths.sum()) != states.shape[0]:
        raise UploadError(f"lengths add up to {int(lengths.sum())}, states have {len(states)}")


def labelled_upload(reply: Message, arrays: dict[str, np.ndarray], train: bool) -> StatesUpload:
    """The upload of checked ``arrays``, once its label words (and labels) are checked too."""
    words = reply.content[CONFIG].get("label_words")
    if (
        not isinstance(words, list)
        or not 2 <= len(words) <= MAX_LABEL_WORDS
        or not all(isinstance(w, str) and w for w in words)
    ):
        raise UploadError("label_words must be a list of at least two non-empty strings")
    if train:
        labels, lengths = arrays["labels"], arrays["lengths"]
        if labels.shape != lengths.shape or labels.dtype.kind not in "iu":
            raise UploadError("labels must be integers, one per sample")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(words)):
            raise UploadError(f"labels must index the {len(words)} label words")
    return StatesUpload(task_key=task_key(reply), label_words=list(words), arrays=arrays)


# ---- the flow of server training on uploaded states ----------------------------------------------


class StatesServer(Protocol):
    """What :class:`StatesStrategy` needs of the model its server trains."""

    def train(
        self, uploads: Sequence[StatesUpload], epochs: int, batch_size: int, server_round: int, /
    ) -> tuple[float, float, int]: ...

    def logits(self, upload: StatesUpload, batch_size: int, /) -> tuple[np.ndarray, int]: ...


class StatesStrategy(BaselineRun, Strategy):
    """The server trains on the states its devices upload, and scores their test states.

    Each round:

    1. ``train``: every sampled device gets the round number and replies with its training
       shard's states and labels (:data:`STATES`), its task key and label words; the server
       trains ``local_epochs`` epochs over all of them.
    2. ``evaluate``: devices reply with their test shard's states (no labels);
       ``evaluate.scores`` (:data:`SCORES`): the server sends each device the label logits of
       its rows (:data:`LOGITS`), the device replies with correct/total counts against its
       own labels.

    A reply that fails :meth:`_decode` is rejected (metric ``rejected_uploads``) and left
    out. Subclasses decode (:meth:`_decode`), count the server's FLOPs (:meth:`_train_flops`,
    :meth:`_eval_flops`), and may add to what goes back down (:meth:`_score`), to the start-up
    line (:meth:`_describe`) and to ``summary.json`` (:meth:`_summary_fields`).

    Parameters
    ----------
    recorder : RunRecorder
        Writes every message and metric into the run directory.
    server : StatesServer
        The model the server trains, with its optimizer.
    num_devices : int
        Devices to wait for before the first round.
    devices_per_round : int
        Devices sampled for training each round (0: all).
    fraction_evaluate : float
        Fraction of devices that evaluate each round.
    local_epochs : int
        Server epochs over each round's uploads.
    batch_size : int
        Server mini-batch.
    method : str
        The method name written into ``summary.json``.
    """

    trained = "server"  # what the training log line says was trained

    def __init__(
        self,
        recorder: RunRecorder,
        server: StatesServer,
        *,
        num_devices: int,
        devices_per_round: int = 0,
        fraction_evaluate: float = 1.0,
        local_epochs: int = 1,
        batch_size: int = 8,
        method: str,
    ) -> None:
        self._init_run(recorder, num_devices, method)
        self.server = server
        self.devices_per_round = devices_per_round or num_devices
        self.fraction_evaluate = fraction_evaluate
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self._grid: Grid | None = None
        self._timeout: float | None = None

    # ---- hooks -------------------------------------------------------------------------------
    def _decode(self, reply: Message, train: bool) -> StatesUpload:
        """A device's upload from its reply, checked before any use (raises UploadError)."""
        raise NotImplementedError

    def _train_flops(self, tokens: int, samples: int) -> float:
        """FLOPs of a round's server training (tokens and samples over all epochs)."""
        raise NotImplementedError

    def _eval_flops(self, tokens: int, samples: int) -> float:
        """FLOPs of the server's forwards that scored a round's test states."""
        raise NotImplementedError

    def _score(self, node: int, upload: StatesUpload) -> tuple[dict[str, np.ndarray], int]:
        """The arrays sent back to device ``node`` for its test states, and the tokens the
        server forwarded for them: the label logits."""
        logits, tokens = self.server.logits(upload, self.batch_size)
        return {"logits": logits}, tokens

    def _describe(self) -> str:
        """The server's model, for the start-up line."""
        raise NotImplementedError

    def _summary_fields(self) -> dict[str, Any]:
        """The method's own ``summary.json`` keys."""
        return {}

    # ---- sampling and recording --------------------------------------------------------------
    def _messages(
        self, grid: Grid, server_round: int, count: int, message_type: str
    ) -> list[Message]:
        nodes, _ = sample_nodes(grid, self.num_devices, count)
        return [
            Message(
                RecordDict({CONFIG: ConfigRecord({"server-round": server_round})}),
                dst_node_id=node,
                message_type=message_type,
            )
            for node in nodes
        ]

    def _decoded(
        self, server_round: int, replies: list[Message], train: bool
    ) -> Iterator[tuple[Message, StatesUpload]]:
        """The replies that decode, with their uploads; the others are rejected."""
        for reply in replies:
            if reply.has_error():
                continue
            try:
                upload = self._decode(reply, train)
            except UploadError as err:
                node = reply.metadata.src_node_id
                log.warning(
                    "round %d: rejected the reply of device %d: %s", server_round, node, err
                )
                self.recorder.metric(server_round, "rejected_uploads", 1, node_id=node)
                continue
            yield reply, upload

    # ---- training ----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's training requests (no weights: the devices only forward)."""
        self._round_start = time.perf_counter()
        self._grid = grid
        messages = self._messages(grid, server_round, self.devices_per_round, MessageType.TRAIN)
        self._record_sent(server_round, "train", messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the replies and the devices' costs, then train the server's model on them."""
        replies = list(replies)
        self._record_replies(server_round, "train", replies)
        uploads = []
        for reply, upload in self._decoded(server_round, replies, train=True):
            self._record_trained(server_round, reply, upload.task_key, FORWARD_COST_METRICS)
            uploads.append(upload)
        loss, seconds, tokens = self.server.train(
            uploads, self.local_epochs, self.batch_size, server_round
        )
        samples = sum(u.num_samples for u in uploads)
        for name, value in (
            ("train_samples", samples),
            ("server_train_seconds", seconds),
            ("server_train_tokens", tokens),
            ("server_train_flops", self._train_flops(tokens, samples * self.local_epochs)),
            ("train_loss", loss),
        ):
            self.recorder.metric(server_round, name, value)
        log.info(
            "round %d: %s trained on %d samples (%d epochs) in %.1fs, loss %.4f",
            server_round,
            self.trained,
            samples,
            self.local_epochs,
            seconds,
            loss,
        )
        return None, (MetricRecord({"train_loss": loss}) if samples else None)

    # ---- evaluation --------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's evaluation requests: devices answer with their test rows' states."""
        self._grid = grid
        count = max(1, round(self.fraction_evaluate * self.num_devices))
        messages = self._messages(grid, server_round, count, MessageType.EVALUATE)
        self._record_sent(server_round, "evaluate", messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Score the devices' test states, send each its logits, sum the counts it returns.

        The second round trip (``evaluate.scores``) runs here, on the grid of
        :meth:`configure_evaluate`; its messages are recorded in the ``evaluate`` phase.
        """
        replies = list(replies)
        self._record_replies(server_round, "evaluate", replies)
        scores, seconds, tokens, samples = [], 0.0, 0, 0
        for reply, upload in self._decoded(server_round, replies, train=False):
            self._record_device_cost(server_round, reply, EVAL_COST_METRICS, None)
            node = reply.metadata.src_node_id
            start = time.perf_counter()
            arrays, n = self._score(node, upload)
            seconds += time.perf_counter() - start
            tokens, samples = tokens + n, samples + upload.num_samples
            content = RecordDict(
                {
                    LOGITS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    CONFIG: ConfigRecord({"server-round": server_round}),
                }
            )
            scores.append(Message(content, dst_node_id=node, message_type=SCORES))
        self.recorder.metric(server_round, "server_eval_seconds", seconds)
        self.recorder.metric(server_round, "server_eval_flops", self._eval_flops(tokens, samples))
        self._record_sent(server_round, "evaluate", scores)
        counts = list(self._grid.send_and_receive(scores, timeout=self._timeout)) if scores else []
        self._record_replies(server_round, "evaluate", counts, "evaluate_scores_failed")
        out = self._accuracies(server_round, counts)
        return MetricRecord(out) if out else None

    # ---- the run -----------------------------------------------------------------------------
    def summary(self) -> None:
        log.info(
            "%s: %d devices, %d train per round, evaluate fraction %.2f, %s",
            type(self).__name__,
            self.num_devices,
            self.devices_per_round,
            self.fraction_evaluate,
            self._describe(),
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's rounds (nothing to send but requests), then ``summary.json`` and the
        parquet files."""
        self._timeout = timeout
        result = super().start(
            grid,
            initial_arrays if initial_arrays is not None else ArrayRecord(),
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )
        self.recorder.write(self.final_summary(num_rounds))
        return result

    def final_summary(self, num_rounds: int) -> dict:
        """:meth:`BaselineRun.final_summary` with the method's keys and the server's cost."""
        summary = super().final_summary(num_rounds)
        frame = self.recorder.metrics_frame()
        server = frame[frame["node_id"].isna()].groupby("metric")["value"].sum()
        summary.update(self._summary_fields())
        summary["server_cost"] = {
            name: float(server.get(f"server_{name}", 0.0))
            for name in (
                "train_seconds",
                "train_tokens",
                "train_flops",
                "eval_seconds",
                "eval_flops",
            )
        }
        return summary

    def _device_cost(self) -> dict[str, float]:
        """The devices' forwards: seconds, FLOPs, tokens."""
        cost = super()._device_cost()
        frame = self.recorder.metrics_frame()
        rows = frame[frame["node_id"].notna() & (frame["metric"] == "forward_seconds")]
        cost["forward_seconds"] = float(rows["value"].sum())
        return cost
