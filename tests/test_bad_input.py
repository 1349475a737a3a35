"""Bad input from devices: every malformed reply is rejected with a logged reason, changes
nothing on the server, and the round goes on with the good replies; replayed samples are
ignored and counted; poisoned differences are bounded by target clipping (scaled) and
left out by neighbour agreement (flipped).

The strategy is fed hand-built replies "from node N", as Flower's grid hands them over.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from flower_pae.config import RunConfig
from flower_pae.oa_adapter import OAAdapterConfig
from flower_pae.runlog import RunRecorder
from flower_pae.server.cache import ActivationCache
from flower_pae.server.robust import clip_target_norms, disagreeing_devices
from flower_pae.side_network import LadderSideNetwork, TrainerConfig
from flower_pae.wire import BASIS, CONFIG, METRICS, REFRESH, UPLOAD, array_record, ids_to_array
from strategies.pae import PAEStrategy
from tests.run_contract import download_payload_bytes

LAYERS, D = 2, 8
TASK = "0123456789abcdef"
MAX_SAMPLES, MAX_BYTES = 16, 64 * 1024
# The task's label basis of these replies: the identity (D coefficients = the vectors).
IDENTITY = np.eye(D, dtype=np.float32)


# ---- building strategies and replies ------------------------------------------------------
def _strategy(tmp_path, name: str = "s", **kwargs) -> PAEStrategy:
    def make(layers: int, hidden: int) -> LadderSideNetwork:
        return LadderSideNetwork(layers, hidden, OAAdapterConfig(r_max=2), out_rank=2)

    return PAEStrategy(
        make,
        TrainerConfig(epochs=2, batch_size=4, seed=0),
        ActivationCache(tmp_path / name / "spill", memory_cap_bytes=10**9),
        RunRecorder(tmp_path / name / "run", RunConfig().to_dict()),
        max_upload_samples=MAX_SAMPLES,
        max_upload_bytes=MAX_BYTES,
        **kwargs,
    )


def _ids(node: int, n: int, start: int = 0) -> list[bytes]:
    return [f"{node:04d}-{i:011d}".encode() for i in range(start, start + n)]


def _arrays(node: int, n: int = 4, start: int = 0, precision: str = "fp16") -> dict:
    rng = np.random.default_rng(1000 * node + start)
    acts = rng.standard_normal((n, LAYERS, D)).astype(np.float32)
    out = {"ids": ids_to_array(_ids(node, n, start))}
    if precision == "int8":
        scales = np.abs(acts).max(-1) / 127.0
        out["acts"] = np.round(acts / scales[..., None]).astype(np.int8)
        out["scales"] = scales.astype(np.float16)
    else:
        out["acts"] = acts.astype(np.float16)
    out["targets"] = rng.standard_normal((n, D)).astype(np.float32)
    return out


def _message(node: int, content: RecordDict, phase: str) -> Message:
    """A reply as the server's grid hands it over: from ``node``, to a ``phase`` request."""
    meta = Metadata(1, f"m{node}", node, 0, "q", "", 0.0, 60.0, phase)
    return Message(content, metadata=meta)


def _train_reply(
    node: int,
    arrays: dict | None = None,
    *,
    task_key: str = TASK,
    metrics: dict | None = None,
    phase: str = "train",
    extra: dict | None = None,
    basis: np.ndarray | None = IDENTITY,
) -> Message:
    arrays = _arrays(node) if arrays is None else arrays
    content = RecordDict(
        {
            UPLOAD: array_record(arrays),
            CONFIG: ConfigRecord({"task_key": task_key}),
            METRICS: MetricRecord(
                metrics
                or {"num-examples": len(arrays["ids"]), "forward_seconds": 0.1, "peak_rss_mb": 9.0}
            ),
        }
    )
    if basis is not None:
        content[BASIS] = array_record({"basis": basis})
    for name, record in (extra or {}).items():
        content[name] = record
    return _message(node, content, phase)


def _error_reply(node: int, phase: str = "train") -> Message:
    meta = Metadata(1, f"m{node}", node, 0, "q", "", 0.0, 60.0, phase)
    return Message(error=Error(code=0, reason="device crashed"), metadata=meta)


def _eval_reply(node: int, counts: dict, phase: str = "evaluate") -> Message:
    return _message(node, RecordDict({METRICS: MetricRecord(counts)}), phase)


