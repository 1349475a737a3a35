"""The same apps in real processes: Flower's deployment runtime, and a ``ray start`` cluster.

Each test starts its servers on free localhost ports, in their own process groups, and stops
them at the end. Both use the tiny model; they take about a minute each on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flower_pae.config import RunConfig
from flower_pae.device.secret import SECRET_ENV
from tests.run_contract import assert_run_directory

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, ray
DEVICES = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # Flower starts its own commands
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


class _Servers:
    """Long-running commands, each logging to a file and stopped with its process group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_for_port(self, port: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            assert not dead, f"{dead} exited early\n{self.tails()}"
            time.sleep(0.5)
        raise AssertionError(f"nothing listens on port {port} after {timeout}s\n{self.tails()}")

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            for proc in self.procs.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait
            for proc in self.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))


@contextlib.contextmanager
def _servers(log_dir: Path) -> Iterator[_Servers]:
    servers = _Servers(log_dir)
    try:
        yield servers
    finally:
        servers.stop()


def test_deployment_runtime_runs_the_apps_as_separate_processes(tmp_path, tiny_model_dir):
    """A SuperLink and two SuperNodes on localhost; the app submitted with ``flwr run``."""
    link = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    devices_env = _environment(FLWR_HOME=str(home))
    assert devices_env.get(SECRET_ENV), "conftest sets the cohort secret"
    # The SuperLink (and the ServerApp it starts) runs without the devices' secret.
    server_env = {k: v for k, v in devices_env.items() if k != SECRET_ENV}
    out = tmp_path / "run"
    run_config = (
        f"model='{tiny_model_dir}' stream='pypi:bbc' num_devices={DEVICES} max_train=16 "
        f"max_test=8 rounds_per_task=2 server_epochs=1 out_dir='{out}'"
    )
    with _servers(tmp_path) as servers:
        servers.start(
            "superlink",
            [str(BIN / "flower-superlink"), "--insecure", "--port", str(link)]
            + ["--disable-runtime-dependency-installation"],
            server_env,
        )
        servers.wait_for_port(link)
        for pid in range(DEVICES):
            servers.start(
                f"supernode-{pid}",
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}"]
                + ["--port", str(_free_port())]
                + ["--node-config", f"partition-id={pid} num-partitions={DEVICES}"],
                devices_env,
            )
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "local-deployment"]
            + ["--run-config", run_config, "--stream"],
            env=server_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        logs = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{servers.tails()}"
        assert result.returncode == 0, logs
        assert (out / "summary.json").is_file(), logs
    assert_run_directory(out, num_tasks=1, num_devices=DEVICES)
    # Both devices forwarded in their own SuperNode's ClientApp processes.
    for pid in range(DEVICES):
        log = (tmp_path / f"supernode-{pid}.log").read_text(errors="replace")
        assert re.search(rf"device {pid}, round 1: \d+ new samples", log), log[-3000:]


def test_simulation_runs_on_a_ray_start_cluster(tmp_path, tiny_model_dir):
    """A head with no CPUs and a worker node with two: every device actor runs on the worker."""
    from simulations.cli import simulate

    port = _free_port()
    # Ray's socket paths must stay short: a temp dir directly under /tmp.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = _environment()
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    with _servers(tmp_path) as servers:
        servers.start(
            "ray-head",
            [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0"]
            + ["--include-dashboard=false", f"--temp-dir={ray_tmp}", *common],
            env,
        )
        servers.wait_for_port(port)
        servers.start(
            "ray-worker",
            [str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", *common],
            env,
        )
        _wait_for_nodes(f"127.0.0.1:{port}", 2, servers)
        cfg = RunConfig(
            model=str(tiny_model_dir),
            stream="pypi:bbc",
            num_devices=3,
            max_train=16,
            max_test=8,
            rounds_per_task=2,
            server_epochs=1,
            ray_address=f"127.0.0.1:{port}",
        )
        simulate(cfg, tmp_path / "run")
    assert_run_directory(tmp_path / "run", num_tasks=1, num_devices=3)
    actor_logs = "".join(
        p.read_text(errors="replace") for p in ray_tmp.glob("session_*/logs/worker-*.err")
    )
    assert all(f"device {pid}, round 1:" in actor_logs for pid in range(3))


def _wait_for_nodes(address: str, count: int, servers: _Servers, timeout: float = 120.0) -> None:
    """Wait until the cluster at ``address`` has ``count`` live nodes (checked in a subprocess
    so that this process connects to Ray only through the code under test)."""
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='error'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + timeout
    alive = 0
    while time.monotonic() < deadline:
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, env=_environment()
        )
        lines = result.stdout.strip().splitlines()
        alive = int(lines[-1]) if result.returncode == 0 and lines else 0
        if alive >= count:
            return
        time.sleep(2)
    pytest.fail(f"{alive}/{count} Ray nodes alive after {timeout}s\n{servers.tails()}")


def test_ray_address_without_a_cluster_is_a_clear_error():
    from flower_pae.config import ConfigError
    from simulations.cli import ray_cluster

    for address in (f"127.0.0.1:{_free_port()}", "no-port"):
        with pytest.raises(ConfigError, match="ray start --head"), ray_cluster(address, {}):
            pass
