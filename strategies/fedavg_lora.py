"""FedAvg + LoRA as a Flower strategy: the baseline PAE is compared against (issue 5).

Flower's own :class:`~flwr.serverapp.strategy.FedAvg` does the protocol and the averaging
(adapters weighted by ``num-examples``, as FlowerTune does); this subclass only adds what the
comparison needs: every message, both directions, goes into the run directory with its
Flower-serialized size (the same :class:`~flower_pae.runlog.RunRecorder` calls as
:class:`strategies.pae.PAEStrategy`), the devices' cost figures go into ``metrics.parquet``,
evaluation counts are summed into accuracies, and ``summary.json`` has the keys ``analysis``
reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from flower_pae import cl_metrics
from flower_pae.runlog import RunRecorder
from flower_pae.server.validation import UploadError, evaluation_counts

log = logging.getLogger("flower_pae")

ADAPTER = "arrays"  # FedAvg's ArrayRecord key: the LoRA adapters, both directions
CONFIG = "config"  # FedAvg's ConfigRecord key (server → device); the task key (device → server)
METRICS = "metrics"  # the device's MetricRecord
# Per-device cost figures of a training reply that go into metrics.parquet (node_id set).
DEVICE_COST_METRICS = (
    "local_train_seconds",
    "seconds_per_sample",
    "peak_rss_mb",
    "tokens",
    "flops",
    "train_loss",
)
# ... and of an evaluation reply: the forward passes with the global adapters.
EVAL_COST_METRICS = ("eval_seconds", "eval_flops")


class FedAvgLoRAStrategy(FedAvg):
    """FedAvg over LoRA adapters trained on the devices, with the run directory of PAE.

    Parameters
    ----------
    recorder : RunRecorder
        Writes every message and metric into the run directory.
    num_devices : int
        Devices to wait for before the first round.
    devices_per_round : int
        Devices sampled for training each round (0: all).
    fraction_evaluate : float
        Fraction of devices that evaluate each round.
    method : str
        The method name written into ``summary.json``.
    """

    def __init__(
        self,
        recorder: RunRecorder,
        *,
        num_devices: int,
        devices_per_round: int = 0,
        fraction_evaluate: float = 1.0,
        method: str = "fedavg_lora",
    ) -> None:
        per_round = devices_per_round or num_devices
        super().__init__(
            fraction_train=per_round / num_devices,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=per_round,
            min_evaluate_nodes=max(1, round(fraction_evaluate * num_devices)),
            min_available_nodes=num_devices,
            arrayrecord_key=ADAPTER,
            configrecord_key=CONFIG,
        )
        self.recorder = recorder
        self.num_devices = num_devices
        self.method = method
        self.tasks: dict[str, list[int]] = {}  # task key → [first round, last round] trained
        self.accuracy: dict[int, dict[str, float]] = {}
        self.zero_shot: dict[str, float] = {}
        self.adapter_params = 0
        self._round_start = 0.0

    # ---- recording ---------------------------------------------------------------------------
    def _record_sent(self, server_round: int, phase: str, messages: list[Message]) -> None:
        for msg in messages:
            self.recorder.message(server_round, phase, msg, "down")

    def _record_replies(self, server_round: int, phase: str, replies: list[Message]) -> None:
        """Record each reply with its serialized size, then the phase's failures."""
        for reply in replies:
            key, n = None, 0
            if not reply.has_error() and phase == "train":
                key = _task_key(reply)
                n = int(reply.content[METRICS].get("num-examples", 0))
            self.recorder.message(server_round, phase, reply, "up", task_key=key, num_samples=n)
        failed = sum(reply.has_error() for reply in replies)
        self.recorder.metric(server_round, f"{phase}_failed", failed)
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

    # ---- training ----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's training messages (global adapters + round), recorded as sent."""
        self._round_start = time.perf_counter()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._record_sent(server_round, "train", messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the replies and the devices' costs, then FedAvg's example-weighted mean."""
        replies = list(replies)
        self._record_replies(server_round, "train", replies)
        for reply in replies:
            if reply.has_error():
                continue
            key = _task_key(reply)
            self.tasks.setdefault(key, [server_round, server_round])[1] = server_round
            self._record_device_cost(server_round, reply, DEVICE_COST_METRICS, key)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.adapter_params = sum(int(np.prod(a.shape)) for a in arrays.values())
        examples = sum(
            int(r.content[METRICS]["num-examples"]) for r in replies if not r.has_error()
        )
        self.recorder.metric(server_round, "train_samples", examples)
        return arrays, metrics

    # ---- evaluation --------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluation messages (global adapters), recorded as sent."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._record_sent(server_round, "evaluate", messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Sum the devices' correct/total counts per task into accuracies (as PAE does)."""
        replies = list(replies)
        self._record_replies(server_round, "evaluate", replies)
        sums: dict[str, np.ndarray] = {}
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            reported = reply.content[METRICS]
            try:
                seen, _ = evaluation_counts(
                    {k: v for k, v in reported.items() if k not in EVAL_COST_METRICS}
                )
            except UploadError as err:
                log.warning("round %d: bad evaluation from device %d: %s", server_round, node, err)
                self.recorder.metric(server_round, "rejected_evaluations", 1, node_id=node)
                continue
            self._record_device_cost(server_round, reply, EVAL_COST_METRICS, None)
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
        return MetricRecord(out) if out else None

    # ---- the run -----------------------------------------------------------------------------
    def summary(self) -> None:
        log.info(
            "FedAvgLoRAStrategy: %d devices, train fraction %.2f, evaluate fraction %.2f",
            self.num_devices,
            self.fraction_train,
            self.fraction_evaluate,
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's FedAvg rounds, then ``summary.json`` and the parquet files."""
        result = super().start(
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )
        self.recorder.write(self.final_summary(num_rounds))
        return result

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


def _task_key(reply: Message) -> str:
    """The opaque task key a device reports with its adapters."""
    return str(reply.content[CONFIG].get("task_key", ""))