def _counts(correct=3, zero_shot=2, total=4, key=TASK) -> dict:
    return {
        "num-examples": total,
        f"{key}/correct": correct,
        f"{key}/zero_shot_correct": zero_shot,
        f"{key}/total": total,
    }


def _snapshot(strategy: PAEStrategy) -> dict:
    """Everything a reply could change: cache contents and index, side network, bookkeeping."""
    cache = {
        key: tuple(t.clone() for t in strategy.cache.training_data(key)) for key in strategy.tasks
    }
    net = strategy.net
    return {
        "cache": cache,
        "cache_ids": sorted(strategy.cache._ids.items()),
        "stats": strategy.cache.stats.as_dict(),
        "net": {k: v.clone() for k, v in net.state_dict().items()} if net is not None else None,
        "meta": net.meta() if net is not None else None,
        "tasks": {k: (t.first_round, t.last_round) for k, t in strategy.tasks.items()},
        "held": {n: set(ids) for n, ids in strategy.held.items() if ids},
        "shape": strategy.expected_shape,
        "accuracy": {r: dict(v) for r, v in strategy.accuracy.items()},
        "bases": {k: v.tolist() for k, v in strategy.bases.items()},
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert a["cache"].keys() == b["cache"].keys()
    for key in a["cache"]:
        for x, y in zip(a["cache"][key], b["cache"][key], strict=True):
            assert torch.equal(x, y), key
    assert (a["net"] is None) == (b["net"] is None)
    if a["net"] is not None:
        assert a["net"].keys() == b["net"].keys()
        for name in a["net"]:
            assert torch.equal(a["net"][name], b["net"][name]), name
    for name in ("cache_ids", "stats", "meta", "tasks", "held", "shape", "accuracy", "bases"):
        assert a[name] == b[name], name


def _rejections(strategy: PAEStrategy) -> list[dict]:
    metrics = strategy.recorder.metrics_frame()
    rows = metrics[metrics.metric == "rejected_uploads"]
    return [
        {"round": r, "node_id": int(n)} for r, n in zip(rows["round"], rows["node_id"], strict=True)
    ]


# ---- bad training replies -----------------------------------------------------------------
def _mutated(**changes) -> dict:
    arrays = _arrays(9)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value(arrays) if callable(value) else value
    return arrays


def _with(arrays: dict, key: str, index, value) -> dict:
    arrays[key] = arrays[key].copy()
    arrays[key][index] = value
    return arrays


def _undecodable() -> RecordDict:
    record = array_record(_arrays(9))
    record["acts"] = Array(dtype="float16", shape=(4, LAYERS, D), stype="numpy.ndarray", data=b"!")
    return record


BAD_TRAIN_REPLIES = {
    # wrong shapes
    "acts of two dimensions": (
        lambda: _train_reply(9, _mutated(acts=lambda a: a["acts"][:, 0])),
        "acts must be",
    ),
    "acts with another layer count": (
        lambda: _train_reply(9, _mutated(acts=np.zeros((4, LAYERS + 1, D), np.float16))),
        "differs from the expected",
    ),
    "acts and ids of different lengths": (
        lambda: _train_reply(9, _mutated(acts=lambda a: a["acts"][:3])),
        "acts must be",
    ),
    "targets of another width": (
        lambda: _train_reply(9, _mutated(targets=lambda a: a["targets"][:, :5])),
        "targets have 5 coefficients, the basis 8",
    ),
    # the task's label basis
    "a basis that is not orthonormal": (
        lambda: _train_reply(9, basis=2 * IDENTITY),
        "not orthonormal",
    ),
    "a basis of another hidden size": (
        lambda: _train_reply(9, basis=np.eye(D + 1, D, dtype=np.float32)),
        "basis must be float32",
    ),
    "a float64 basis": (lambda: _train_reply(9, basis=np.eye(D)), "basis must be float32"),
    "a basis of one column": (
        lambda: _train_reply(
            9, _mutated(targets=lambda a: a["targets"][:, :1]), basis=IDENTITY[:, :1]
        ),
        "2 to 8 columns",
    ),
    "a basis unlike the one the task's devices sent first": (
        lambda: _train_reply(9, basis=IDENTITY[::-1].copy()),
        "differs from the one",
    ),
    "new samples of a new task without its basis": (
        lambda: _train_reply(9, task_key="f" * 16, basis=None),
        "need its basis record",
    ),
    "ids of 8 bytes": (
        lambda: _train_reply(9, _mutated(ids=lambda a: a["ids"][:, :8])),
        "ids must be",
    ),
    "int8 scales of the wrong shape": (
        lambda: _train_reply(
            9, {**_arrays(9, precision="int8"), "scales": np.ones((4, 1), np.float16)}
        ),
        "scales must be",
    ),
    # wrong dtypes
    "float32 acts": (
        lambda: _train_reply(9, _mutated(acts=lambda a: a["acts"].astype(np.float32))),
        "float16 or int8",
    ),
    "float64 targets": (
        lambda: _train_reply(9, _mutated(targets=lambda a: a["targets"].astype(np.float64))),
        "targets must be float32",
    ),
    "int32 ids": (
        lambda: _train_reply(9, _mutated(ids=lambda a: a["ids"].astype(np.int32))),
        "ids must be uint8",
    ),
    "int8 acts without scales": (
        lambda: _train_reply(
            9, {k: v for k, v in _arrays(9, precision="int8").items() if k != "scales"}
        ),
        "scales",
    ),
    "int64 scales": (
        lambda: _train_reply(
            9, {**_arrays(9, precision="int8"), "scales": np.ones((4, LAYERS), np.int64)}
        ),
        "scales must be",
    ),
    # NaN and Inf
    "NaN in acts": (
        lambda: _train_reply(9, _with(_arrays(9), "acts", (1, 0, 3), np.nan)),
        "NaN or Inf",
    ),
    "Inf in acts": (
        lambda: _train_reply(9, _with(_arrays(9), "acts", (0, 1, 0), np.inf)),
        "NaN or Inf",
    ),
    "NaN in targets": (
        lambda: _train_reply(9, _with(_arrays(9), "targets", (2, 2), np.nan)),
        "NaN or Inf",
    ),
    "Inf in targets": (
        lambda: _train_reply(9, _with(_arrays(9), "targets", (0, 0), -np.inf)),
        "NaN or Inf",
    ),
    "NaN in int8 scales": (
        lambda: _train_reply(9, _with(_arrays(9, precision="int8"), "scales", (0, 1), np.nan)),
        "NaN or Inf",
    ),
    "Inf in int8 scales": (
        lambda: _train_reply(9, _with(_arrays(9, precision="int8"), "scales", (3, 0), np.inf)),
        "NaN or Inf",
    ),
    "negative int8 scales": (
        lambda: _train_reply(9, _with(_arrays(9, precision="int8"), "scales", (3, 0), -1.0)),
        "negative",
    ),
    # oversized payloads
    "too many samples": (lambda: _train_reply(9, _arrays(9, n=MAX_SAMPLES + 1)), "exceeds the cap"),
    "too many bytes": (
        lambda: _train_reply(9, _mutated(acts=np.zeros((4, 2000, D), np.float16))),
        f"exceeds the cap of {MAX_BYTES} bytes",
    ),
    "an oversized task key": (lambda: _train_reply(9, task_key="k" * 65), "task key"),
    "an empty task key": (lambda: _train_reply(9, task_key=""), "task key"),
    # unknown keys and records
    "an extra array in the upload": (
        lambda: _train_reply(9, {**_arrays(9), "labels": np.zeros(4, np.int64)}),
        "unexpected record keys",
    ),
    "a missing array in the upload": (
        lambda: _train_reply(9, _mutated(targets=None)),
        "unexpected record keys",
    ),
    "an extra record in the reply": (
        lambda: _train_reply(9, extra={"secret": ConfigRecord({"q": "..."})}),
        "unknown record(s) ['secret']",
    ),
    "an extra entry in the config record": (
        lambda: _message(
            9,
            RecordDict(
                {
                    UPLOAD: array_record(_arrays(9)),
                    CONFIG: ConfigRecord({"task_key": TASK, "label": "sport"}),
                }
            ),
            "train",
        ),
        "only 'task_key'",
    ),
    "an upload that is not an array record": (
        lambda: _message(
            9,
            RecordDict(
                {UPLOAD: ConfigRecord({"ids": "x"}), CONFIG: ConfigRecord({"task_key": TASK})}
            ),
            "train",
        ),
        "must be a ArrayRecord",
    ),
    "an undecodable array": (
        lambda: _message(
            9,
            RecordDict({UPLOAD: _undecodable(), CONFIG: ConfigRecord({"task_key": TASK})}),
            "train",
        ),
        "cannot be decoded",
    ),
    "a NaN device figure": (
        lambda: _train_reply(9, metrics={"num-examples": 4, "forward_seconds": float("nan")}),
        "device metric 'forward_seconds'",
    ),
    # replies to the wrong phase
    "an evaluation reply": (lambda: _eval_reply(9, _counts()), "'evaluate' reply in the training"),
    "evaluation counts in a training reply": (
        lambda: _eval_reply(9, _counts(), phase="train"),
        "without the record(s)",
    ),
    "a training upload marked as evaluation": (
        lambda: _train_reply(9, phase="evaluate"),
        "'evaluate' reply in the training",
    ),
    "a refresh record outside the refresh phase": (
        lambda: _train_reply(
            9,
            extra={
                REFRESH: array_record(
                    {"ids": ids_to_array(_ids(1, 2)), "targets": np.zeros((2, D), np.float32)}
                )
            },
        ),
        "outside the refresh phase",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN_REPLIES))
def test_a_bad_training_reply_is_rejected_and_changes_nothing(tmp_path, caplog, case):
    """Round 1: good replies of nodes 1 and 2 around the bad one of node 9; round 2: the bad
    one alone. The strategy ends exactly as one that never received it."""
    make_bad, needle = BAD_TRAIN_REPLIES[case]
    attacked, clean = _strategy(tmp_path, "attacked"), _strategy(tmp_path, "clean")
    with caplog.at_level(logging.WARNING, logger="flower_pae"):
        _, metrics = attacked.aggregate_train(1, [_train_reply(1), make_bad(), _train_reply(2)])
    clean.aggregate_train(1, [_train_reply(1), _train_reply(2)])
    # the round went on: the good replies were cached and trained on
    assert metrics["new_samples"] == 8 and metrics["train_samples"] == 8
    assert len(attacked.rejected) == 1
    rejection = attacked.rejected[0]
    assert needle in rejection["reason"], rejection["reason"]
    assert (rejection["round"], rejection["phase"], rejection["node_id"]) == (1, "train", 9)
    assert _rejections(attacked) == [{"round": 1, "node_id": 9}]
    assert any(needle in r.getMessage() and "device 9" in r.getMessage() for r in caplog.records)
    _assert_same(_snapshot(attacked), _snapshot(clean))
    # alone in a later round: still nothing changes but the usual training on the cache
    before = _snapshot(attacked)
    attacked.aggregate_train(2, [make_bad()])
    clean.aggregate_train(2, [])
    assert len(attacked.rejected) == 2
    _assert_same(_snapshot(attacked), _snapshot(clean))
    assert before["cache_ids"] == _snapshot(attacked)["cache_ids"]


def test_a_bad_first_reply_cannot_fix_the_activation_shape(tmp_path):
    """The first round's majority shape wins, whichever reply arrives first."""
    strategy = _strategy(tmp_path)
    odd = _train_reply(9, _mutated(acts=np.zeros((4, LAYERS + 3, D), np.float16)))
    strategy.aggregate_train(1, [odd, _train_reply(1), _train_reply(2)])
    assert strategy.expected_shape == (LAYERS, D)
    assert [r["node_id"] for r in strategy.rejected] == [9]
    assert len(strategy.cache) == 8


def test_an_error_reply_is_logged_and_the_round_goes_on(tmp_path, caplog):
    attacked, clean = _strategy(tmp_path, "attacked"), _strategy(tmp_path, "clean")
    with caplog.at_level(logging.WARNING, logger="flower_pae"):
        attacked.aggregate_train(1, [_error_reply(9), _train_reply(1)])
        attacked.aggregate_evaluate(1, [_error_reply(9, "evaluate"), _eval_reply(1, _counts())])
    clean.aggregate_train(1, [_train_reply(1)])
    clean.aggregate_evaluate(1, [_eval_reply(1, _counts())])
    messages = [r.getMessage() for r in caplog.records]
    assert sum("device 9 failed: device crashed" in m for m in messages) == 2
    # a failure is not bad input: counted as failed by the round loop, not as rejected
    assert attacked.rejected == []
    _assert_same(_snapshot(attacked), _snapshot(clean))


def test_an_empty_upload_of_an_unknown_task_opens_nothing(tmp_path):
    strategy = _strategy(tmp_path)
    strategy.aggregate_train(1, [_train_reply(1)])
    strategy.aggregate_train(2, [_train_reply(2, _arrays(2, n=0), task_key="f" * 16)])
    assert list(strategy.tasks) == [TASK] and strategy.net.current_task == TASK


# ---- replayed and unknown ids -------------------------------------------------------------
def test_replayed_samples_leave_the_cache_as_it_was_and_are_counted(tmp_path):
    strategy = _strategy(tmp_path)
    strategy.aggregate_train(1, [_train_reply(1)])
    before = _snapshot(strategy)
    # node 2 sends node 1's ids again, with other activations and targets
    replay = _arrays(2)
    replay["ids"] = ids_to_array(_ids(1, 4))
    replay["targets"] = replay["targets"] * 100
    strategy.aggregate_train(2, [_train_reply(2, replay)])
    after = _snapshot(strategy)
    assert strategy.rejected == []  # replays are not malformed: ignored and counted
    for x, y in zip(before["cache"][TASK], after["cache"][TASK], strict=True):
        assert torch.equal(x, y)
    assert after["cache_ids"] == before["cache_ids"]
    assert after["stats"]["duplicates_rejected"] == before["stats"]["duplicates_rejected"] + 4
    assert after["stats"]["samples"] == before["stats"]["samples"]
    metrics = strategy.recorder.metrics_frame()
    replayed = metrics[metrics.metric == "replayed_samples"]
    assert replayed[["round", "node_id", "value"]].values.tolist() == [[2, 2, 4.0]]
    # a mixed upload: the new samples are cached, the replayed ones ignored
    mixed = _arrays(3, n=4)
    mixed["ids"] = ids_to_array(_ids(1, 2) + _ids(3, 2))
    strategy.aggregate_train(3, [_train_reply(3, mixed)])
    assert len(strategy.cache) == 6 and strategy.cache.stats.duplicates_rejected == 6


def test_a_replay_cannot_overwrite_targets_in_the_refresh_phase(tmp_path):
    strategy = _strategy(tmp_path, refresh_step=4.0)
    strategy.aggregate_train(1, [_train_reply(1)])
    targets = strategy.cache.training_data(TASK)[1].clone()
    replay = _arrays(2)
    replay["ids"] = ids_to_array(_ids(1, 4))
    strategy.aggregate_train(2, [_train_reply(2, replay)])
    assert torch.equal(strategy.cache.training_data(TASK)[1], targets)


def test_refresh_records_with_unknown_or_repeated_ids_are_rejected(tmp_path):
    strategy = _strategy(tmp_path, refresh_step=4.0)
    strategy.aggregate_train(1, [_train_reply(1)])
    targets = strategy.cache.training_data(TASK)[1].clone()
    empty = _arrays(1, n=0)

    def refresh(ids):
        record = {"ids": ids_to_array(ids), "targets": np.ones((len(ids), D), np.float32)}
        return _train_reply(1, empty, extra={REFRESH: array_record(record)})

    unknown = _ids(1, 1, start=50)  # never uploaded by anyone
    strategy.aggregate_train(2, [refresh(_ids(1, 2) + unknown)])
    assert "never uploaded" in strategy.rejected[-1]["reason"]
    strategy.aggregate_train(3, [refresh(_ids(1, 1) * 2)])
    assert "twice" in strategy.rejected[-1]["reason"]
    assert len(strategy.rejected) == 2
    assert torch.equal(strategy.cache.training_data(TASK)[1], targets)


# ---- bad evaluation replies ---------------------------------------------------------------
BAD_EVALUATE_REPLIES = {
    "a training upload": (lambda: _train_reply(9), "'train' reply in the evaluation phase"),
    "an upload marked as evaluation": (
        lambda: _train_reply(9, phase="evaluate"),
        "unknown record(s)",
    ),
    "correct above total": (lambda: _eval_reply(9, _counts(correct=5, total=4)), "exceed"),
    "zero-shot correct above total": (lambda: _eval_reply(9, _counts(zero_shot=9)), "exceed"),
    "a negative count": (lambda: _eval_reply(9, _counts(correct=-1)), "integer in"),
    "a fractional count": (lambda: _eval_reply(9, _counts(correct=2.5)), "integer in"),
    "a NaN count": (lambda: _eval_reply(9, _counts(total=float("nan"))), "integer in"),
    "a huge count": (lambda: _eval_reply(9, _counts(total=10**12)), "integer in"),
    "a list of counts": (lambda: _eval_reply(9, {f"{TASK}/correct": [1, 2]}), "integer in"),
    "an unknown metric": (
        lambda: _eval_reply(9, {**_counts(), "label_histogram": 3}),
        "unknown evaluation metric",
    ),
    "incomplete counts": (
        lambda: _eval_reply(9, {f"{TASK}/correct": 1, f"{TASK}/total": 4}),
        "incomplete",
    ),
    "an extra record": (
        lambda: _message(
            9,
            RecordDict({METRICS: MetricRecord(_counts()), "x": ConfigRecord({"a": 1})}),
            "evaluate",
        ),
        "unknown record(s) ['x']",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_EVALUATE_REPLIES))
def test_a_bad_evaluation_reply_is_rejected_and_not_counted(tmp_path, case):
    make_bad, needle = BAD_EVALUATE_REPLIES[case]
    attacked, clean = _strategy(tmp_path, "attacked"), _strategy(tmp_path, "clean")
    for strategy in (attacked, clean):
        strategy.aggregate_train(1, [_train_reply(1)])
    out = attacked.aggregate_evaluate(1, [_eval_reply(1, _counts(3, 2, 4)), make_bad()])
    clean.aggregate_evaluate(1, [_eval_reply(1, _counts(3, 2, 4))])
    assert out[f"{TASK}/accuracy"] == 0.75
    assert attacked.accuracy == {1: {TASK: 0.75}} and attacked.zero_shot == {TASK: 0.5}
    assert len(attacked.rejected) == 1
    rejection = attacked.rejected[0]
    assert needle in rejection["reason"], rejection["reason"]
    assert (rejection["phase"], rejection["node_id"]) == ("evaluate", 9)
    assert _rejections(attacked) == [{"round": 1, "node_id": 9}]
    _assert_same(_snapshot(attacked), _snapshot(clean))
    per_node = attacked.recorder.metrics_frame().dropna(subset=["node_id"])
    assert 9 not in set(per_node[per_node.metric == "accuracy"]["node_id"])


# ---- poisoning: target clipping -----------------------------------------------------------
def test_clipping_depends_on_norms_only_so_masked_training_stays_exact():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(40, D, generator=gen, dtype=torch.float64)
    t[:5] *= 100  # five poisoned rows
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    clipped, count = clip_target_norms(t, 3.0)
    masked, masked_count = clip_target_norms(t @ q.T, 3.0)
    assert count == masked_count == 5
    torch.testing.assert_close(masked, clipped @ q.T, atol=1e-12, rtol=0)
    bound = 3.0 * t.norm(dim=1).median()
    assert torch.all(clipped.norm(dim=1) <= bound * (1 + 1e-12))
    assert torch.equal(clipped[5:], t[5:])  # honest rows untouched
    same, none = clip_target_norms(t, 0.0)
    assert same is t and none == 0
    with pytest.raises(ValueError, match=">= 0"):
        clip_target_norms(t, -1.0)


def test_the_server_clips_scaled_differences_before_training(tmp_path):
    defended = _strategy(tmp_path, "defended", clip_targets=3.0)
    poisoned = _arrays(9)
    poisoned["targets"] = poisoned["targets"] * 100
    honest = [_train_reply(n) for n in range(1, 8)]
    _, metrics = defended.aggregate_train(1, [*honest, _train_reply(9, poisoned)])
    assert metrics["clipped_targets"] == 4
    # the cache keeps what was uploaded; the clipping applies to what is trained on
    assert strategy_targets_max(defended) > 50
    _, targets, report = defended.training_data(TASK)
    norms = targets.norm(dim=1)
    assert report == {"clipped_targets": 4} and norms.max() <= 3.0 * norms.median() * 1.0001
    with pytest.raises(ValueError, match="clip_targets"):
        _strategy(tmp_path, "bad", clip_targets=-1.0)


def strategy_targets_max(strategy: PAEStrategy) -> float:
    return float(strategy.cache.training_data(TASK)[1].norm(dim=1).max())


def test_clipped_training_on_masked_targets_is_the_rotated_clear_training(tmp_path):
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(3)))
    uploads = {n: _arrays(n) for n in range(1, 5)}
    uploads[4]["targets"] = uploads[4]["targets"] * 100
    clear = _strategy(tmp_path, "clear", clip_targets=2.0)
    masked = _strategy(tmp_path, "masked", clip_targets=2.0)
    clear.aggregate_train(1, [_train_reply(n, a) for n, a in uploads.items()])
    rotated = {
        n: {**a, "targets": (a["targets"] @ q.numpy().T).astype(np.float32)}
        for n, a in uploads.items()
    }
    masked.aggregate_train(1, [_train_reply(n, a) for n, a in rotated.items()])
    acts = clear.cache.training_data(TASK)[0]
    with torch.no_grad():
        decoded = masked.net.eval()(acts) @ q
        expected = clear.net.eval()(acts)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-4)


