"""The scalability study: one simulation per population size N, recorded into a DataFrame.

``flower-pae scale --devices 10,100,1000 --rounds 20 --per-round 5 --out DIR`` runs, for each
N, a PAE simulation with N devices of which ``--per-round`` train and evaluate each round, and
records wall time per round, server and Ray-actor memory, messages and bytes (from the run's
``messages.parquet``), device forward and server training seconds, the server cache's figures
and what the activation store computed during the run. ``--empty`` also runs Flower's floor:
the same N, rounds, sampling and Ray settings with a ClientApp that only echoes a trivial
reply, so the cost per device call can be compared within one invocation. ``--warmup`` runs
each PAE configuration once before the measured run, so that the measured run finds the
activation store warm. Results: ``DIR/scale.parquet``, ``DIR/scale.csv``, ``DIR/scale.png``
and one run directory per simulation under ``DIR/runs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flower_pae.config import ConfigError, RunConfig
from flower_pae.data import resolve_stream
from flower_pae.device.store import activation_files
from flower_pae.runlog import RunRecorder
from flower_pae.server.cache import ActivationCache
from flower_pae.wire import CONFIG, METRICS
from strategies.pae import PAEStrategy, _bytes_by_phase, default_trainer_config

log = logging.getLogger("flower_pae")

MODES = ("pae-warmup", "pae", "empty")
COLUMNS = [
    "mode",
    "num_devices",
    "per_round",
    "rounds",
    "wall_seconds",
    "seconds_per_round",
    "seconds_per_round_steady",
    "device_calls",
    "seconds_per_call",
    "seconds_per_call_steady",
    "server_train_seconds",
    "device_forward_seconds",
    "messages",
    "bytes",
    "bytes_up",
    "bytes_down",
    "failed_calls",
    "timed_out_calls",
    "server_peak_rss_mb",
    "actor_peak_rss_mb",
    "actors",
    "cache_samples",
    "cache_cap_bytes",
    "cache_peak_bytes_in_memory",
    "cache_bytes_on_disk",
    "cache_spilled_blocks",
    "store_new_entries",
    "store_forward_seconds",
    "run_dir",
]


# ---- arguments ---------------------------------------------------------------------------
def parse_devices(text: str) -> list[int]:
    """Parse ``--devices`` ("10,100,1000") into a list of positive ints.

    Raises
    ------
    ConfigError
        On an empty list, a non-integer or a value < 1.
    """
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            n = int(part)
        except ValueError:
            raise ConfigError(f"--devices takes comma-separated integers, got {part!r}") from None
        if n < 1:
            raise ConfigError(f"--devices: every population size must be >= 1, got {n}")
        values.append(n)
    if not values:
        raise ConfigError(f"--devices needs at least one population size, got {text!r}")
    return values


def study_config(
    base: RunConfig,
    num_devices: int,
    rounds: int,
    per_round: int,
    train_per_device: int | None = None,
    test_per_device: int | None = None,
) -> RunConfig:
    """The settings of one point of the study (N devices, ``per_round`` active per round).

    Parameters
    ----------
    base : RunConfig
        Settings shared by every point (``--config`` and ``--set``).
    num_devices : int
        N, the population.
    rounds : int
        Total rounds; must be ``len(stream) * rounds_per_task + stagger_rounds``, so
        ``rounds - stagger_rounds`` must be a multiple of the stream's task count.
    per_round : int
        Devices that train, and devices that evaluate, each round.
    train_per_device, test_per_device : int, optional
        Rows per device of each task (``max_train = train_per_device * N``, same for test),
        so that a device's data stays the same size whatever N; ``None`` keeps ``base``'s.

    Returns
    -------
    RunConfig
        The validated settings.
    """
    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    if not 1 <= per_round <= num_devices:
        raise ConfigError(
            f"--per-round must be in 1..{num_devices} (the population), got {per_round}"
        )
    tasks = len(resolve_stream(base.stream))
    span = rounds - base.stagger_rounds
    if span < tasks or span % tasks:
        raise ConfigError(
            f"--rounds {rounds} must be stagger_rounds ({base.stagger_rounds}) plus a positive "
            f"multiple of the stream's {tasks} task(s) (each task gets the same rounds); "
            f"change --rounds or --set stream=..."
        )
    values = dataclasses.asdict(base)
    values.update(
        num_devices=num_devices,
        devices_per_round=per_round,
        fraction_evaluate=per_round / num_devices,
        rounds_per_task=span // tasks,
        out_dir="",
    )
    for key, per_device in (("max_train", train_per_device), ("max_test", test_per_device)):
        if per_device is not None:
            if per_device < 1:
                raise ConfigError(f"--{key.split('_')[1]}-per-device must be >= 1")
            values[key] = per_device * num_devices
    return RunConfig.from_dict(values)


# ---- Flower's floor: an empty ClientApp and a server with the same message pattern ---------
def make_empty_client_app() -> ClientApp:
    """A ClientApp that answers every train and evaluate message with a trivial reply."""
    app = ClientApp()

    def echo(msg: Message, context: Context) -> Message:
        return Message(RecordDict({METRICS: MetricRecord({"num-examples": 0})}), reply_to=msg)

    app.train()(echo)
    app.evaluate()(echo)
    return app


class FloorStrategy(PAEStrategy):
    """The PAE server's round loop (sampling, waiting, recording) with trivial messages.

    Same sampling of devices for training and evaluation, the same send-and-wait loop and the
    same run-directory recording as :class:`~strategies.pae.PAEStrategy`; no upload, cache,
    training or side network. What a round costs here is Flower's (and Ray's) floor. With
    ``overlap_rounds`` its rounds overlap as PAE's do: with no training between them, the
    next round's upload requests and this round's evaluation requests are out together.
    """

    def upload_messages(
        self, server_round: int, nodes: list[int], config: ConfigRecord
    ) -> list[Message]:
        return [self._trivial(server_round, node, "train") for node in nodes]

    def cache_uploads(self, server_round: int, replies: Iterable[Message]) -> dict[str, float]:
        return {}

    def train_cached(
        self, server_round: int, metrics: dict[str, float]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return None, None

    @property
    def can_evaluate(self) -> bool:
        return True  # the empty ClientApp has nothing to wait for

    def evaluate_messages(
        self, server_round: int, nodes: list[int], config: ConfigRecord
    ) -> list[Message]:
        return [self._trivial(server_round, node, "evaluate") for node in nodes]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def final_summary(self, num_rounds: int) -> dict:
        return {
            "rounds": num_rounds,
            "empty_client_app": True,
            "cache": self.cache.stats.as_dict(),
            "bytes": _bytes_by_phase(self.recorder.messages_frame()),
        }

    @staticmethod
    def _trivial(server_round: int, node: int, phase: str) -> Message:
        content = RecordDict({CONFIG: ConfigRecord({"round": server_round})})
        return Message(content, dst_node_id=node, message_type=phase)


def make_empty_server_app(cfg: RunConfig) -> ServerApp:
    """A ServerApp running :class:`FloorStrategy` with ``cfg``'s rounds and sampling."""
    from simulations.server_app import num_rounds, overlap_rounds, run_dir

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        out = run_dir(cfg)
        strategy = FloorStrategy(
            lambda layers, hidden: None,
            default_trainer_config(cfg),
            ActivationCache(out / "cache", memory_cap_bytes=cfg.cache_memory_mb * 2**20),
            RunRecorder(out, cfg.to_dict()),
            devices_per_round=cfg.devices_per_round,
            fraction_evaluate=cfg.fraction_evaluate,
            num_devices=cfg.num_devices,
            seed=cfg.seed,
            overlap=overlap_rounds(cfg),
        )
        strategy.start(grid, num_rounds=num_rounds(cfg), timeout=cfg.timeout)

    return app


