"""The baselines as Flower apps, on the same harness as PAE (``method = "fedavg_lora"``).

:func:`make_fedavg_lora_client_app` routes messages to
:class:`flower_pae.baselines.fedavg_lora.LoRADevice`; :func:`make_fedavg_lora_server_app`
runs :class:`strategies.fedavg_lora.FedAvgLoRAStrategy`. ``simulations.cli.simulate`` picks
them for that method; everything else (Ray, devices, data, the run directory) is PAE's.
"""

from __future__ import annotations

import json
from logging import INFO

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from flower_pae.config import ConfigError, RunConfig
from flower_pae.runlog import RunRecorder
from flower_pae.wire import array_record
from strategies.fedavg_lora import ADAPTER, CONFIG, METRICS, FedAvgLoRAStrategy

_DEVICES: dict = {}
_ZERO_SHOT = "lora_zero_shot"  # Context.state: the frozen backbone's correct counts per task


def _settings(cfg: RunConfig | None, context: Context) -> RunConfig:
    cfg = cfg if cfg is not None else RunConfig.from_dict(dict(context.run_config))
    if cfg.method != "fedavg_lora":
        raise ConfigError(f"the FedAvg + LoRA apps need method='fedavg_lora', got {cfg.method!r}")
    return cfg


def _lora_device(cfg: RunConfig, context: Context):
    """One LoRADevice per (settings, partition) per process; the model loads once per actor."""
    from flower_pae.baselines.fedavg_lora import LoRADevice

    pid = int(context.node_config["partition-id"])
    key = (json.dumps(cfg.to_dict(), sort_keys=True), pid)
    if key not in _DEVICES:
        _DEVICES[key] = LoRADevice(cfg, pid)
    return _DEVICES[key]


def _adapter(msg: Message) -> dict:
    return {k: v.numpy() for k, v in msg.content[ADAPTER].items()}


def make_fedavg_lora_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp of FedAvg + LoRA devices, with fixed settings or Flower's run config."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        device = _lora_device(_settings(cfg, context), context)
        server_round = int(msg.content[CONFIG]["server-round"])
        result = device.train(server_round, _adapter(msg))
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
        device = _lora_device(_settings(cfg, context), context)
        server_round = int(msg.content[CONFIG]["server-round"])
        if _ZERO_SHOT not in context.state:
            context.state[_ZERO_SHOT] = MetricRecord()
        zero_shot = context.state[_ZERO_SHOT]
        result = device.evaluate(server_round, _adapter(msg), zero_shot)
        metrics: dict[str, int | float] = {
            "num-examples": sum(t.total for t in result.tasks),
            "eval_seconds": result.seconds,
            "eval_flops": result.flops,
        }
        for t in result.tasks:
            metrics[f"{t.task_key}/correct"] = t.correct
            metrics[f"{t.task_key}/zero_shot_correct"] = t.zero_shot_correct
            metrics[f"{t.task_key}/total"] = t.total
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


def run_fedavg_lora_server(grid: Grid, cfg: RunConfig) -> FedAvgLoRAStrategy:
    """Run FedAvg + LoRA for ``rounds_per_task`` rounds and write the run directory."""
    from flower_pae.baselines.fedavg_lora import initial_adapter
    from simulations.server_app import num_rounds, run_dir, torch_threads

    out = run_dir(cfg)
    recorder = RunRecorder(out, cfg.to_dict(), record_wire=cfg.record_wire)
    strategy = FedAvgLoRAStrategy(
        recorder,
        num_devices=cfg.num_devices,
        devices_per_round=cfg.devices_per_round,
        fraction_evaluate=cfg.fraction_evaluate,
    )
    with torch_threads(cfg.server_threads):
        arrays = array_record(initial_adapter(cfg))
        strategy.start(grid, arrays, num_rounds=num_rounds(cfg), timeout=cfg.timeout)
    return strategy


def make_fedavg_lora_server_app(cfg: RunConfig | None = None) -> ServerApp:
    """A ServerApp running :class:`FedAvgLoRAStrategy`, with fixed settings or the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_fedavg_lora_server(grid, _settings(cfg, context))

    return app


def fedavg_lora_apps(cfg: RunConfig) -> tuple[ServerApp, ClientApp]:
    """The (ServerApp, ClientApp) pair of FedAvg + LoRA for a simulation with ``cfg``."""
    if cfg.resume:
        raise ConfigError("resume is not supported with method='fedavg_lora' (no checkpoints)")
    return make_fedavg_lora_server_app(cfg), make_fedavg_lora_client_app(cfg)