def test_refresh_of_another_tasks_samples_is_rejected(tmp_path):
    strategy = _strategy(tmp_path, refresh_step=4.0)
    strategy.aggregate_train(1, [_train_reply(1)])
    targets = strategy.cache.training_data(TASK)[1].clone()
    record = {"ids": ids_to_array(_ids(1, 2)), "targets": np.ones((2, D), np.float32)}
    other = "f" * 16
    reply = _train_reply(
        1, _arrays(1, n=2, start=10), task_key=other, extra={REFRESH: array_record(record)}
    )
    strategy.aggregate_train(2, [reply])
    assert "another task" in strategy.rejected[-1]["reason"]
    assert torch.equal(strategy.cache.training_data(TASK)[1], targets)
    assert other not in strategy.tasks and other not in strategy.bases


# ---- poisoning: flipped differences against neighbour agreement ---------------------------
CLASSES = 3


def _class_data(node: int, n: int = 6, flip: bool = False) -> tuple[dict, np.ndarray]:
    """An upload whose samples carry a class: its last layer's pivot states cluster by class
    and its differences point to the class (``e_y − 1/C`` plus noise); ``flip`` negates them."""
    rng = np.random.default_rng(node)
    labels = np.arange(n) % CLASSES
    centres = np.eye(CLASSES, D, dtype=np.float32) * 4
    acts = rng.standard_normal((n, LAYERS, D)).astype(np.float32)
    acts[:, -1] += centres[labels]
    targets = np.eye(CLASSES, D, dtype=np.float32)[labels] - 1.0 / CLASSES
    targets = targets + 0.1 * rng.standard_normal((n, D)).astype(np.float32)
    if flip:
        targets = -targets
    arrays = {"ids": ids_to_array(_ids(node, n)), "acts": acts.astype(np.float16)}
    return {**arrays, "targets": targets.astype(np.float32)}, labels


