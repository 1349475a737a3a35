"""Continual learning in a Flower simulation: staggered task arrivals, subspaces per task key."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flower_pae.config import RunConfig


@pytest.fixture(scope="module")
def staggered_run(small_run) -> Path:
    return small_run(
        "staggered",
        stream="pypi:bbc,pypi:rotten_tomatoes",
        num_devices=4,
        max_train=24,
        max_test=12,
        rounds_per_task=2,
        stagger_rounds=2,
        server_epochs=1,
        seed=0,
    )


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


def _reply(node: int, task_key: str, basis, seed: int, n: int = 12):
    import numpy as np
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    from flower_pae.wire import BASIS, CONFIG, UPLOAD, array_record, ids_to_array

    rng = np.random.default_rng(seed)
    arrays = {
        "ids": ids_to_array(
            [f"{task_key}-{node}-{i:05d}".encode()[:16].ljust(16, b".") for i in range(n)]
        ),
        "acts": rng.standard_normal((n, 2, 8)).astype(np.float16),
        "targets": rng.standard_normal((n, basis.shape[1])).astype(np.float32),
    }
    content = RecordDict(
        {
            UPLOAD: array_record(arrays),
            CONFIG: ConfigRecord({"task_key": task_key}),
            BASIS: array_record({"basis": basis}),
        }
    )
    return Message(content, metadata=Metadata(1, "m", node, 0, "q", "", 0.0, 60.0, "train"))


@pytest.mark.parametrize("overlap", [False, True])
def test_a_later_task_leaves_earlier_predictions_where_label_spans_differ(tmp_path, overlap):
    """The strategy keeps a new task's output off the earlier tasks' label spans: an earlier
    task's predictions, read through its span, do not move, even where the spans overlap;
    the new task still moves its own predictions through the rest of its span."""
    import numpy as np
    import torch

    from flower_pae.oa_adapter import OAAdapterConfig
    from flower_pae.runlog import RunRecorder
    from flower_pae.server.cache import ActivationCache
    from flower_pae.side_network import LadderSideNetwork, TrainerConfig
    from flower_pae.wire import decode_activations
    from strategies.pae import PAEStrategy

    def make(layers: int, hidden: int) -> LadderSideNetwork:
        return LadderSideNetwork(layers, hidden, OAAdapterConfig(r_max=2), out_rank=2)

    strategy = PAEStrategy(
        make,
        TrainerConfig(epochs=5, batch_size=4, seed=0),
        ActivationCache(None),
        RunRecorder(tmp_path / "run", RunConfig().to_dict()),
    )
    eye = np.eye(8, dtype=np.float32)
    basis_a = eye[:, [0, 1]]
    basis_b = eye[:, [1, 2, 3]] if overlap else eye[:, [2, 3, 4]]
    first = _reply(1, "a" * 16, basis_a, seed=0)
    strategy.aggregate_train(1, [first])
    acts_a = decode_activations({"acts": first.content["upload"]["acts"].numpy()})
    with torch.no_grad():
        before = strategy.net(acts_a).numpy()
    strategy.aggregate_train(2, [_reply(1, "b" * 16, basis_b, seed=1)])
    assert strategy.rejected == []
    assert strategy.net.meta()["protected_dims"] == [0, 2]
    with torch.no_grad():
        after = strategy.net(acts_a).numpy()
    assert np.abs((after - before) @ basis_a).max() < 1e-6  # task a's predictions kept
    open_b = basis_b[:, 1:] if overlap else basis_b  # e1 is task a's
    assert np.abs((after - before) @ open_b).max() > 1e-4  # task b wrote the rest of its span