# ---- measurement -------------------------------------------------------------------------
class MemorySampler:
    """Samples, in a thread, this process's RSS and the summed RSS of its Ray actors.

    The server (ServerApp and Flower's simulation engine) runs in this process; Ray's
    ``ClientAppActor`` worker processes are its descendants (through the local raylet).
    """

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.server_peak = 0
        self.actor_peak = 0
        self.actors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        psutil = self._psutil
        me = psutil.Process()
        self.server_peak = max(self.server_peak, me.memory_info().rss)
        total, count = 0, 0
        for proc in me.children(recursive=True):
            try:
                if "ClientAppActor" in " ".join(proc.cmdline()):
                    total += proc.memory_info().rss
                    count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.actor_peak = max(self.actor_peak, total)
        self.actors = max(self.actors, count)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as err:  # never let the sampler break a run
                log.debug("memory sampler: %s", err)
            self._stop.wait(self.interval)


@contextlib.contextmanager
def seeded_flower_ids(seed: int) -> Iterator[None]:
    """Draw the simulation's node ids from ``seed`` instead of ``os.urandom``.

    Flower gives each simulated node a random id and the strategy samples devices among the
    sorted ids, so with fresh ids a seeded sample picks other partitions in every run. With
    seeded ids the same ``seed`` samples the same devices: a warm-up run then warms the
    activation store for exactly the devices the measured run samples, and the PAE and
    empty runs of one N call the same devices. (Patches Flower's in-memory link state; if
    its layout changes, ids stay random and only that repeatability is lost.)
    """
    try:
        from flwr.server.superlink.linkstate import in_memory_linkstate as state_module
    except ImportError:  # pragma: no cover - another Flower layout
        yield
        return
    original = getattr(state_module, "generate_rand_int_from_bytes", None)
    if original is None:  # pragma: no cover
        yield
        return
    rng = random.Random(f"{seed}:flower-ids")

    def draw(num_bytes: int, exclude: set[int] | None = None) -> int:
        value = rng.getrandbits(8 * num_bytes)
        while value in (exclude or set()):
            value = rng.getrandbits(8 * num_bytes)
        return value

    state_module.generate_rand_int_from_bytes = draw
    try:
        yield
    finally:
        state_module.generate_rand_int_from_bytes = original