def test_disagreeing_devices_are_the_flipping_ones_and_rotation_does_not_change_them():
    gen = torch.Generator().manual_seed(0)
    owners = torch.arange(8).repeat_interleave(10)
    labels = torch.randint(0, CLASSES, (80,), generator=gen)
    features = torch.eye(CLASSES, 16)[labels] * 3 + torch.randn(80, 16, generator=gen)
    targets = torch.eye(CLASSES, D)[labels] - 1 / CLASSES + 0.2 * torch.randn(80, D, generator=gen)
    assert disagreeing_devices(features, targets, owners, 5) == []
    flipped = targets.clone()
    flipped[owners < 3] *= -1  # 3 of 8 devices flip every difference
    found = disagreeing_devices(features, flipped, owners, 5)
    assert sorted(found) == [0, 1, 2]
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    assert disagreeing_devices(features, flipped.double() @ q.T, owners, 5) == found
    with pytest.raises(ValueError, match="neighbours"):
        disagreeing_devices(features, targets, owners, 0)


def test_flipping_devices_are_left_out_of_one_shot_training(tmp_path):
    honest = [_train_reply(n, _class_data(n)[0]) for n in range(1, 7)]
    flipping = [_train_reply(n, _class_data(n, flip=True)[0]) for n in (7, 8)]
    defended = _strategy(tmp_path, "defended", agreement_neighbours=4)
    _, metrics = defended.aggregate_train(1, [*honest, *flipping])
    assert metrics["excluded_devices"] == 2 and metrics["excluded_samples"] == 12
    # the cache keeps what was uploaded; the training is exactly that of the honest devices
    assert defended.cache.task_size(TASK) == 48
    clean = _strategy(tmp_path, "clean", agreement_neighbours=4)
    _, clean_metrics = clean.aggregate_train(1, honest)
    assert clean_metrics["excluded_devices"] == 0
    for name, value in clean.net.state_dict().items():
        assert torch.equal(defended.net.state_dict()[name], value), name
    undefended = _strategy(tmp_path, "undefended")
    _, plain = undefended.aggregate_train(1, [*honest, *flipping])
    assert "excluded_devices" not in plain
    w2 = "task_sets.0.out.W2"
    assert not torch.equal(undefended.net.state_dict()[w2], clean.net.state_dict()[w2])
    with pytest.raises(ValueError, match="agreement_neighbours"):
        _strategy(tmp_path, "bad", agreement_neighbours=-1)


