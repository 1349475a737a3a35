"""``flower-pae``: run simulations, and reference baselines, from the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from flower_pae.config import BASELINES, ConfigError, RunConfig

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

CONFIG_DIR = Path(__file__).parent / "configs"


def _config_path(name: str | None) -> Path | None:
    """A config file path, or the name of a config shipped in ``simulations/configs``."""
    if name is None:
        return None
    path = Path(name)
    if path.exists() or path.suffix:
        return path
    shipped = CONFIG_DIR / f"{name}.toml"
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    raise ConfigError(f"no config file {name!r}; give a path or one of {names}")


def simulate(
    cfg: RunConfig,
    out: Path,
    server_app: ServerApp | None = None,
    client_app: ClientApp | None = None,
) -> dict:
    """Run one simulation through Flower's simulation engine (Ray) and return its summary.

    Parameters
    ----------
    cfg : RunConfig
        The run's settings; ``cfg.out_dir`` is set to ``out``.
    out : Path
        The run directory.
    server_app, client_app : ServerApp, ClientApp, optional
        Other apps with the same settings and Ray setup (the scalability study's empty
        ClientApp); by default the PAE apps of :mod:`simulations`, or the baseline's apps
        of :mod:`simulations.baseline_apps` for a baseline method (``fedavg_lora``,
        ``split_lora``, ``mobillm``).

    Returns
    -------
    dict
        The run's ``summary.json``.
    """
    from flwr.simulation import run_simulation

    from flower_pae.device.secret import SECRET_ENV, CohortSecret
    from simulations.client_app import make_client_app
    from simulations.scale import seeded_flower_ids
    from simulations.server_app import check_resumable, make_server_app

    if cfg.method in BASELINES and server_app is None and client_app is None:
        from simulations.baseline_apps import baseline_apps

        server_app, client_app = baseline_apps(cfg)
    out.mkdir(parents=True, exist_ok=True)
    cfg.out_dir = str(out.resolve())
    if cfg.resume:
        check_resumable(cfg, out)
    # The cohort secret goes to the devices' processes only (their environment), never to
    # the ServerApp: its code does not read it and no message carries it.
    secret_hex = _cohort_secret(cfg, out, SECRET_ENV)
    os.environ[SECRET_ENV] = secret_hex
    backend = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
        # A private Ray instance ("local": even where `ray start` left a cluster address),
        # whose workers inherit this process's environment (and so the secret).
        "init_args": {"address": "local", "num_cpus": os.cpu_count() or 1},
    }
    summary_path = out / "summary.json"
    before = summary_path.stat().st_mtime_ns if summary_path.exists() else None
    # Node ids drawn from the seed: the server's per-device state (held ids, sampling) means
    # the same devices in a resumed run, and a run with the same seed samples the same ones.
    with (
        warnings.catch_warnings(),
        seeded_flower_ids(cfg.seed),
        ray_cluster(cfg.ray_address, _device_environment()),
    ):
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server_app or make_server_app(cfg),
            client_app=client_app or make_client_app(cfg),
            num_supernodes=cfg.num_devices,
            backend_config=backend,
        )
    if not summary_path.exists() or summary_path.stat().st_mtime_ns == before:
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log")
    _write_task_names(cfg, out, CohortSecret.from_hex(secret_hex))
    return json.loads(summary_path.read_text())


def _device_environment() -> dict[str, str]:
    """What a device's process needs from this one's environment: flower-pae's and Hugging
    Face's variables (the cohort secret, cache and data directories, offline switches)."""
    return {k: v for k, v in os.environ.items() if k.startswith(("FLOWER_PAE_", "HF_"))}


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast where no cluster listens: Ray itself retries for minutes (also on the stale
    address that ``auto`` finds after a cluster of this machine stopped)."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    host, _, port = canonicalize_bootstrap_address_or_die(address).rpartition(":")
    socket.create_connection((host, int(port)), timeout).close()