def store_entries(root: Path) -> set[str]:
    """Names of the activation store's entries (``<key>.npz``) under ``root``: the forwards
    it holds (:func:`~flower_pae.device.store.activation_files`)."""
    return {p.name for p in activation_files(root)}


def store_seconds(root: Path, names: Iterable[str]) -> float:
    """Sum of the forward seconds recorded in the given store entries."""
    total = 0.0
    for name in names:
        try:
            with np.load(root / name[:2] / name) as data:
                total += float(data["seconds"])
        except (OSError, KeyError, ValueError):
            continue
    return total


def run_figures(out: Path) -> dict:
    """Per-run figures read off a run directory (messages, metrics, summary)."""
    messages = pd.read_parquet(out / "messages.parquet")
    metrics = pd.read_parquet(out / "metrics.parquet")
    summary = json.loads((out / "summary.json").read_text())

    def series(name: str) -> pd.Series:
        return metrics.loc[metrics["metric"] == name, "value"]

    round_seconds = metrics[metrics["metric"] == "round_seconds"].set_index("round")["value"]
    down = messages[messages["direction"] == "down"]
    calls_per_round = down.groupby("round").size()
    steady = round_seconds.index > 1
    steady_calls = int(calls_per_round[calls_per_round.index > 1].sum())
    cache_mem = series("cache_bytes_in_memory")
    return {
        "rounds": int(summary.get("rounds", len(round_seconds))),
        "seconds_per_round": float(round_seconds.mean()),
        "seconds_per_round_steady": float(round_seconds[steady].mean()) if steady.any() else np.nan,
        "device_calls": int(len(down)),
        "seconds_per_call": float(round_seconds.sum() / max(len(down), 1)),
        "seconds_per_call_steady": (
            float(round_seconds[steady].sum() / steady_calls) if steady_calls else np.nan
        ),
        "server_train_seconds": float(series("train_seconds").sum()),
        "device_forward_seconds": float(series("forward_seconds").sum()),
        "messages": int(len(messages)),
        "bytes": int(messages["payload_bytes"].sum()),
        "bytes_up": int(messages.loc[messages["direction"] == "up", "payload_bytes"].sum()),
        "bytes_down": int(down["payload_bytes"].sum()),
        "failed_calls": int(series("train_failed").sum() + series("evaluate_failed").sum()),
        "timed_out_calls": int(
            series("train_timed_out").sum() + series("evaluate_timed_out").sum()
        ),
        "cache_samples": int(summary.get("cache", {}).get("samples", 0)),
        "cache_peak_bytes_in_memory": int(cache_mem.max()) if len(cache_mem) else 0,
        "cache_bytes_on_disk": int(summary.get("cache", {}).get("bytes_on_disk", 0)),
        "cache_spilled_blocks": int(summary.get("cache", {}).get("spilled_blocks", 0)),
    }


def measure(cfg: RunConfig, out: Path, mode: str) -> dict:
    """Run one simulation of the study and return its row."""
    from flower_pae.backbone import cache_dir
    from simulations.cli import simulate

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    store_root = cache_dir() / "activations"
    before = store_entries(store_root) if cfg.activation_store and mode != "empty" else set()
    apps = {}
    if mode == "empty":
        cfg = dataclasses.replace(cfg, out_dir=str(out.resolve()))
        apps = {"server_app": make_empty_server_app(cfg), "client_app": make_empty_client_app()}
    start = time.perf_counter()
    with seeded_flower_ids(cfg.seed), MemorySampler() as memory:
        simulate(cfg, out, **apps)
    wall = time.perf_counter() - start
    row: dict = {
        "mode": mode,
        "num_devices": cfg.num_devices,
        "per_round": cfg.devices_per_round,
        "wall_seconds": wall,
        "server_peak_rss_mb": memory.server_peak / 2**20,
        "actor_peak_rss_mb": memory.actor_peak / 2**20,
        "actors": memory.actors,
        "cache_cap_bytes": cfg.cache_memory_mb * 2**20,
        "store_new_entries": np.nan,
        "store_forward_seconds": np.nan,
        "run_dir": str(out),
    }
    row.update(run_figures(out))
    if cfg.activation_store and mode != "empty":
        new = store_entries(store_root) - before
        row.update(store_new_entries=len(new), store_forward_seconds=store_seconds(store_root, new))
    return row


