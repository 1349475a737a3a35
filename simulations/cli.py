"""``flower-pae``: run simulations, and reference baselines, from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
import warnings
from pathlib import Path

from flower_pae.config import ConfigError, RunConfig

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


def simulate(cfg: RunConfig, out: Path) -> dict:
    """Run one simulation through Flower's simulation engine (Ray) and return its summary."""
    from flwr.simulation import run_simulation

    from flower_pae.device.secret import SECRET_ENV, CohortSecret
    from simulations.client_app import make_client_app
    from simulations.server_app import make_server_app

    out.mkdir(parents=True, exist_ok=True)
    cfg.out_dir = str(out.resolve())
    # The cohort secret goes to the devices' processes only (their environment), never to
    # the ServerApp: its code does not read it and no message carries it.
    secret_hex = os.environ.get(SECRET_ENV) or secrets.token_hex(32)
    os.environ[SECRET_ENV] = secret_hex
    backend = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
        # Ray's local workers inherit this process's environment (and so the secret).
        "init_args": {"num_cpus": os.cpu_count() or 1},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=make_server_app(cfg),
            client_app=make_client_app(cfg),
            num_supernodes=cfg.num_devices,
            backend_config=backend,
        )
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log")
    _write_task_names(cfg, out, CohortSecret.from_hex(secret_hex))
    return json.loads(summary_path.read_text())


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
    cfg = RunConfig.load(_config_path(args.config), args.set)
    out = Path(args.out or cfg.out_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    start = time.perf_counter()
    summary = simulate(cfg, out.resolve())
    _print_summary(summary, out.resolve())
    print(f"run directory: {out.resolve()}  ({time.perf_counter() - start:.0f}s)")
    return 0


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
    run.set_defaults(func=cmd_run)
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