@contextlib.contextmanager
def ray_cluster(address: str, env: dict[str, str]) -> Iterator[None]:
    """Connect to a running Ray cluster (``ray start``) for the simulation, if ``address``.

    Flower's Ray backend starts a private Ray instance unless one is connected, and gives its
    workers only ``PYTHONPATH``. Workers of a ``ray start`` cluster do not inherit this
    process's environment, so the devices' variables ``env`` travel in the connection's
    runtime environment (to the cluster's workers; the ServerApp never reads them).

    Raises
    ------
    ConfigError
        When no cluster answers at ``address``.
    """
    if not address:
        yield
        return
    import ray

    env_vars = {"PYTHONPATH": os.pathsep.join(sys.path), **env}
    try:
        _check_reachable(address)
        ray.init(address=address, runtime_env={"env_vars": env_vars}, logging_level="warning")
    except (OSError, ValueError, RuntimeError) as err:  # ConnectionError is an OSError
        raise ConfigError(
            f"ray_address={address!r}: no Ray cluster answers there ({err}). Start one with "
            "`ray start --head`, or leave ray_address empty for a private local instance"
        ) from err
    try:
        yield
    finally:
        ray.shutdown()


def _cohort_secret(cfg: RunConfig, out: Path, env: str) -> str:
    """The devices' cohort secret: from the environment, else the one a resumed run used,
    else a fresh one, kept in ``out/experimenter/`` (the experimenter's side of the run, which
    the ServerApp never reads) so that the run can be resumed."""
    path = out / "experimenter" / "cohort_secret"
    if os.environ.get(env):
        return os.environ[env]
    if cfg.resume:
        if not path.is_file():
            raise ConfigError(
                f"resume: set {env} to the cohort secret the run used (no {path} either)"
            )
        return path.read_text().strip()
    secret_hex = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(secret_hex)
    return secret_hex


def resume_config(run: Path, overrides: list[str]) -> RunConfig:
    """The settings a stopped run recorded (``config.json``), resumed: ``resume=true``,
    ``stop_after=0`` (run to the end) unless ``overrides`` say otherwise."""
    path = run / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} does not exist")
    settings = json.loads(path.read_text())["settings"]
    settings.update(stop_after=0, out_dir=str(run))
    return RunConfig.load(None, [*overrides, "resume=true"], base=settings)


