"""Device populations: dropouts and timeouts lose nothing, and the rounds go on."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from flower_pae.config import ConfigError, RunConfig
from flower_pae.data import load_task, resolve_stream
from flower_pae.device.availability import DeviceUnavailable, drop_out, is_available
from flower_pae.wire import (
    BASIS,
    CONFIG,
    HELD,
    METRICS,
    UPLOAD,
    array_record,
    array_to_ids,
    ids_to_array,
)

STREAM = "pypi:bbc,pypi:rotten_tomatoes"
DEVICES, ROUNDS_PER_TASK, DROPOUT = 4, 3, 0.3


def test_availability_is_deterministic_and_near_its_rate():
    draws = [is_available(0, r, p, 0.25) for r in range(1, 41) for p in range(50)]
    assert draws == [is_available(0, r, p, 0.25) for r in range(1, 41) for p in range(50)]
    assert 0.70 < sum(draws) / len(draws) < 0.80
    assert draws != [is_available(1, r, p, 0.25) for r in range(1, 41) for p in range(50)]
    assert all(is_available(3, r, p, 0.0) for r in range(1, 10) for p in range(10))
    with pytest.raises(ValueError, match="dropout"):
        is_available(0, 1, 0, 1.0)


def test_drop_out_raises_only_when_unavailable():
    seed, rnd = 0, 1
    down = [p for p in range(40) if not is_available(seed, rnd, p, 0.5)]
    up = [p for p in range(40) if is_available(seed, rnd, p, 0.5)]
    assert down and up
    with pytest.raises(DeviceUnavailable, match=f"device {down[0]}"):
        drop_out(seed, rnd, down[0], 0.5)
    drop_out(seed, rnd, up[0], 0.5)  # available: returns
    with pytest.raises(ValueError, match="mode"):
        drop_out(seed, rnd, up[0], 0.5, mode="sometimes")
    start = time.monotonic()
    with pytest.raises(DeviceUnavailable):  # silent: answers only after the server's timeout
        drop_out(seed, rnd, down[0], 0.5, mode="silent", timeout=0.1)
    assert time.monotonic() - start >= 1.1


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [(["dropout=1.0"], "dropout"), (["dropout=-0.1"], "dropout"), (["dropout_mode=x"], "mode")],
)
def test_bad_dropout_settings_are_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.load(None, overrides)


def _rounds_of_task(task: int) -> list[int]:
    return [task * ROUNDS_PER_TASK + k + 1 for k in range(ROUNDS_PER_TASK)]


def _telling_seed() -> int:
    """A seed whose dropouts make the test mean something, and whose data can all arrive.

    Some device misses the first round of each task (its samples must come up later); every
    device is available in at least one round of each task (so all samples can arrive).
    """
    for seed in range(200):
        ok = True
        for task in range(2):
            rounds = _rounds_of_task(task)
            avail = {p: [is_available(seed, r, p, DROPOUT) for r in rounds] for p in range(DEVICES)}
            ok &= any(not a[0] for a in avail.values()) and all(any(a) for a in avail.values())
        if ok:
            return seed
    raise AssertionError("no seed in 0..199 gives a telling dropout pattern")


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, RunConfig]:
    from simulations.cli import simulate

    out = tmp_path_factory.mktemp("dropout-run")
    cfg = RunConfig(
        model=str(tiny_model_dir),
        stream=STREAM,
        num_devices=DEVICES,
        max_train=24,
        max_test=8,
        rounds_per_task=ROUNDS_PER_TASK,
        server_epochs=1,
        dropout=DROPOUT,
        seed=_telling_seed(),
    )
    simulate(cfg, out)
    return out, cfg


def test_a_run_with_dropouts_finishes_and_records_the_failures(dropout_run):
    out, cfg = dropout_run
    rounds = 2 * ROUNDS_PER_TASK
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert sorted(metrics.loc[metrics.metric == "round_seconds", "round"]) == list(
        range(1, rounds + 1)
    )
    expected = {
        r: sum(not is_available(cfg.seed, r, p, DROPOUT) for p in range(DEVICES))
        for r in range(1, rounds + 1)
    }
    assert sum(expected.values()) > 0
    failed = metrics[metrics.metric == "train_failed"].set_index("round")["value"]
    assert failed.to_dict() == pytest.approx(expected)
    # evaluation (the experimenter's measurement) is not subject to dropout
    assert (metrics.loc[metrics.metric == "evaluate_failed", "value"] == 0).all()
    timed_out = metrics[metrics.metric.isin(["train_timed_out", "evaluate_timed_out"])]
    assert len(timed_out) == 2 * rounds and (timed_out["value"] == 0).all()
    messages = pd.read_parquet(out / "messages.parquet")
    up = messages[messages.direction == "up"]
    assert set(up.loc[~up.ok, "phase"]) == {"train"}
    assert up[~up.ok].groupby("round").size().to_dict() == {r: n for r, n in expected.items() if n}


def test_dropped_devices_lose_nothing(dropout_run):
    """Every training sample of every device reaches the server's cache exactly once."""
    out, cfg = dropout_run
    tasks = [
        load_task(s, seed=cfg.seed, max_train=cfg.max_train, max_test=cfg.max_test)
        for s in resolve_stream(STREAM)
    ]
    total = sum(len(t.train) for t in tasks)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache"]["samples"] == total
    assert summary["cache"]["duplicates_rejected"] == 0
    messages = pd.read_parquet(out / "messages.parquet")
    up = messages[(messages.phase == "train") & (messages.direction == "up")]
    assert up["num_samples"].sum() == total  # each sample uploaded once, none twice
    # a device that missed a task's first round uploaded that task's samples later
    first_rounds = {_rounds_of_task(t)[0] for t in range(2)}
    late = up[~up["round"].isin(first_rounds) & (up.num_samples > 0)]
    assert len(late) > 0


