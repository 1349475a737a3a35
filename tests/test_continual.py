"""Continual learning in a Flower simulation: staggered task arrivals, subspaces per task key."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flower_pae.config import RunConfig


@pytest.fixture(scope="module")
def staggered_run(tmp_path_factory, tiny_model_dir) -> Path:
    from simulations.cli import simulate

    out = tmp_path_factory.mktemp("staggered")
    cfg = RunConfig(
        model=str(tiny_model_dir),
        stream="pypi:bbc,pypi:rotten_tomatoes",
        num_devices=4,
        max_train=24,
        max_test=12,
        rounds_per_task=2,
        stagger_rounds=2,
        server_epochs=1,
        seed=0,
    )
    simulate(cfg, out)
    return out


def test_staggered_devices_are_evaluated_on_exactly_the_tasks_they_have_seen(staggered_run):
    messages = pd.read_parquet(staggered_run / "messages.parquet")
    metrics = pd.read_parquet(staggered_run / "metrics.parquet")
    up = messages[(messages.phase == "train") & (messages.direction == "up")]
    # the devices really are staggered: they meet the second task in different rounds
    first_round = up.groupby(["node_id", "task_key"])["round"].min().unstack()
    assert first_round.shape[1] == 2
    assert first_round.iloc[:, :].max(axis=1).nunique() > 1
    per_node = metrics[(metrics.metric == "accuracy") & metrics.node_id.notna()]
    assert not per_node.empty
    for (node, rnd), rows in per_node.groupby(["node_id", "round"]):
        seen = set(up[(up.node_id == node) & (up["round"] <= rnd)]["task_key"])
        assert set(rows["task"]) == seen, (node, rnd)


def test_a_new_key_opens_a_subspace_and_an_old_one_does_not(staggered_run):
    summary = json.loads((staggered_run / "summary.json").read_text())
    assert len(summary["task_keys"]) == 2
    per_task = pd.DataFrame(summary["rank_report"]).groupby("task").size()
    # one adapter per ladder layer plus the output map, per task: two sets, no more
    assert sorted(per_task.index) == sorted(summary["task_keys"])
    assert per_task.nunique() == 1
    first, second = summary["task_keys"]
    assert summary["task_rounds"][first][0] == 1 and summary["task_rounds"][second][0] > 1
