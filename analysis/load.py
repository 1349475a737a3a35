"""Load a run directory (the run-output contract) into a :class:`Run`.

Depends only on files on disk, never on the simulation code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

REQUIRED_FILES = ("config.json", "summary.json", "messages.parquet", "metrics.parquet")


@dataclass
class Run:
    """One finished run.

    Attributes
    ----------
    path : Path
        The run directory.
    config : dict
        ``config.json``: ``{"settings", "seed", "versions"}``.
    summary : dict
        ``summary.json``.
    messages : pandas.DataFrame
        ``messages.parquet``, one row per Flower message.
    metrics : pandas.DataFrame
        ``metrics.parquet``, long format.
    task_names : dict
        Task key to human name (from ``tasks.json``; identity where absent).
    """

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    messages: pd.DataFrame
    metrics: pd.DataFrame
    task_names: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The run directory's name."""
        return self.path.name

    @property
    def method(self) -> str | None:
        """The run's method setting (``config["settings"]["method"]``), else the summary's."""
        method = self.config.get("settings", {}).get("method")
        if method is None:
            method = self.summary.get("method")
        return method

    @property
    def task_keys(self) -> list[str]:
        """Task keys in order of first appearance."""
        keys = self.summary.get("task_keys")
        if keys is not None:
            return [str(k) for k in keys]
        tasks = self.metrics["task"].dropna() if "task" in self.metrics else pd.Series([])
        return [str(k) for k in dict.fromkeys(tasks)]

    def task_name(self, key: Any) -> str:
        """Human name of a task key (the key itself when unnamed)."""
        return self.task_names.get(str(key), str(key))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def load_run(path: str | Path) -> Run:
    """Load one run directory.

    Parameters
    ----------
    path : str or Path
        Directory holding the contract files.

    Returns
    -------
    Run

    Raises
    ------
    FileNotFoundError
        If the directory or one of the required files is missing (the message names it).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory not found: {root}")
    for fname in REQUIRED_FILES:
        if not (root / fname).is_file():
            raise FileNotFoundError(f"run {root}: missing {fname} ({root / fname})")
    config = _read_json(root / "config.json")
    summary = _read_json(root / "summary.json")
    messages = pd.read_parquet(root / "messages.parquet")
    metrics = pd.read_parquet(root / "metrics.parquet")
    # Flower node ids are unsigned 64-bit: never let them wrap through a signed type.
    if "node_id" in metrics:
        metrics["node_id"] = metrics["node_id"].astype("UInt64")
    if "node_id" in messages:
        messages["node_id"] = messages["node_id"].astype("uint64")
    tasks_file = root / "tasks.json"
    named = (
        {str(k): str(v) for k, v in _read_json(tasks_file).items()} if tasks_file.is_file() else {}
    )
    keys = [str(k) for k in summary.get("task_keys", [])]
    if "task" in metrics:
        keys += [str(k) for k in metrics["task"].dropna().unique()]
    task_names = {k: k for k in keys} | named
    return Run(root, config, summary, messages, metrics, task_names)


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Load several run directories, in the given order."""
    return [load_run(p) for p in paths]
