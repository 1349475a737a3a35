"""The baselines as Flower apps, on the same harness as PAE (``method = "fedavg_lora"``,
``"split_lora"`` or ``"mobillm"``).

:func:`make_fedavg_lora_client_app` routes messages to
:class:`flower_pae.baselines.fedavg_lora.LoRADevice`; :func:`make_fedavg_lora_server_app`
runs :class:`strategies.fedavg_lora.FedAvgLoRAStrategy`. The split-learning pair routes to
:class:`flower_pae.baselines.split_lora.SplitDevice` and runs
:class:`strategies.split_lora.SplitLoRAStrategy`; MobiLLM's pair routes to
:class:`flower_pae.baselines.mobillm.MobiLLMDevice` and runs
:class:`strategies.mobillm.MobiLLMStrategy` (the same messages as split learning).
``simulations.cli.simulate`` picks them by
method (:func:`baseline_apps`); everything else (Ray, devices, data, the run directory) is PAE's.
"""

from __future__ import annotations

import json
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from flower_pae.config import ConfigError, RunConfig
from flower_pae.runlog import RunRecorder
from flower_pae.wire import array_record
from strategies.fedavg_lora import ADAPTER, CONFIG, METRICS, FedAvgLoRAStrategy

_DEVICES: dict = {}
_ZERO_SHOT = "lora_zero_shot"  # Context.state: the frozen backbone's correct counts per task


def _settings(cfg: RunConfig | None, context: Context, method: str = "fedavg_lora") -> RunConfig:
    cfg = cfg if cfg is not None else RunConfig.from_dict(dict(context.run_config))
    if cfg.method != method:
        raise ConfigError(f"the {method} apps need method={method!r}, got {cfg.method!r}")
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


# ---- split learning + LoRA -------------------------------------------------------------------


def _split_device(cfg: RunConfig, context: Context):
    """One SplitDevice per (settings, partition) per process; its half loads once per actor."""
    from flower_pae.baselines.split_lora import SplitDevice

    pid = int(context.node_config["partition-id"])
    key = ("split", json.dumps(cfg.to_dict(), sort_keys=True), pid)
    if key not in _DEVICES:
        _DEVICES[key] = SplitDevice(cfg, pid)
    return _DEVICES[key]


def _states_reply(msg: Message, upload, metrics: dict) -> Message:
    from strategies.split_lora import STATES

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


def make_split_lora_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp of split-learning devices, with fixed settings or Flower's run config."""
    from strategies.split_lora import LOGITS

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        device = _split_device(_settings(cfg, context, "split_lora"), context)
        server_round = int(msg.content[CONFIG]["server-round"])
        upload = device.train_upload(server_round)
        log(
            INFO,
            "device %d, round %d: layers 1..%d on %d samples in %.1fs (%.0f MB peak)",
            device.partition_id,
            server_round,
            device.cfg.split_layer,
            upload.num_samples,
            upload.seconds,
            upload.peak_rss_mb,
        )
        metrics = {
            "forward_seconds": upload.seconds,
            "peak_rss_mb": upload.peak_rss_mb,
            "tokens": upload.tokens,
            "flops": upload.flops,
        }
        return _states_reply(msg, upload, metrics)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        device = _split_device(_settings(cfg, context, "split_lora"), context)
        upload = device.eval_upload(int(msg.content[CONFIG]["server-round"]))
        return _states_reply(
            msg, upload, {"eval_seconds": upload.seconds, "eval_flops": upload.flops}
        )

    @app.evaluate("scores")
    def scores(msg: Message, context: Context) -> Message:
        device = _split_device(_settings(cfg, context, "split_lora"), context)
        server_round = int(msg.content[CONFIG]["server-round"])
        if _ZERO_SHOT not in context.state:
            context.state[_ZERO_SHOT] = MetricRecord()
        arrays = {k: v.numpy() for k, v in msg.content[LOGITS].items()}
        tasks = device.evaluate(
            server_round, arrays["logits"], arrays.get("zero_shot"), context.state[_ZERO_SHOT]
        )
        metrics: dict[str, int] = {"num-examples": sum(t.total for t in tasks)}
        for t in tasks:
            metrics[f"{t.task_key}/correct"] = t.correct
            metrics[f"{t.task_key}/zero_shot_correct"] = t.zero_shot_correct
            metrics[f"{t.task_key}/total"] = t.total
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


def run_split_lora_server(grid: Grid, cfg: RunConfig):
    """Run split learning for ``rounds_per_task`` rounds and write the run directory."""
    from flower_pae.baselines.split_lora import ServerHalf
    from simulations.server_app import num_rounds, run_dir, torch_threads
    from strategies.split_lora import SplitLoRAStrategy

    out = run_dir(cfg)
    recorder = RunRecorder(out, cfg.to_dict(), record_wire=cfg.record_wire)
    with torch_threads(cfg.server_threads):
        server = ServerHalf(cfg.model, cfg.split_layer, cfg.lora_r, cfg.lora_lr, cfg.seed)
        strategy = SplitLoRAStrategy(
            recorder,
            server,
            num_devices=cfg.num_devices,
            devices_per_round=cfg.devices_per_round,
            fraction_evaluate=cfg.fraction_evaluate,
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
        )
        strategy.start(grid, ArrayRecord(), num_rounds=num_rounds(cfg), timeout=cfg.timeout)
    return strategy


