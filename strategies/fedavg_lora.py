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

import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from flower_pae.runlog import RunRecorder
from strategies.baseline import CONFIG, EVAL_COST_METRICS, METRICS, BaselineRun, log, task_key

ADAPTER = "arrays"  # FedAvg's ArrayRecord key: the LoRA adapters, both directions
# CONFIG is FedAvg's ConfigRecord key too (server → device); the task key (device → server)
__all__ = ["ADAPTER", "CONFIG", "METRICS", "FedAvgLoRAStrategy"]
# Per-device cost figures of a training reply that go into metrics.parquet (node_id set).
DEVICE_COST_METRICS = (
    "local_train_seconds",
    "seconds_per_sample",
    "peak_rss_mb",
    "tokens",
    "flops",
    "train_loss",
)


class FedAvgLoRAStrategy(BaselineRun, FedAvg):
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
        self._init_run(recorder, num_devices, method)

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
            self._record_trained(server_round, reply, task_key(reply), DEVICE_COST_METRICS)
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
        out = self._accuracies(server_round, replies, cost=EVAL_COST_METRICS)
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
