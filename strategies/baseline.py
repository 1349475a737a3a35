"""What the baselines' strategies share: the run directory, as PAE's strategy writes it.

:class:`BaselineRun` records every message (both directions, Flower-serialized size) and the
devices' cost figures through the :class:`~flower_pae.runlog.RunRecorder`, sums evaluation
counts into accuracies, and writes the ``summary.json`` keys ``analysis`` reads. Used by
:class:`strategies.fedavg_lora.FedAvgLoRAStrategy`,
:class:`strategies.split_lora.SplitLoRAStrategy` and :class:`strategies.mobillm.MobiLLMStrategy`.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Message

from flower_pae import cl_metrics
from flower_pae.runlog import RunRecorder
from flower_pae.server.validation import UploadError, evaluation_counts

log = logging.getLogger("flower_pae")

CONFIG = "config"  # ConfigRecord: round settings (server → device); the task key (device → server)
METRICS = "metrics"  # the device's MetricRecord


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
