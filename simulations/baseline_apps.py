"""The baselines as Flower apps, on the same harness as PAE (``method = "fedavg_lora"``,
``"split_lora"`` or ``"mobillm"``).

:func:`make_apps` builds a baseline's (ServerApp, ClientApp) pair from its builders: the
strategy (:data:`StrategyBuilder`), the device (:data:`DeviceBuilder`) and the ClientApp's
handlers. FedAvg + LoRA routes messages to :class:`flower_pae.baselines.fedavg_lora.LoRADevice`
and runs :class:`strategies.fedavg_lora.FedAvgLoRAStrategy`; split learning and MobiLLM (the
same messages) route to :class:`flower_pae.baselines.split_lora.SplitDevice` or
:class:`flower_pae.baselines.mobillm.MobiLLMDevice` and run
:class:`strategies.split_lora.SplitLoRAStrategy` or :class:`strategies.mobillm.MobiLLMStrategy`.
``simulations.cli.simulate`` picks them by method (:func:`baseline_apps`); everything else
(Ray, devices, data, the run directory) is PAE's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from flower_pae.baselines.base import StatesUpload
from flower_pae.config import ConfigError, RunConfig
from flower_pae.device.device import TaskEval
from flower_pae.runlog import RunRecorder
from flower_pae.wire import array_record
from strategies.baseline import CONFIG, LOGITS, METRICS, STATES
from strategies.fedavg_lora import ADAPTER

DeviceBuilder = Callable[[RunConfig, int], Any]
"""A baseline's device for (settings, partition id)."""
StrategyBuilder = Callable[[RunConfig, RunRecorder], tuple[Strategy, ArrayRecord]]
"""A baseline's strategy and its initial arrays (built under the server's torch threads)."""
Handlers = Callable[[ClientApp, Callable[[Context], Any]], None]
"""Registers a baseline's message handlers on a ClientApp, given the device of a context."""

_DEVICES: dict = {}
_ZERO_SHOT = "baseline_zero_shot"  # Context.state: the frozen backbone's correct counts per task


def _settings(cfg: RunConfig | None, context: Context, method: str) -> RunConfig:
    cfg = cfg if cfg is not None else RunConfig.from_dict(dict(context.run_config))
    if cfg.method != method:
        raise ConfigError(f"the {method} apps need method={method!r}, got {cfg.method!r}")
    return cfg


def _zero_shot(context: Context) -> MetricRecord:
    if _ZERO_SHOT not in context.state:
        context.state[_ZERO_SHOT] = MetricRecord()
    return context.state[_ZERO_SHOT]


def _round(msg: Message) -> int:
    return int(msg.content[CONFIG]["server-round"])


def _counts_reply(msg: Message, tasks: list[TaskEval], metrics: dict[str, float]) -> Message:
    """An evaluation reply: the devices' correct/total counts per task (and ``metrics``)."""
    out: dict[str, int | float] = {"num-examples": sum(t.total for t in tasks), **metrics}
    for t in tasks:
        out[f"{t.task_key}/correct"] = t.correct
        out[f"{t.task_key}/zero_shot_correct"] = t.zero_shot_correct
        out[f"{t.task_key}/total"] = t.total
    return Message(RecordDict({METRICS: MetricRecord(out)}), reply_to=msg)


def _sampling(cfg: RunConfig) -> dict[str, Any]:
    """Every baseline strategy's settings: the devices, and who trains and evaluates."""
    return {
        "num_devices": cfg.num_devices,
        "devices_per_round": cfg.devices_per_round,
        "fraction_evaluate": cfg.fraction_evaluate,
    }


