"""MobiLLM-style side tuning as a Flower strategy: the third baseline of issue 5.

The devices run the frozen backbone in inference mode and send the hidden states of the
selected layers at every prompt token, the final pivot state and, to train, the labels in
clear; this strategy trains a ladder side network on them
(:class:`flower_pae.baselines.mobillm.SideServer`). Nothing is cached: every round the devices
forward and send their whole shard again. The messages are those of split learning
(:mod:`strategies.split_lora`, same record names and round trips); each round:

1. ``train``: every sampled device gets the round number and replies with its training shard's
   states (``states`` record: ``states`` (Σ tokens, K, d) float16, or int8 with ``scales``
   (Σ tokens, K) float16; ``lengths``; ``final`` float32 (N, d); ``labels``), its task key
   and label words; the server trains ``local_epochs`` epochs over all of them.
2. ``evaluate``: devices reply with their test shard's states (no labels);
   ``evaluate.scores``: the server sends each device the label logits of its rows, the device
   replies with correct/total counts against its own labels (and the frozen backbone's,
   which it computes itself).

Every message, both directions and both evaluation round trips, goes into the run directory
with its Flower-serialized size (:class:`strategies.baseline.BaselineRun`).
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

from flower_pae.baselines.mobillm import MobiLLMUpload, SideServer
from flower_pae.runlog import RunRecorder
from flower_pae.server.validation import UploadError
from strategies.baseline import CONFIG, METRICS, BaselineRun, log, task_key
from strategies.split_lora import (
    DEVICE_COST_METRICS,
    EVAL_COST_METRICS,
    LOGITS,
    MAX_LABEL_WORDS,
    SCORES,
    STATES,
)

__all__ = [
    "CONFIG",
    "LOGITS",
    "METRICS",
    "SCORES",
    "STATES",
    "MobiLLMStrategy",
    "decode_upload",
]


def decode_upload(
    reply: Message,
    num_layers: int,
    hidden_size: int,
    train: bool,
    max_bytes: float = float("inf"),
) -> MobiLLMUpload:
    """A device's states (and labels) from its reply, checked before any use.

    The record's size is read before its arrays are decoded (``max_bytes``: the
    ``max_upload_mb`` cap).

    Raises
    ------
    UploadError
        A record over the cap, missing or unknown arrays, wrong dtypes or shapes (``K`` =
        ``num_layers`` layers of width ``hidden_size``), token counts that do not add up,
        non-finite values, labels outside the label words.
    """
    content = reply.content
    if STATES not in content.array_records or CONFIG not in content.config_records:
        raise UploadError(f"a reply needs the records {STATES!r} and {CONFIG!r}")
    size = sum(len(a.data) for a in content[STATES].values())
    if size > max_bytes:
        raise UploadError(
            f"the {STATES} record has {size / 2**20:.1f} MB, over max_upload_mb = "
            f"{max_bytes / 2**20:g} (raise max_upload_mb, or lower max_train or layers)"
        )
    arrays = {k: v.numpy() for k, v in content[STATES].items()}
    expected = {"states", "lengths", "final"} | ({"labels"} if train else set())
    if "scales" in arrays:
        expected.add("scales")
    if set(arrays) != expected:
        raise UploadError(f"{STATES} must hold exactly {sorted(expected)}, got {sorted(arrays)}")
    states, lengths, final = arrays["states"], arrays["lengths"], arrays["final"]
    shape = (num_layers, hidden_size)
    int8 = "scales" in arrays
    if states.dtype != (np.int8 if int8 else np.float16) or states.shape[1:] != shape:
        raise UploadError(
            f"states must be {'int8' if int8 else 'float16'} (tokens, {num_layers}, "
            f"{hidden_size}), got {states.dtype} {states.shape}"
        )
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or (lengths < 1).any():
        raise UploadError("lengths must be positive integers, one per sample")
    if int(lengths.sum()) != states.shape[0]:
        raise UploadError(f"lengths add up to {int(lengths.sum())}, states have {len(states)}")
    if final.dtype != np.float32 or final.shape != (len(lengths), hidden_size):
        raise UploadError(f"final must be float32 (samples, {hidden_size}), got {final.shape}")
    if int8:
        scales = arrays["scales"]
        if scales.dtype != np.float16 or scales.shape != states.shape[:2]:
            raise UploadError(f"scales must be float16 {states.shape[:2]}, got {scales.shape}")
        if not np.isfinite(scales).all() or (scales <= 0).any():
            raise UploadError("scales must be finite and positive")
    elif not np.isfinite(states).all():
        raise UploadError("states hold NaN or Inf")
    if not np.isfinite(final).all():
        raise UploadError("final holds NaN or Inf")
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
    return MobiLLMUpload(task_key=task_key(reply), label_words=list(words), arrays=arrays)


class MobiLLMStrategy(BaselineRun, Strategy):
    """MobiLLM: the server trains a side network on the devices' full-sequence states.

    Parameters
    ----------
    recorder : RunRecorder
        Writes every message and metric into the run directory.
    server : SideServer
        The side network with its optimizer and the label rows.
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
    max_upload_mb : float
        A reply's states record above this size is rejected unread.
    method : str
        The method name written into ``summary.json``.
    """

    def __init__(
        self,
        recorder: RunRecorder,
        server: SideServer,
        *,
        num_devices: int,
        devices_per_round: int = 0,
        fraction_evaluate: float = 1.0,
        local_epochs: int = 1,
        batch_size: int = 8,
        max_upload_mb: float = float("inf"),
        method: str = "mobillm",
    ) -> None:
        self._init_run(recorder, num_devices, method)
        self.server = server
        self.adapter_params = server.params
        self.devices_per_round = devices_per_round or num_devices
        self.fraction_evaluate = fraction_evaluate
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.max_bytes = max_upload_mb * 2**20
        self._grid: Grid | None = None
        self._timeout: float | None = None

    def _decode(self, reply: Message, train: bool) -> MobiLLMUpload:
        return decode_upload(
            reply,
            len(self.server.layers),
            int(self.server.view.hidden_size),
            train,
            self.max_bytes,
        )

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
        """The round's training requests (nothing to send: the side network stays here)."""
        self._round_start = time.perf_counter()
        self._grid = grid
        messages = self._messages(grid, server_round, self.devices_per_round, MessageType.TRAIN)
        self._record_sent(server_round, "train", messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the replies and the devices' costs, then train the side network on them."""
        replies = list(replies)
        self._record_replies(server_round, "train", replies)
        uploads = []
        for reply in replies:
            if reply.has_error():
                continue
            try:
                upload = self._decode(reply, train=True)
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
            ("server_train_flops", self.server.train_flops(tokens, samples * self.local_epochs)),
            ("train_loss", loss),
        ):
            self.recorder.metric(server_round, name, value)
        log.info(
            "round %d: side network trained on %d samples (%d epochs) in %.1fs, loss %.4f",
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
        scores, seconds, tokens, samples = [], 0.0, 0, 0
        for reply in replies:
            if reply.has_error():
                continue
            try:
                upload = self._decode(reply, train=False)
            except UploadError as err:
                self._reject(server_round, reply, err)
                continue
            self._record_device_cost(server_round, reply, EVAL_COST_METRICS, None)
            start = time.perf_counter()
            logits, n = self.server.logits(upload, self.batch_size)
            seconds += time.perf_counter() - start
            tokens, samples = tokens + n, samples + upload.num_samples
            content = RecordDict(
                {
                    LOGITS: ArrayRecord({"logits": Array(logits)}),
                    CONFIG: ConfigRecord({"server-round": server_round}),
                }
            )
            node = reply.metadata.src_node_id
            scores.append(Message(content, dst_node_id=node, message_type=SCORES))
        self.recorder.metric(server_round, "server_eval_seconds", seconds)
        self.recorder.metric(
            server_round, "server_eval_flops", self.server.forward_flops(tokens, samples)
        )
        self._record_sent(server_round, "evaluate", scores)
        counts = list(self._grid.send_and_receive(scores, timeout=self._timeout)) if scores else []
        self._record_replies(server_round, "evaluate", counts, "evaluate_scores_failed")
        out = self._accuracies(server_round, counts)
        return MetricRecord(out) if out else None

    # ---- the run -----------------------------------------------------------------------------
    def summary(self) -> None:
        log.info(
            "MobiLLMStrategy: %d devices, %d train per round, evaluate fraction %.2f, side "
            "network over %d layers, width %d, %d parameters",
            self.num_devices,
            self.devices_per_round,
            self.fraction_evaluate,
            len(self.server.layers),
            self.server.side.width,
            self.server.params,
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
        """:meth:`BaselineRun.final_summary` with the layers, the side network and the
        server's cost."""
        summary = super().final_summary(num_rounds)
        frame = self.recorder.metrics_frame()
        server = frame[frame["node_id"].isna()].groupby("metric")["value"].sum()
        summary["layers"] = list(self.server.layers)
        summary["side_width"] = self.server.side.width
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
        """The devices' forwards (the whole frozen backbone): seconds, FLOPs, tokens."""
        cost = super()._device_cost()
        frame = self.recorder.metrics_frame()
        rows = frame[frame["node_id"].notna() & (frame["metric"] == "forward_seconds")]
        cost["forward_seconds"] = float(rows["value"].sum())
        return cost