def _write_task_names(cfg: RunConfig, out: Path, secret) -> None:
    """The experimenter (who holds the secret) records which opaque key is which task."""
    from flower_pae.data import load_task, resolve_stream

    names = {}
    for spec in resolve_stream(cfg.stream):
        task = load_task(
            spec, data_dir=cfg.data_dir or None, seed=cfg.seed, max_train=1, max_test=1
        )
        names[secret.task_key(task.name)] = task.name
    (out / "tasks.json").write_text(json.dumps(names, indent=2))


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    names = {}
    if (out / "tasks.json").exists():
        names = json.loads((out / "tasks.json").read_text())
    table = Table(title=f"flower-pae run: {out}")
    for col in ("task", "zero-shot", "final accuracy"):
        table.add_column(col)
    for key in summary.get("task_keys", []):
        zs = summary["zero_shot_accuracy"].get(key)
        acc = summary["final_accuracy"].get(key)
        table.add_row(
            names.get(key, key),
            f"{zs:.3f}" if zs is not None else "-",
            f"{acc:.3f}" if acc is not None else "-",
        )
    console = Console()
    console.print(table)
    for name in ("average_accuracy", "backward_transfer", "forward_transfer"):
        if summary.get(name) is not None:
            console.print(f"{name}: {summary[name]:.4f}")


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        if args.config or args.out:
            raise ConfigError("--resume takes the run's own settings and directory")
        out = Path(args.resume).resolve()
        cfg = resume_config(out, args.set)
    else:
        cfg = RunConfig.load(_config_path(args.config), args.set)
        out = Path(args.out or cfg.out_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    start = time.perf_counter()
    summary = simulate(cfg, out.resolve())
    _print_summary(summary, out.resolve())
    print(f"run directory: {out.resolve()}  ({time.perf_counter() - start:.0f}s)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``flower-pae report``: tables and plots of one or many runs, as markdown."""
    from analysis import load_runs, write_report

    path = write_report(load_runs(args.runs), args.out, target=args.target)
    print(f"report written to {path}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    """``flower-pae scale``: one simulation per population size, into a DataFrame and a plot."""
    from simulations.scale import (
        cold_ratios,
        environment_note,
        floor_ratios,
        parse_devices,
        run_study,
    )

    devices = parse_devices(args.devices)
    base = RunConfig.load(_config_path(args.config), args.set)
    out = Path(args.out or Path("runs") / time.strftime("scale-%Y%m%d-%H%M%S")).resolve()
    frame = run_study(
        base,
        devices,
        args.rounds,
        args.per_round,
        out,
        empty=args.empty,
        warmup=args.warmup,
        train_per_device=args.train_per_device,
        test_per_device=args.test_per_device,
    )
    shown = [
        "mode",
        "num_devices",
        "wall_seconds",
        "seconds_per_round",
        "seconds_per_call",
        "seconds_per_call_steady",
        "messages",
        "bytes",
        "server_peak_rss_mb",
        "actor_peak_rss_mb",
        "cache_peak_bytes_in_memory",
        "cache_bytes_on_disk",
        "store_new_entries",
    ]
    print(frame[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.empty:
        print("cost per device call, PAE over the empty ClientApp (same invocation):")
        print(floor_ratios(frame).to_string(float_format=lambda v: f"{v:.4g}"))
    if args.warmup:
        print("cold store: wall time over (unique backbone forwards + server training):")
        print(cold_ratios(frame).to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"machine: {environment_note()}")
    print(f"study directory: {out}  (scale.parquet, scale.csv, scale.png)")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flower-pae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a simulation and write its run directory")
    run.add_argument("--config", help="TOML file, or a shipped config name (e.g. default)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (repeatable)",
    )
    run.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from its last checkpoint, with its recorded settings",
    )
    run.set_defaults(func=cmd_run)
    scale = sub.add_parser("scale", help="scalability study: one simulation per population size N")
    scale.add_argument(
        "--devices", required=True, help="population sizes, comma-separated (e.g. 10,100,1000)"
    )
    scale.add_argument("--rounds", type=_positive_int, required=True, help="rounds per run")
    scale.add_argument(
        "--per-round",
        type=_positive_int,
        required=True,
        help="devices that train (and evaluate) each round",
    )
    scale.add_argument("--config", help="TOML file, or a shipped config name")
    scale.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting"
    )
    scale.add_argument(
        "--train-per-device",
        type=_positive_int,
        default=2,
        help="training rows per device and task (max_train = this × N; default 2)",
    )
    scale.add_argument(
        "--test-per-device",
        type=_positive_int,
        default=1,
        help="test rows per device and task (max_test = this × N; default 1)",
    )
    scale.add_argument(
        "--empty",
        action="store_true",
        help="also run Flower's floor: an empty ClientApp with the same N, rounds, sampling",
    )
    scale.add_argument(
        "--warmup",
        action="store_true",
        help="run each PAE configuration once first, so the measured run finds a warm store",
    )
    scale.add_argument("--out", help="study directory (default: runs/scale-<timestamp>)")
    scale.set_defaults(func=cmd_scale)
    from simulations.audit import add_audit_command

    add_audit_command(sub)
    report = sub.add_parser("report", help="markdown report (tables + plots) over run directories")
    report.add_argument("runs", nargs="+", help="run directories")
    report.add_argument("--out", required=True, help="report directory")
    report.add_argument(
        "--target", type=float, default=None, help="accuracy for 'bytes to reach' (default: auto)"
    )
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("flower_pae").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"flower-pae: bad setting: {err}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as err:
        print(f"flower-pae: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
