"""The "no cache" ablation (``keep_activations=False``): the server forgets every sample after
each round's training, so devices upload all of theirs again, and each round trains on what
that round brought."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from flower_pae.config import ConfigError, RunConfig
from flower_pae.server.cache import ActivationCache
from flower_pae.wire import HELD, array_to_ids, ids_to_array
from tests.test_bad_input import TASK, _class_data, _strategy, _train_reply


class _Nodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _replies():
    return [_train_reply(n, _class_data(n)[0]) for n in (1, 2, 3)]


def test_a_forgetful_server_asks_for_every_sample_again_and_trains_on_them(tmp_path):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    kept = _strategy(tmp_path, "kept")
    forgot = _strategy(tmp_path, "forgot", keep_activations=False)
    for strategy in (kept, forgot):
        _, first = strategy.aggregate_train(1, _replies())
        assert first["new_samples"] == 18 and first["train_samples"] == 18
    # the next training request: the keeping server tells each device what it holds
    for strategy, held in ((kept, 6), (forgot, 0)):
        messages = list(strategy.configure_train(2, None, ConfigRecord(), _Nodes()))
        assert {len(array_to_ids(m.content[HELD]["ids"].numpy())) for m in messages} == {held}
    assert len(kept.cache) == 18 and len(forgot.cache) == 0
    # the same uploads again: replays for the keeping server, new samples for the other
    _, again_kept = kept.aggregate_train(2, _replies())
    _, again_forgot = forgot.aggregate_train(2, _replies())
    assert again_kept["new_samples"] == 0 and again_forgot["new_samples"] == 18
    assert again_forgot["train_samples"] == 18 and len(forgot.cache) == 0
    # each round trained on the same samples: the same network, round for round
    for name, value in kept.net.state_dict().items():
        assert torch.equal(forgot.net.state_dict()[name], value), name


def test_a_cleared_cache_spills_and_checkpoints_under_new_names(tmp_path):
    cache = ActivationCache(tmp_path / "spill", memory_cap_bytes=1)
    arrays = _class_data(1)[0]
    cache.add(TASK, arrays)
    first = cache.checkpoint(tmp_path / "ckpt")["blocks"][0]["file"]
    cache.clear()
    assert len(cache) == 0 and cache.stats.bytes_on_disk == 0 and cache.stats.samples == 0
    assert not list((tmp_path / "spill").glob("*.npz"))
    cache.add(TASK, {**arrays, "targets": np.ones_like(arrays["targets"])})
    index = cache.checkpoint(tmp_path / "ckpt")
    assert index["blocks"][0]["file"] != first  # the old checkpoint's file is not overwritten
    restored = ActivationCache(tmp_path / "spill2")
    restored.restore(tmp_path / "ckpt", index)
    assert torch.equal(restored.training_data(TASK)[1], torch.ones(6, arrays["targets"].shape[1]))
    assert ids_to_array(restored.task_ids(TASK)).tobytes() == arrays["ids"].tobytes()


def test_no_cache_needs_one_shot_differences(tmp_path):
    with pytest.raises(ConfigError, match="refresh_step=0"):
        RunConfig(keep_activations=False, refresh_step=4.0)
    with pytest.raises(ValueError, match="one-shot"):
        _strategy(tmp_path, keep_activations=False, refresh_step=4.0)