def test_flipping_devices_get_no_refresh_step(tmp_path):
    strategy = _strategy(tmp_path, refresh_step=4.0, agreement_neighbours=4)
    replies = [_train_reply(n, _class_data(n, flip=n > 6)[0]) for n in range(1, 9)]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["excluded_devices"] == 2
    cached = strategy.cache.training_data(TASK)[1]
    targets = dict(zip(strategy.cache.task_ids(TASK), cached, strict=True))
    for node in range(1, 9):
        sent = torch.from_numpy(_class_data(node, flip=node > 6)[0]["targets"])
        rows = torch.stack([targets[i] for i in _ids(node, 6)])
        if node > 6:  # no step: the target is the server's own output (zero before training)
            assert torch.equal(rows, torch.zeros_like(rows))
        else:
            torch.testing.assert_close(rows, 4.0 * sent)


# ---- the side network's download ----------------------------------------------------------
class _Nodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


@pytest.mark.parametrize("precision", ["fp16", "fp32", "int8"])
def test_the_evaluation_download_gives_the_devices_the_servers_network(tmp_path, precision):
    """fp16 halves the weight matrices' bytes, int8 quarters them (plus a float16 scale per
    row), and both send the standardizer as float16; the device's network then predicts as
    the server's within that rounding, with the server's exact gates and protected
    directions. fp32 is exact."""
    from flwr.supercore.task_identity import TaskIdentity

    from flower_pae.wire import message_bytes, side_network_from_records

    strategy = _strategy(tmp_path, precision, download_precision=precision)
    strategy.aggregate_train(1, [_train_reply(n, _class_data(n)[0]) for n in range(1, 5)])
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    (message, _) = strategy.configure_evaluate(2, None, ConfigRecord(), _Nodes())
    meta, state = side_network_from_records(message.content)
    device_net = LadderSideNetwork.from_state(meta, state).eval()
    server = dict(strategy.net.state_dict())
    assert list(state) == list(server)
    standardizer = ("input_mean", "input_std")
    for name, value in state.items():
        matrix = name.endswith(("W1", "W2"))
        halved = precision != "fp32" and (name in standardizer or matrix and precision == "fp16")
        assert value.dtype == (torch.float16 if halved else torch.float32), name
        if matrix and precision == "int8":  # dequantized: at most half a step off per entry
            step = server[name].abs().amax(dim=-1, keepdim=True) / 127
            assert ((value - server[name]).abs() <= 0.51 * step + 1e-6).all(), name
        elif halved:
            assert torch.equal(value, server[name].half()), name
        else:
            assert torch.equal(value.flatten(), server[name].float().flatten()), name
    acts = strategy.cache.training_data(TASK)[0]
    with torch.no_grad():
        expected, got = strategy.net.eval()(acts), device_net(acts)
    assert expected.abs().max() > 1e-3
    tol = {"fp16": 2e-3, "int8": 2e-2, "fp32": 0.0}[precision] * float(expected.abs().max())
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)
    # the bytes: the entries at their precision, the layout, and the framing of one flat
    # array per dtype (Flower sends every array as an object with its own ids and hashes)
    matrices = [n for n in server if n.endswith(("W1", "W2"))]
    payload = download_payload_bytes(server, matrices, standardizer, precision)
    texts = sum(len(str(v)) for v in message.content["side_meta"].values())
    framing = message_bytes(message) - payload - texts
    dtypes = {"fp32": 1, "fp16": 2, "int8": 3}[precision]
    assert len(message.content["side_net"]) == dtypes
    # about 650 bytes for the message and its records, 450 per array (59 arrays before packing)
    assert 0 < framing < 700 + 500 * dtypes
    with pytest.raises(ValueError, match="download_precision"):
        _strategy(tmp_path, "bad", download_precision="int4")


def test_rejections_are_summarized_in_round_order(tmp_path):
    """With overlapping rounds a round's evaluation replies are taken after the next round's
    uploads; the summary lists rejections as a sequential run would."""
    strategy = _strategy(tmp_path)
    strategy.aggregate_train(1, [_train_reply(1)])
    strategy.aggregate_train(3, [_train_reply(2, phase="evaluate")])  # round 3's uploads,
    strategy.aggregate_evaluate(2, [_eval_reply(1, _counts(), phase="train")])  # then round 2's
    rejected = strategy.final_summary(3)["rejected_uploads"]
    assert [(r["round"], r["phase"]) for r in rejected] == [(2, "evaluate"), (3, "train")]
