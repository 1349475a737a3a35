"""Tables computed from a :class:`~analysis.load.Run`: traffic, accuracy, CL metrics, ranks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis.load import Run


def bytes_table(run: Run, by: Sequence[str] = ("phase", "direction")) -> pd.DataFrame:
    """Total payload bytes and message counts grouped by message columns.

    Parameters
    ----------
    run : Run
    by : sequence of str
        Columns of ``messages`` to group by.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``by``, columns ``bytes`` (sum of ``payload_bytes``) and ``messages``.
    """
    grouped = run.messages.groupby(list(by), dropna=False)["payload_bytes"]
    out = grouped.agg(bytes="sum", messages="count")
    return out.astype("int64")


def upload_bytes_per_sample(run: Run) -> float:
    """Total up-direction train bytes divided by total uploaded samples (NaN if none)."""
    msgs = run.messages
    up = msgs[(msgs["phase"] == "train") & (msgs["direction"] == "up")]
    samples = int(up["num_samples"].sum())
    return float(up["payload_bytes"].sum()) / samples if samples else float("nan")


def per_device_bytes(run: Run) -> pd.DataFrame:
    """Bytes per device (``node_id``) and direction.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``node_id``, columns ``down``, ``up``, ``total``, ``messages``.
    """
    msgs = run.messages
    table = msgs.pivot_table(
        index="node_id", columns="direction", values="payload_bytes", aggfunc="sum", fill_value=0
    )
    table = table.reindex(columns=["down", "up"], fill_value=0)
    table.columns.name = None
    table["total"] = table["down"] + table["up"]
    table["messages"] = msgs.groupby("node_id").size()
    return table.astype("int64")


def traffic_per_round(run: Run) -> pd.DataFrame:
    """Bytes per round and direction: index ``round``, columns ``down``, ``up``, ``total``."""
    msgs = run.messages
    table = msgs.pivot_table(
        index="round", columns="direction", values="payload_bytes", aggfunc="sum", fill_value=0
    )
    table = table.reindex(columns=["down", "up"], fill_value=0)
    table.columns.name = None
    table["total"] = table["down"] + table["up"]
    return table.astype("int64")


def call_latency(run: Run) -> pd.DataFrame:
    """How long each device call took: its reply's ``created_at`` minus its request's.

    That is the time from the server building the request to the device building its reply:
    Flower's queueing and transport plus the device's work (the reply's own transport back
    is not included). Runs recorded before ``created_at`` existed have no rows.

    Returns
    -------
    pandas.DataFrame
        One row per answered call: ``round``, ``phase``, ``node_id``, ``request_at``,
        ``reply_at`` (Unix seconds) and ``seconds``.
    """
    msgs = run.messages
    columns = ["round", "phase", "node_id", "request_at", "reply_at", "seconds"]
    if "created_at" not in msgs:
        return pd.DataFrame(columns=columns)
    keys = ["round", "phase", "node_id"]
    down = msgs[msgs["direction"] == "down"].groupby(keys)["created_at"].max()
    up = msgs[msgs["direction"] == "up"].groupby(keys)["created_at"].max()
    table = pd.concat({"request_at": down, "reply_at": up}, axis=1, join="inner").reset_index()
    table["seconds"] = table["reply_at"] - table["request_at"]
    return table[columns].sort_values(["round", "phase", "reply_at"], ignore_index=True)


def _aggregated(run: Run, metric: str) -> pd.DataFrame:
    m = run.metrics
    return m[(m["metric"] == metric) & m["node_id"].isna() & m["task"].notna()]


def accuracy_over_rounds(run: Run, metric: str = "accuracy") -> pd.DataFrame:
    """Aggregated (over devices) accuracy per round and task.

    Returns
    -------
    pandas.DataFrame
        Index ``round``, one column per task (human names, first-appearance order).
    """
    rows = _aggregated(run, metric)
    table = rows.pivot_table(index="round", columns="task", values="value", aggfunc="mean")
    order = [k for k in run.task_keys if k in table.columns]
    order += [k for k in table.columns if k not in order]
    table = table[order].rename(columns=run.task_name)
    table.columns.name = "task"
    return table


def accuracy_matrix(run: Run) -> pd.DataFrame:
    """``summary["accuracy_matrix"]`` labelled: row i = "after <task i>", column j = task j."""
    raw = run.summary.get("accuracy_matrix") or []
    values = np.array(
        [[np.nan if v is None else float(v) for v in row] for row in raw], dtype=float
    ).reshape(len(raw), -1)
    names = [run.task_name(k) for k in run.task_keys]
    if len(names) != values.shape[1]:
        names = [f"task {j}" for j in range(values.shape[1])]
    index = pd.Index([f"after {n}" for n in names[: values.shape[0]]], name="trained")
    return pd.DataFrame(values, index=index, columns=pd.Index(names, name="evaluated"))


def _num(value: object) -> float:
    return float("nan") if value is None else float(value)


def cl_table(runs: Iterable[Run]) -> pd.DataFrame:
    """One row per run: method, AA, BWT, FWT, active_params (index: run name)."""
    rows = []
    for run in runs:
        s = run.summary
        rows.append(
            {
                "run": run.name,
                "method": run.method,
                "AA": _num(s.get("average_accuracy")),
                "BWT": _num(s.get("backward_transfer")),
                "FWT": _num(s.get("forward_transfer")),
                "active_params": _num(s.get("active_params")),
            }
        )
    cols = ["run", "method", "AA", "BWT", "FWT", "active_params"]
    return pd.DataFrame(rows, columns=cols).set_index("run")


def _layer_key(layer: object) -> tuple[int, int | str]:
    text = str(layer)
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)


def rank_report(run: Run) -> pd.DataFrame:
    """Active rank/params per task and layer.

    From ``summary["rank_report"]``; falls back to the last round's ``active_rank/<layer>`` and
    ``active_params/<layer>`` metrics.

    Returns
    -------
    pandas.DataFrame
        Columns ``task`` (name), ``layer`` (str: "0", "1", ..., "out"), ``active_rank``,
        ``active_params``; sorted by task order then layer (integers first, then "out").
    """
    cols = ["task", "layer", "active_rank", "active_params"]
    report = run.summary.get("rank_report")
    if report:
        frame = pd.DataFrame(report).reindex(columns=cols)
    else:
        m = run.metrics
        m = m[m["metric"].str.startswith(("active_rank/", "active_params/"))]
        if m.empty:
            return pd.DataFrame(columns=cols)
        m = m[m["round"] == m["round"].max()]
        parts = m["metric"].str.split("/", n=1, expand=True)
        m = m.assign(kind=parts[0], layer=parts[1])
        frame = (
            m.pivot_table(index=["task", "layer"], columns="kind", values="value", aggfunc="first")
            .reset_index()
            .reindex(columns=cols)
        )
    frame["layer"] = frame["layer"].astype(str)
    order = {k: i for i, k in enumerate(run.task_keys)}
    frame["task"] = frame["task"].astype(str)
    frame = frame.assign(
        _t=frame["task"].map(lambda t: order.get(t, len(order))), _l=frame["layer"].map(_layer_key)
    )
    frame = frame.sort_values(["_t", "_l"], kind="stable").drop(columns=["_t", "_l"])
    frame["task"] = frame["task"].map(run.task_name)
    return frame.reset_index(drop=True)


def accuracy_vs_bytes(run: Run) -> pd.DataFrame:
    """Per round: cumulative total bytes and mean aggregated accuracy over the tasks evaluated.

    Returns
    -------
    pandas.DataFrame
        Index ``round``, columns ``cumulative_bytes`` and ``mean_accuracy``.
    """
    cum = traffic_per_round(run)["total"].cumsum().rename("cumulative_bytes")
    acc = accuracy_over_rounds(run).mean(axis=1).rename("mean_accuracy")
    return (
        pd.concat([cum, acc], axis=1)
        .sort_index()
        .assign(cumulative_bytes=lambda f: f["cumulative_bytes"].ffill().fillna(0))
    )