def _server_training(cfg: RunConfig) -> dict[str, Any]:
    """... and those of a strategy whose server trains (split learning, MobiLLM)."""
    return {**_sampling(cfg), "local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size}


def make_apps(
    method: str,
    strategy: StrategyBuilder,
    device: DeviceBuilder,
    handlers: Handlers,
    cfg: RunConfig | None = None,
) -> tuple[ServerApp, ClientApp]:
    """A baseline's (ServerApp, ClientApp) pair, with fixed settings or Flower's run config.

    The server runs ``strategy`` for ``rounds_per_task`` rounds and writes the run directory;
    the devices are built once per (settings, partition) per process, so that their model
    loads once per Ray actor.
    """

    def device_of(context: Context) -> Any:
        settings = _settings(cfg, context, method)
        pid = int(context.node_config["partition-id"])
        key = (method, json.dumps(settings.to_dict(), sort_keys=True), pid)
        if key not in _DEVICES:
            _DEVICES[key] = device(settings, pid)
        return _DEVICES[key]

    client_app = ClientApp()
    handlers(client_app, device_of)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from simulations.server_app import num_rounds, run_dir, torch_threads

        settings = _settings(cfg, context, method)
        out = run_dir(settings)
        recorder = RunRecorder(out, settings.to_dict(), record_wire=settings.record_wire)
        with torch_threads(settings.server_threads):
            run, arrays = strategy(settings, recorder)
            run.start(grid, arrays, num_rounds=num_rounds(settings), timeout=settings.timeout)

    return server_app, client_app


# ---- FedAvg + LoRA: adapters down and up -----------------------------------------------------


def _lora_handlers(app: ClientApp, device_of: Callable[[Context], Any]) -> None:
    def adapter(msg: Message) -> dict:
        return {k: v.numpy() for k, v in msg.content[ADAPTER].items()}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        device = device_of(context)
        server_round = _round(msg)
        result = device.train(server_round, adapter(msg))
        log(
            INFO,
            "device %d, round %d: LoRA on %d samples in %.1fs (%.3fs/sample, %.0f MB peak)",
            device.partition_id,
            server_round,
            result.num_examples,
            result.seconds,
            result.seconds_per_sample,
            result.peak_rss_mb,
        )
        metrics = MetricRecord(
            {
                "num-examples": result.num_examples,
                "local_train_seconds": result.seconds,
                "seconds_per_sample": result.seconds_per_sample,
                "peak_rss_mb": result.peak_rss_mb,
                "tokens": result.tokens,
                "flops": result.flops,
                "train_loss": result.loss,
            }
        )
        content = RecordDict(
            {
                ADAPTER: array_record(result.adapter),
                METRICS: metrics,
                CONFIG: ConfigRecord({"task_key": result.task_key}),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        result = device_of(context).evaluate(_round(msg), adapter(msg), _zero_shot(context))
        cost = {"eval_seconds": result.seconds, "eval_flops": result.flops}
        return _counts_reply(msg, result.tasks, cost)


def _lora_device(cfg: RunConfig, partition_id: int) -> Any:
    from flower_pae.baselines.fedavg_lora import LoRADevice

    return LoRADevice(cfg, partition_id)


def _fedavg_lora_strategy(cfg: RunConfig, recorder: RunRecorder) -> tuple[Strategy, ArrayRecord]:
    from flower_pae.baselines.fedavg_lora import initial_adapter
    from strategies.fedavg_lora import FedAvgLoRAStrategy

    strategy = FedAvgLoRAStrategy(recorder, **_sampling(cfg))
    return strategy, array_record(initial_adapter(cfg))


# ---- split learning and MobiLLM: states up, logits down --------------------------------------


def _states_handlers(app: ClientApp, device_of: Callable[[Context], Any]) -> None:
    def states_reply(msg: Message, upload: StatesUpload, metrics: dict[str, float]) -> Message:
        content = RecordDict(
            {
                STATES: array_record(upload.arrays),
                METRICS: MetricRecord({"num-examples": upload.num_samples, **metrics}),
                CONFIG: ConfigRecord(
                    {"task_key": upload.task_key, "label_words": list(upload.label_words)}
                ),
            }
        )
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        device = device_of(context)
        server_round = _round(msg)
        upload = device.train_upload(server_round)
        log(
            INFO,
            "device %d, round %d: %s in %.1fs (%.0f MB peak)",
            device.partition_id,
            server_round,
            device.describe(upload),
            upload.seconds,
            upload.peak_rss_mb,
        )
        metrics = {
            "forward_seconds": upload.seconds,
            "peak_rss_mb": upload.peak_rss_mb,
            "tokens": upload.tokens,
            "flops": upload.flops,
        }
        return states_reply(msg, upload, metrics)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        upload = device_of(context).eval_upload(_round(msg), _zero_shot(context))
        cost = {"eval_seconds": upload.seconds, "eval_flops": upload.flops}
        return states_reply(msg, upload, cost)

    @app.evaluate("scores")
    def scores(msg: Message, context: Context) -> Message:
        arrays = {k: v.numpy() for k, v in msg.content[LOGITS].items()}
        tasks = device_of(context).evaluate(
            _round(msg), arrays["logits"], arrays.get("zero_shot"), _zero_shot(context)
        )
        return _counts_reply(msg, tasks, {})


def _split_device(cfg: RunConfig, partition_id: int) -> Any:
    from flower_pae.baselines.split_lora import SplitDevice

    return SplitDevice(cfg, partition_id)


def _split_lora_strategy(cfg: RunConfig, recorder: RunRecorder) -> tuple[Strategy, ArrayRecord]:
    from flower_pae.baselines.split_lora import ServerHalf
    from strategies.split_lora import SplitLoRAStrategy

    server = ServerHalf(cfg.model, cfg.split_layer, cfg.lora_r, cfg.lora_lr, cfg.seed)
    return SplitLoRAStrategy(recorder, server, **_server_training(cfg)), ArrayRecord()


def _mobillm_device(cfg: RunConfig, partition_id: int) -> Any:
    from flower_pae.baselines.mobillm import MobiLLMDevice

    return MobiLLMDevice(cfg, partition_id)


def _mobillm_strategy(cfg: RunConfig, recorder: RunRecorder) -> tuple[Strategy, ArrayRecord]:
    from flower_pae.baselines.mobillm import SideServer
    from strategies.mobillm import MobiLLMStrategy

    server = SideServer(cfg.model, cfg.layers, cfg.lr, cfg.seed)
    strategy = MobiLLMStrategy(
        recorder, server, max_upload_mb=cfg.max_upload_mb, **_server_training(cfg)
    )
    return strategy, ArrayRecord()


# (strategy, device, ClientApp handlers) of each baseline, by method
BUILDERS: dict[str, tuple[StrategyBuilder, DeviceBuilder, Handlers]] = {
    "fedavg_lora": (_fedavg_lora_strategy, _lora_device, _lora_handlers),
    "split_lora": (_split_lora_strategy, _split_device, _states_handlers),
    "mobillm": (_mobillm_strategy, _mobillm_device, _states_handlers),
}


def baseline_apps(cfg: RunConfig) -> tuple[ServerApp, ClientApp]:
    """The apps of the baseline ``cfg.method`` (one of :data:`flower_pae.config.BASELINES`)
    for a simulation with ``cfg``."""
    if cfg.method not in BUILDERS:
        raise ConfigError(f"method {cfg.method!r} is not a baseline; those are {sorted(BUILDERS)}")
    if cfg.resume:
        raise ConfigError(f"resume is not supported with method={cfg.method!r} (no checkpoints)")
    return make_apps(cfg.method, *BUILDERS[cfg.method], cfg=cfg)
