"""The assisting server as a Flower ServerApp running :class:`strategies.pae.PAEStrategy`."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flower_pae.config import ConfigError, RunConfig
from flower_pae.data import resolve_stream
from flower_pae.oa_adapter import OAAdapterConfig
from flower_pae.runlog import RunRecorder
from flower_pae.server.cache import ActivationCache
from flower_pae.side_network import LadderSideNetwork
from strategies.pae import PAEStrategy, default_trainer_config

log = logging.getLogger(__name__)


def num_rounds(cfg: RunConfig) -> int:
    """Every device trains each task of the stream for ``rounds_per_task`` rounds."""
    return len(resolve_stream(cfg.stream)) * cfg.rounds_per_task + cfg.stagger_rounds


def run_dir(cfg: RunConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir).resolve()
    return Path("runs", time.strftime("%Y%m%d-%H%M%S")).resolve()


# Settings a resumed run may change: they do not change what the run computes.
RESUMABLE_CHANGES = frozenset(
    {"resume", "stop_after", "checkpoint_every", "out_dir", "timeout", "client_cpus", "ray_address"}
    | {"server_threads", "record_wire", "activation_store", "store_max_gb", "overlap_rounds"}
)


def overlap_rounds(cfg: RunConfig) -> bool:
    """Whether the run's rounds overlap: asked for, and no simulated silent dropouts.

    A silent device is simulated by a ClientApp that holds its Ray actor past the timeout;
    with overlapping rounds it would hold back the other phase's requests too, which in
    sequence it cannot (a real silent device holds nothing).
    """
    silent = cfg.dropout > 0 and cfg.dropout_mode == "silent"
    if cfg.overlap_rounds and silent:
        log.info("silent dropouts are simulated: rounds run in sequence (overlap_rounds off)")
    return cfg.overlap_rounds and not silent


def build_strategy(cfg: RunConfig, out: Path) -> PAEStrategy:
    """The PAE strategy of a run: its recorder, cache, side network and checkpoints in ``out``."""
    recorder = RunRecorder(out, cfg.to_dict(), record_wire=cfg.record_wire, resume=cfg.resume)
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
        evaluate_every=cfg.evaluate_every,
        task_rounds=cfg.rounds_per_task if not cfg.stagger_rounds else 0,
        num_devices=cfg.num_devices,
        replay=cfg.method == "multitask",
        route_by_task=cfg.method == "oracle",
        refresh_step=cfg.refresh_step,
        clip_targets=cfg.clip_targets,
        agreement_neighbours=cfg.agreement_neighbours,
        download_precision=cfg.download_precision,
        keep_activations=cfg.keep_activations,
        sequence_shortcut=cfg.shortcut if cfg.upload_sequence else None,
        max_upload_bytes=int(cfg.max_upload_mb * 2**20),
        checkpoint_dir=out / "checkpoint",
        checkpoint_every=cfg.checkpoint_every,
        stop_after=cfg.stop_after,
        overlap=overlap_rounds(cfg),
        seed=cfg.seed,
    )


def check_resumable(cfg: RunConfig, out: Path) -> None:
    """A run can only be resumed with the settings it ran with (see :data:`RESUMABLE_CHANGES`).

    Raises
    ------
    ConfigError
        When ``out`` has no run to resume, or a setting that changes the results differs.
    """
    path = out / "config.json"
    if not (out / "checkpoint" / "state.pt").is_file() or not path.is_file():
        raise ConfigError(f"resume: {out} holds no checkpointed run (config.json, checkpoint/)")
    before = json.loads(path.read_text())["settings"]
    now = cfg.to_dict()
    changed = sorted(
        k
        for k in set(before) | set(now)
        if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k)
    )
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(f"resume: settings differ from the stopped run's ({details})")


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the server's torch work on ``count`` threads (0: leave torch's setting).

    In a simulation the Ray actors already hold every core; a server that trains on as many
    threads again oversubscribes them (on the shared 2-core machine, the side network's
    training took 3-10x longer on 2 threads than on 1, and varied as much).
    """
    import torch

    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_server(grid: Grid, cfg: RunConfig) -> PAEStrategy:
    out = run_dir(cfg)
    if cfg.resume:
        check_resumable(cfg, out)
    strategy = build_strategy(cfg, out)
    if cfg.resume:
        strategy.resume()
    with torch_threads(cfg.server_threads):
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