def make_split_lora_server_app(cfg: RunConfig | None = None) -> ServerApp:
    """A ServerApp running :class:`SplitLoRAStrategy`, with fixed settings or the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_split_lora_server(grid, _settings(cfg, context, "split_lora"))

    return app


def split_lora_apps(cfg: RunConfig) -> tuple[ServerApp, ClientApp]:
    """The (ServerApp, ClientApp) pair of split learning for a simulation with ``cfg``."""
    if cfg.resume:
        raise ConfigError("resume is not supported with method='split_lora' (no checkpoints)")
    return make_split_lora_server_app(cfg), make_split_lora_client_app(cfg)


# ---- MobiLLM-style side tuning ---------------------------------------------------------------

_MOBILLM_ZERO_SHOT = "mobillm_zero_shot"  # Context.state: the frozen backbone's correct counts


def _mobillm_device(cfg: RunConfig, context: Context):
    """One MobiLLMDevice per (settings, partition) per process; the backbone loads once."""
    from flower_pae.baselines.mobillm import MobiLLMDevice

    pid = int(context.node_config["partition-id"])
    key = ("mobillm", json.dumps(cfg.to_dict(), sort_keys=True), pid)
    if key not in _DEVICES:
        _DEVICES[key] = MobiLLMDevice(cfg, pid)
    return _DEVICES[key]


def _zero_shot_state(context: Context) -> MetricRecord:
    if _MOBILLM_ZERO_SHOT not in context.state:
        context.state[_MOBILLM_ZERO_SHOT] = MetricRecord()
    return context.state[_MOBILLM_ZERO_SHOT]


def make_mobillm_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp of MobiLLM devices, with fixed settings or Flower's run config."""
    from strategies.mobillm import LOGITS

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        device = _mobillm_device(_settings(cfg, context, "mobillm"), context)
        server_round = int(msg.content[CONFIG]["server-round"])
        upload = device.train_upload(server_round)
        log(
            INFO,
            "device %d, round %d: %d layers' states of %d samples (%d tokens) in %.1fs "
            "(%.0f MB peak)",
            device.partition_id,
            server_round,
            len(device.layers),
            upload.num_samples,
            upload.tokens,
            upload.seconds,
            upload.peak_rss_mb,
        )
        metrics = {
            "forward_seconds": upload.seconds,
            "peak_rss_mb": upload.peak_rss_mb,
            "tokens": upload.tokens,
            "flops": upload.flops,
        }
        return _states_reply(msg, upload, metrics)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        device = _mobillm_device(_settings(cfg, context, "mobillm"), context)
        server_round = int(msg.content[CONFIG]["server-round"])
        upload = device.eval_upload(server_round, _zero_shot_state(context))
        return _states_reply(
            msg, upload, {"eval_seconds": upload.seconds, "eval_flops": upload.flops}
        )

    @app.evaluate("scores")
    def scores(msg: Message, context: Context) -> Message:
        device = _mobillm_device(_settings(cfg, context, "mobillm"), context)
        server_round = int(msg.content[CONFIG]["server-round"])
        logits = msg.content[LOGITS]["logits"].numpy()
        tasks = device.evaluate(server_round, logits, zero_shot=_zero_shot_state(context))
        metrics: dict[str, int] = {"num-examples": sum(t.total for t in tasks)}
        for t in tasks:
            metrics[f"{t.task_key}/correct"] = t.correct
            metrics[f"{t.task_key}/zero_shot_correct"] = t.zero_shot_correct
            metrics[f"{t.task_key}/total"] = t.total
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


def run_mobillm_server(grid: Grid, cfg: RunConfig):
    """Run MobiLLM for ``rounds_per_task`` rounds and write the run directory."""
    from flower_pae.baselines.mobillm import SideServer
    from simulations.server_app import num_rounds, run_dir, torch_threads
    from strategies.mobillm import MobiLLMStrategy

    out = run_dir(cfg)
    recorder = RunRecorder(out, cfg.to_dict(), record_wire=cfg.record_wire)
    with torch_threads(cfg.server_threads):
        server = SideServer(cfg.model, cfg.layers, cfg.lr, cfg.seed)
        strategy = MobiLLMStrategy(
            recorder,
            server,
            num_devices=cfg.num_devices,
            devices_per_round=cfg.devices_per_round,
            fraction_evaluate=cfg.fraction_evaluate,
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            max_upload_mb=cfg.max_upload_mb,
        )
        strategy.start(grid, ArrayRecord(), num_rounds=num_rounds(cfg), timeout=cfg.timeout)
    return strategy


def make_mobillm_server_app(cfg: RunConfig | None = None) -> ServerApp:
    """A ServerApp running :class:`MobiLLMStrategy`, with fixed settings or the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_mobillm_server(grid, _settings(cfg, context, "mobillm"))

    return app


def mobillm_apps(cfg: RunConfig) -> tuple[ServerApp, ClientApp]:
    """The (ServerApp, ClientApp) pair of MobiLLM for a simulation with ``cfg``."""
    if cfg.resume:
        raise ConfigError("resume is not supported with method='mobillm' (no checkpoints)")
    return make_mobillm_server_app(cfg), make_mobillm_client_app(cfg)


def baseline_apps(cfg: RunConfig) -> tuple[ServerApp, ClientApp]:
    """The apps of the baseline ``cfg.method`` (one of :data:`flower_pae.config.BASELINES`)."""
    pick = {
        "fedavg_lora": fedavg_lora_apps,
        "split_lora": split_lora_apps,
        "mobillm": mobillm_apps,
    }
    if cfg.method not in pick:
        raise ConfigError(f"method {cfg.method!r} is not a baseline; those are {sorted(pick)}")
    return pick[cfg.method](cfg)