def run_study(
    base: RunConfig,
    devices: Sequence[int],
    rounds: int,
    per_round: int,
    out: Path,
    *,
    empty: bool = False,
    warmup: bool = False,
    train_per_device: int | None = None,
    test_per_device: int | None = None,
) -> pd.DataFrame:
    """Run the study and write ``scale.parquet``, ``scale.csv`` and ``scale.png`` into ``out``.

    Parameters
    ----------
    base : RunConfig
        Settings shared by every simulation.
    devices : Sequence[int]
        Population sizes N.
    rounds, per_round : int
        Rounds of each simulation; devices that train (and evaluate) per round.
    out : Path
        Study directory; each simulation's run directory goes to ``out/runs``.
    empty : bool
        Also run Flower's floor (the empty ClientApp) for each N.
    warmup : bool
        Run each PAE configuration once before measuring (fills the activation store).
    train_per_device, test_per_device : int, optional
        Rows per device of each task (see :func:`study_config`).

    Returns
    -------
    pandas.DataFrame
        One row per simulation, columns :data:`COLUMNS`.
    """
    configs = [
        study_config(base, n, rounds, per_round, train_per_device, test_per_device) for n in devices
    ]  # every point is validated before the first simulation starts
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for cfg in configs:
        modes = (["pae-warmup"] if warmup else []) + ["pae"] + (["empty"] if empty else [])
        for mode in modes:
            run_out = (out / "runs" / f"{mode}-n{cfg.num_devices}").resolve()
            log.info("scale study: %s, %d devices, %d per round", mode, cfg.num_devices, per_round)
            row = measure(cfg, run_out, mode)
            rows.append(row)
            log.info(
                "scale study: %s N=%d: %.1fs wall, %.3fs per round, %.4fs per device call",
                mode,
                cfg.num_devices,
                row["wall_seconds"],
                row["seconds_per_round"],
                row["seconds_per_call"],
            )
            frame = pd.DataFrame(rows, columns=COLUMNS)
            frame.to_parquet(out / "scale.parquet", index=False)  # written as it grows
            frame.to_csv(out / "scale.csv", index=False)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    plot_scale(frame, out / "scale.png")
    return frame


def floor_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Per N: PAE's cost per device call over the empty ClientApp's (same invocation)."""
    pae = frame[frame["mode"] == "pae"].set_index("num_devices")
    floor = frame[frame["mode"] == "empty"].set_index("num_devices")
    both = pae.index.intersection(floor.index)
    return pd.DataFrame(
        {
            "pae_seconds_per_call": pae.loc[both, "seconds_per_call"],
            "empty_seconds_per_call": floor.loc[both, "seconds_per_call"],
            "ratio": pae.loc[both, "seconds_per_call"] / floor.loc[both, "seconds_per_call"],
            "ratio_steady": pae.loc[both, "seconds_per_call_steady"]
            / floor.loc[both, "seconds_per_call_steady"],
        }
    )


def cold_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Per N: a cold-store run's wall time over its unique backbone forwards plus its server
    training (the ``pae-warmup`` rows: the store computed those forwards during the run)."""
    cold = frame[frame["mode"] == "pae-warmup"].set_index("num_devices")
    work = cold["store_forward_seconds"] + cold["server_train_seconds"]
    return pd.DataFrame(
        {
            "wall_seconds": cold["wall_seconds"],
            "store_new_entries": cold["store_new_entries"],
            "store_forward_seconds": cold["store_forward_seconds"],
            "server_train_seconds": cold["server_train_seconds"],
            "ratio": cold["wall_seconds"] / work,
        }
    )


def plot_scale(frame: pd.DataFrame, path: Path) -> Path:
    """Two panels against N: seconds per round, and bytes on the wire, one line per mode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax_time, ax_bytes = fig.subplots(1, 2)
    for mode, group in frame.groupby("mode", sort=False):
        group = group.sort_values("num_devices")
        line = ax_time.plot(
            group["num_devices"], group["seconds_per_round"], "o-", label=f"{mode}, all rounds"
        )[0]
        ax_time.plot(
            group["num_devices"],
            group["seconds_per_round_steady"],
            "s--",
            color=line.get_color(),
            label=f"{mode}, rounds ≥ 2",
        )
        ax_bytes.plot(group["num_devices"], group["bytes"], "o-", label=mode)
    sizes = sorted(frame["num_devices"].unique())
    for ax, label in ((ax_time, "seconds per round"), (ax_bytes, "bytes (both directions)")):
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("devices N")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_time.set_yscale("log")
    ax_bytes.set_yscale("log")
    per_round = ", ".join(str(k) for k in sorted(frame["per_round"].unique()))
    fig.suptitle(f"flower-pae scalability ({per_round} devices per round)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def environment_note() -> str:
    """CPU count and machine, for the study's printout."""
    import platform

    return f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.platform()}"