class _FakeGrid:
    """An in-process grid: nodes answer at once, except ``silent`` nodes' training requests.

    A node answers a training request with samples of its own that the server does not list
    as held, and an evaluation request with counts; that is all the strategy needs.
    """

    def __init__(self, nodes: list[int], samples_per_node: int, silent: dict[int, set[int]]):
        self.nodes, self.silent = nodes, silent
        self.data = {
            n: np.random.default_rng(n).standard_normal((samples_per_node, 2, 8)) for n in nodes
        }
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            server_round = int(msg.content[CONFIG]["round"])
            silent = self.silent.get(server_round, set())
            if msg.metadata.message_type == "train" and msg.metadata.dst_node_id in silent:
                continue  # never answers this training request
            self.replies[msg.metadata.message_id] = self._answer(msg)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == "evaluate":
            counts = {"num-examples": 2, "k/correct": 1, "k/zero_shot_correct": 1, "k/total": 2}
            return Message(RecordDict({METRICS: MetricRecord(counts)}), reply_to=msg)
        held = set(array_to_ids(msg.content[HELD]["ids"].numpy()))
        acts = self.data[node]
        ids = [f"{node:08d}-{i:07d}".encode() for i in range(len(acts))]
        new = [i for i, sample_id in enumerate(ids) if sample_id not in held]
        upload = {
            "ids": ids_to_array([ids[i] for i in new]),
            "acts": acts[new].astype(np.float16),
            "targets": np.zeros((len(new), 8), np.float32),
        }
        content = RecordDict(
            {
                UPLOAD: array_record(upload),
                CONFIG: ConfigRecord({"task_key": "k"}),
                METRICS: MetricRecord({"num-examples": len(new), "forward_seconds": 0.5}),
                # the task's label basis: the identity (8 coefficients = the vectors)
                BASIS: array_record({"basis": np.eye(8, dtype=np.float32)}),
            }
        )
        return Message(content, reply_to=msg)


def test_a_device_that_times_out_loses_nothing_and_the_round_goes_on(tmp_path, monkeypatch):
    """Node 3 does not answer within ``timeout`` in round 1; it uploads in round 2."""
    from flwr.supercore.task_identity import TaskIdentity

    from simulations.server_app import build_strategy

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)  # what a ServerApp process has set

    cfg = RunConfig(num_devices=3, server_epochs=1, server_batch_size=4, out_rank=2, r_max=2)
    strategy = build_strategy(cfg, tmp_path)
    grid = _FakeGrid([1, 2, 3], samples_per_node=4, silent={1: {3}})
    strategy.start(grid, num_rounds=2, timeout=0.3)
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")

    def per_round(name: str) -> dict[int, float]:
        return metrics[metrics.metric == name].set_index("round")["value"].to_dict()

    assert per_round("train_timed_out") == {1: 1, 2: 0}
    assert per_round("evaluate_timed_out") == {1: 0, 2: 0}
    assert per_round("new_samples") == {1: 8, 2: 4}  # node 3's samples arrive in round 2
    assert per_round("train_seconds").keys() == {1, 2}  # round 1 trained without node 3
    assert len(strategy.cache) == 12 and strategy.cache.stats.duplicates_rejected == 0
    forward = metrics[metrics.metric == "forward_seconds"]
    assert len(forward) == 5 and forward.node_id.notna().all()  # one per training reply
