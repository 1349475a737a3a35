"""Split learning + LoRA as a Flower strategy: the second baseline of issue 5.

The devices run the backbone's first ``split_layer`` layers and send the hidden states of every
prompt token there, with the labels in clear; this strategy holds the rest of the backbone with
LoRA adapters (:class:`flower_pae.baselines.split_lora.ServerHalf`) and trains it on them. The
devices' half is frozen, so nothing but evaluation results goes back down. Each round:

1. ``train``: every sampled device gets the round number and replies with its training shard's
   states (``states`` record: ``states`` fp16 (Σ tokens, d), ``lengths``, ``labels``), its task
   key and label words; the server trains ``local_epochs`` epochs over all of them.
2. ``evaluate``: devices reply with their test shard's states (no labels);
   ``evaluate.scores``: the server sends each device the label logits of its rows (and the
   frozen backbone's, the first time it scores that device's task), the device replies with
   correct/total counts against its own labels.

Every message, both directions and both evaluation round trips, goes into the run directory
with its Flower-serialized size, as for :class:`strategies.fedavg_lora.FedAvgLoRAStrategy`
(:class:`strategies.baseline.BaselineRun`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

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

from flower_pae.baselines.split_lora import ServerHalf, SplitUpload
from flower_pae.runlog import RunRecorder
from flower_pae.server.validation import UploadError
from strategies.baseline import CONFIG, METRICS, BaselineRun, log, task_key

__all__ = [
    "CONFIG",
    "LOGITS",
    "METRICS",
    "SCORES",
    "STATES",
    "SplitLoRAStrategy",
    "decode_upload",
]

STATES = "states"  # ArrayRecord (device → server): states, lengths (+ labels when training)
LOGITS = "logits"  # ArrayRecord (server → device): logits (+ zero_shot), float32 (N, C)
SCORES = f"{MessageType.EVALUATE}.scores"  # the second evaluation round trip
# Per-device cost figures of a training reply that go into metrics.parquet (node_id set): the
# forward of the first split_layer layers ("forward_seconds", as PAE's devices report it).
DEVICE_COST_METRICS = ("forward_seconds", "peak_rss_mb", "tokens", "flops")
# ... and of the first evaluation reply: the forward of the test rows.
EVAL_COST_METRICS = ("eval_seconds", "eval_flops")
MAX_LABEL_WORDS = 1000


def decode_upload(reply: Message, hidden_size: int, train: bool) -> SplitUpload:
    """A device's states (and labels) from its reply, checked before any use.

    Raises
    ------
    UploadError
        Missing or unknown arrays, wrong dtypes or shapes, token counts that do not add up,
        non-finite states, labels outside the label words.
    """
    content = reply.content
    if STATES not in content.array_records or CONFIG not in content.config_records:
        raise UploadError(f"a reply needs the records {STATES!r} and {CONFIG!r}")
    arrays = {k: v.numpy() for k, v in content[STATES].items()}
    expected = {"states", "lengths", "labels"} if train else {"states", "lengths"}
    if set(arrays) != expected:
        raise UploadError(f"{STATES} must hold exactly {sorted(expected)}, got {sorted(arrays)}")
    states, lengths = arrays["states"], arrays["lengths"]
    if states.dtype != np.float16 or states.ndim != 2 or states.shape[1] != hidden_size:
        raise UploadError(f"states must be float16 (tokens, {hidden_size}), got {states.shape}")
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or (lengths < 1).any():
        raise UploadError("lengths must be positive integers, one per sample")
    if int(lengths.sum()) != states.shape[0]:
        raise UploadError(f"lengths add up to {int(lengths.sum())}, states have {len(states)}")
    if not np.isfinite(states).all():
        raise UploadError("states hold NaN or Inf")
    words = content[CONFIG].get("label_words")
    if (
        not isinstance(words, list)
        or not 2 <= len(words) <= MAX_LABEL_WORDS
        or not all(isinstance(w, str) and w for w in words)
    ):
        raise UploadError("label_words must be a list of at least two non-empty strings")
    if train:
        labels = arrays["labels"]
        if labels.shape != lengths.shape or labels.dtype.kind not in "iu":
            raise UploadError("labels must be integers, one per sample")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(words)):
            raise UploadError(f"labels must index the {len(words)} label words")
    return SplitUpload(task_key=task_key(reply), label_words=list(words), arrays=arrays)


class SplitLoRAStrategy(BaselineRun, Strategy):
    """Split learning: the server trains its half of the backbone (LoRA) on the devices' states.

    Parameters
    ----------
    recorder : RunRecorder
        Writes every message and metric into the run directory.
    server : ServerHalf
        The server's layers with their adapters and optimizer.
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

    def __init__(
        self,
        recorder: RunRecorder,
        server: ServerHalf,
        *,
        num_devices: int,
        devices_per_round: int = 0,
        fraction_evaluate: float = 1.0,
        local_epochs: int = 1,
        batch_size: int = 8,
        method: str = "split_lora",
    ) -> None:
        self._init_run(recorder, num_devices, method)
        self.server = server
        self.adapter_params = server.lora_params
        self.devices_per_round = devices_per_round or num_devices
        self.fraction_evaluate = fraction_evaluate
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.hidden_size = int(server.view.hidden_size)
        self._zero_shot_sent: set[tuple[int, str]] = set()  # (node, task key) scored frozen
        self._grid: Grid | None = None
        self._timeout: float | None = None

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

    def _reject(self, server_round: int, reply: Message, err: UploadError) -> None:
        node = reply.metadata.src_node_id
        log.warning("round %d: rejected the reply of device %d: %s", server_round, node, err)
        self.recorder.metric(server_round, "rejected_uploads", 1, node_id=node)

    # ---- training ----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's training requests (no weights: the devices' half is frozen)."""
        self._round_start = time.perf_counter()
        self._grid = grid
        messages = self._messages(grid, server_round, self.devices_per_round, MessageType.TRAIN)
        self._record_sent(server_round, "train", messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the replies and the devices' costs, then train the server's half on them."""
        replies = list(replies)
        self._record_replies(server_round, "train", replies)
        uploads = []
        for reply in replies:
            if reply.has_error():
                continue
            try:
                upload = decode_upload(reply, self.hidden_size, train=True)
            except UploadError as err:
                self._reject(server_round, reply, err)
                continue
            key = upload.task_key
            self.tasks.setdefault(key, [server_round, server_round])[1] = server_round
            self._record_device_cost(server_round, reply, DEVICE_COST_METRICS, key)
            uploads.append(upload)
        loss, seconds, tokens = self.server.train(
            uploads, self.local_epochs, self.batch_size, server_round
        )
        samples = sum(u.num_samples for u in uploads)
        for name, value in (
            ("train_samples", samples),
            ("server_train_seconds", seconds),
            ("server_train_tokens", tokens),
            ("server_train_flops", self.server.train_flops(tokens)),
            ("train_loss", loss),
        ):
            self.recorder.metric(server_round, name, value)
        log.info(
            "round %d: server trained on %d samples (%d epochs) in %.1fs, loss %.4f",
            server_round,
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
        scores, seconds, tokens = [], 0.0, 0
        for reply in replies:
            if reply.has_error():
                continue
            try:
                upload = decode_upload(reply, self.hidden_size, train=False)
            except UploadError as err:
                self._reject(server_round, reply, err)
                continue
            self._record_device_cost(server_round, reply, EVAL_COST_METRICS, None)
            node = reply.metadata.src_node_id
            start = time.perf_counter()
            logits, n = self.server.logits(upload, self.batch_size)
            arrays = {"logits": logits}
            if (node, upload.task_key) not in self._zero_shot_sent:
                arrays["zero_shot"], _ = self.server.logits(upload, self.batch_size, False)
                self._zero_shot_sent.add((node, upload.task_key))
                n *= 2
            seconds += time.perf_counter() - start
            tokens += n
            content = RecordDict(
                {
                    LOGITS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    CONFIG: ConfigRecord({"server-round": server_round}),
                }
            )
            scores.append(Message(content, dst_node_id=node, message_type=SCORES))
        self.recorder.metric(server_round, "server_eval_seconds", seconds)
        self.recorder.metric(server_round, "server_eval_flops", self.server.forward_flops(tokens))
        self._record_sent(server_round, "evaluate", scores)
        counts = list(self._grid.send_and_receive(scores, timeout=self._timeout)) if scores else []
        self._record_replies(server_round, "evaluate", counts, "evaluate_scores_failed")
        out = self._accuracies(server_round, counts)
        return MetricRecord(out) if out else None

    # ---- the run -----------------------------------------------------------------------------
    def summary(self) -> None:
        log.info(
            "SplitLoRAStrategy: %d devices, %d train per round, evaluate fraction %.2f, "
            "server layers %d..%d with %d LoRA parameters",
            self.num_devices,
            self.devices_per_round,
            self.fraction_evaluate,
            self.server.split_layer + 1,
            self.server.num_layers,
            self.server.lora_params,
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
        """:meth:`BaselineRun.final_summary` with the split and the server's cost."""
        summary = super().final_summary(num_rounds)
        frame = self.recorder.metrics_frame()
        server = frame[frame["node_id"].isna()].groupby("metric")["value"].sum()
        summary["split_layer"] = self.server.split_layer
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
        """The devices' forwards (first ``split_layer`` layers): seconds, FLOPs, tokens."""
        cost = super()._device_cost()
        frame = self.recorder.metrics_frame()
        rows = frame[frame["node_id"].notna() & (frame["metric"] == "forward_seconds")]
        cost["forward_seconds"] = float(rows["value"].sum())
        return cost
