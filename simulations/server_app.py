"""The assisting server as a Flower ServerApp running :class:`strategies.pae.PAEStrategy`."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flower_pae.config import RunConfig
from flower_pae.data import resolve_stream
from flower_pae.oa_adapter import OAAdapterConfig
from flower_pae.runlog import RunRecorder
from flower_pae.server.cache import ActivationCache
from flower_pae.side_network import LadderSideNetwork
from strategies.pae import PAEStrategy, default_trainer_config


def num_rounds(cfg: RunConfig) -> int:
    """Every device trains each task of the stream for ``rounds_per_task`` rounds."""
    return len(resolve_stream(cfg.stream)) * cfg.rounds_per_task + cfg.stagger_rounds


def run_dir(cfg: RunConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir).resolve()
    return Path("runs", time.strftime("%Y%m%d-%H%M%S")).resolve()


def build_strategy(cfg: RunConfig, out: Path) -> PAEStrategy:
    recorder = RunRecorder(out, cfg.to_dict(), record_wire=cfg.record_wire)
    cache = ActivationCache(out / "cache", memory_cap_bytes=cfg.cache_memory_mb * 2**20)

    def make_network(num_layers: int, hidden: int) -> LadderSideNetwork:
        adapter = OAAdapterConfig(r_max=cfg.r_max, sparsity=cfg.sparsity)
        network_method = {"multitask": "sequential", "oracle": "olora"}.get(cfg.method, cfg.method)
        return LadderSideNetwork(
            num_layers, hidden, adapter, out_rank=cfg.out_rank, method=network_method
        )

    return PAEStrategy(
        make_network,
        default_trainer_config(cfg),
        cache,
        recorder,
        devices_per_round=cfg.devices_per_round,
        fraction_evaluate=cfg.fraction_evaluate,
        num_devices=cfg.num_devices,
        replay=cfg.method == "multitask",
        route_by_task=cfg.method == "oracle",
        seed=cfg.seed,
    )


def run_server(grid: Grid, cfg: RunConfig) -> PAEStrategy:
    out = run_dir(cfg)
    strategy = build_strategy(cfg, out)
    strategy.start(grid, num_rounds=num_rounds(cfg), timeout=cfg.timeout)
    return strategy


def make_server_app(cfg: RunConfig | None = None) -> ServerApp:
    """A ServerApp with fixed settings, or (``None``) settings from Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg if cfg is not None else RunConfig.from_dict(dict(context.run_config)))

    return app


app = make_server_app()
