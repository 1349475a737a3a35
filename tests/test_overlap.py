"""Overlapping rounds (``overlap_rounds``) change when things happen, not what is computed.

Simulations of the tiny model with the same seed, through Flower's simulation engine: one
with each round's phases one after another, and two with rounds overlapping, checkpointed
after the last round only or (the default) after every round, which takes each checkpoint
with a round's evaluation still out. They must end with the same summary, side network,
recorded messages and metrics; and the overlapping runs must really have overlapped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Message, Metadata, RecordDict

from flower_pae.config import RunConfig
from tests.run_contract import assert_same_run

FIT_STARTS: dict[str, list[float]] = {}  # when each run's server began each round's training
EVALUATED: dict[str, dict[int, float]] = {}  # when it took each round's evaluation replies


def _config(tiny_model_dir: Path, **changes) -> RunConfig:
    return RunConfig(
        model=str(tiny_model_dir),
        stream="pypi:bbc,pypi:rotten_tomatoes",
        num_devices=3,
        devices_per_round=2,  # sampling order matters
        fraction_evaluate=0.67,
        max_train=24,
        max_test=12,
        rounds_per_task=2,
        server_epochs=2,
        **changes,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Sequential and overlapping runs checkpointed after the last round only, and the
    default: overlapping, a checkpoint every round."""
    from flower_pae.side_network import SideNetworkTrainer
    from simulations.cli import simulate
    from strategies.pae import PAEStrategy

    fit, aggregate = SideNetworkTrainer.fit, PAEStrategy.aggregate_evaluate
    out = {}
    for name, changes in (
        ("sequential", {"overlap_rounds": False, "checkpoint_every": 4}),
        ("overlap", {"checkpoint_every": 4}),
        ("checkpointed", {}),
    ):
        starts = FIT_STARTS[name] = []
        evaluated = EVALUATED[name] = {}

        def timed_fit(self, *args, starts=starts, **kwargs):
            starts.append(time.time())  # the server runs in this process
            return fit(self, *args, **kwargs)

        def timed_aggregate(self, server_round, replies, evaluated=evaluated):
            evaluated[server_round] = time.time()
            return aggregate(self, server_round, replies)

        out[name] = tmp_path_factory.mktemp(name)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(SideNetworkTrainer, "fit", timed_fit)
            patch.setattr(PAEStrategy, "aggregate_evaluate", timed_aggregate)
            simulate(_config(tiny_model_dir, **changes), out[name])
    return out


@pytest.mark.parametrize("name", ["overlap", "checkpointed"])
def test_overlapping_rounds_compute_what_sequential_rounds_do(runs, name):
    summary = json.loads((runs["sequential"] / "summary.json").read_text())
    assert summary["rounds"] == 4 and np.isfinite(np.array(summary["accuracy_matrix"], float)).any()
    assert_same_run(runs["sequential"], runs[name])


def _requests_and_replies(run: Path) -> tuple[pd.Series, pd.Series]:
    from analysis import call_latency, load_run

    latency = call_latency(load_run(run))
    first_request = latency.groupby(["round", "phase"])["request_at"].min()
    last_reply = latency.groupby(["round", "phase"])["reply_at"].max()
    return first_request, last_reply


def _recorded_at(run: Path, metric: str, server_round: int) -> int:
    """Position of a round's first row of ``metric`` in the order the server recorded rows."""
    frame = pd.read_parquet(run / "metrics.parquet")
    return int(np.flatnonzero((frame.metric == metric) & (frame["round"] == server_round))[0])


def test_rounds_overlap_only_where_asked(runs):
    """Sequential: every phase's requests are built after the previous phase's replies came
    in, and a round's evaluation is recorded before the next round's training. Overlapping:
    the next round's upload requests are built before this round's evaluation requests (they
    go out before the server trains), not before this round's uploads came in; a round's
    evaluation replies are taken after the next round's training (and after the next round's
    evaluation went out), and the next round's upload requests go out before this round's
    training starts."""
    rounds = range(1, 5)
    first, last = _requests_and_replies(runs["sequential"])
    for r in rounds:
        assert first[(r, "evaluate")] >= last[(r, "train")]
        if r + 1 in rounds:
            assert first[(r + 1, "train")] >= last[(r, "evaluate")]
            assert first[(r + 1, "train")] > FIT_STARTS["sequential"][r - 1]
    for name in ("overlap", "checkpointed"):
        first, last = _requests_and_replies(runs[name])
        for r in rounds:
            assert first[(r, "evaluate")] >= last[(r, "train")]
            if r + 1 in rounds:
                assert last[(r, "train")] <= first[(r + 1, "train")] < first[(r, "evaluate")]
        # the speed-up itself: the next round's uploads are out before this round's training,
        # and its evaluation before this round's evaluation replies are taken
        assert len(FIT_STARTS[name]) == 4
        for r in range(1, 4):
            assert first[(r + 1, "train")] < FIT_STARTS[name][r - 1], (name, r)
            assert first[(r + 1, "evaluate")] < EVALUATED[name][r], (name, r)
    for r in range(1, 4):
        for name, evaluation_first in (
            ("sequential", True),
            ("checkpointed", False),
            ("overlap", False),
        ):
            accuracy = _recorded_at(runs[name], "accuracy", r)
            training = _recorded_at(runs[name], "train_loss", r + 1)
            assert (accuracy < training) == evaluation_first, (name, r)


def _reply(node: int, created_at: float) -> Message:
    meta = Metadata(1, f"r{node}", node, 0, f"q{node}", "", created_at, 60.0, "train")
    return Message(RecordDict(), metadata=meta)


class _Replies:
    """A grid whose devices have answered already."""

    def __init__(self, replies: list[Message]) -> None:
        self.replies = replies

    def pull_messages(self, ids) -> list[Message]:
        return [m for m in self.replies if m.metadata.reply_to_message_id in ids]


def test_replies_taken_after_the_deadline_count_by_when_the_device_built_them():
    """A phase collected after its timeout (the server was training) keeps the replies its
    devices built in time, and only those: what a sequential round would have taken. One
    collected in time keeps every reply, whatever the device's clock."""
    from strategies.pae import _receive_replies

    pushed_at = time.time() - 10.0  # pushed 10 s ago, with a 5 s timeout
    in_time, late = _reply(1, pushed_at + 1.0), _reply(2, pushed_at + 7.0)
    got = _receive_replies(_Replies([in_time, late]), ["q1", "q2", "q3"], 5.0, "t", pushed_at)
    assert got == [in_time]
    # collected before the deadline: in time, whatever the device's clock says
    now = time.time()
    skewed = _reply(3, now + 3600.0)
    assert _receive_replies(_Replies([skewed]), ["q3"], 5.0, "t", now) == [skewed]


def test_simulated_silent_dropouts_run_rounds_in_sequence():
    """A simulated silent device holds its Ray actor past the timeout: with overlapping rounds
    it would hold back the other phase's requests too."""
    from simulations.server_app import overlap_rounds

    assert overlap_rounds(RunConfig())
    assert overlap_rounds(RunConfig(dropout=0.3, dropout_mode="error"))
    assert not overlap_rounds(RunConfig(dropout=0.3, dropout_mode="silent"))
    assert not overlap_rounds(RunConfig(overlap_rounds=False))
