"""The refresh phase: devices resend masked cross-entropy gradients against the current side
output; the server regresses on ``s̃ + η·g̃``. Checked for masked exactness, on the wire of a
small simulation, and against bad refresh records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flower_pae.config import RunConfig
from flower_pae.data import load_task
from flower_pae.device.difference import gradient_difference, mask, unmask
from flower_pae.device.secret import SECRET_ENV, CohortSecret
from flower_pae.oa_adapter import OAAdapterConfig
from flower_pae.side_network import LadderSideNetwork, SideNetworkTrainer, TrainerConfig
from flower_pae.wire import BASIS, CONFIG, METRICS, REFRESH, REFRESH_KEYS, UPLOAD
from tests.run_contract import wire_messages


def _refresh_run(q: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """Device and server over a few refresh steps, in float64; returns decoded side outputs."""
    gen = torch.Generator().manual_seed(0)
    n, layers, d, c = 48, 3, 16, 4
    acts = torch.randn(n, layers, d, generator=gen, dtype=torch.float64)
    rows = torch.randn(c, d, generator=gen, dtype=torch.float64)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=gen)
    net = LadderSideNetwork(layers, d, OAAdapterConfig(r_max=4), out_rank=4, dtype=torch.float64)
    net.add_task("t")
    trainer = SideNetworkTrainer(net, TrainerConfig(epochs=2, batch_size=16, lr=1e-2, seed=0))
    for _ in range(steps):
        with torch.no_grad():
            masked_side = net.eval()(acts)
        # device: gradient against its decoded side output, masked; server: s̃ + η·g̃
        grads = mask(gradient_difference(logits, rows, labels, unmask(masked_side, q)), q)
        trainer.fit(acts, masked_side + 4.0 * grads.double())
    with torch.no_grad():
        return unmask(net.eval()(acts), q).double()


def test_refreshed_training_on_masked_gradients_equals_clear_training():
    d = 16
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1)).double())
    clear = _refresh_run(torch.eye(d, dtype=torch.float64))
    masked = _refresh_run(q)
    assert clear.abs().max() > 1e-3  # the side network learned something
    # mask() hands fp32 to the wire, so agreement is to float32 precision, not 1e-14
    torch.testing.assert_close(masked, clear, atol=2e-4, rtol=1e-3)


def test_gradient_difference_is_the_negative_cross_entropy_gradient():
    gen = torch.Generator().manual_seed(0)
    logits, rows = torch.randn(5, 3, generator=gen), torch.randn(3, 8, generator=gen)
    labels = torch.tensor([0, 1, 2, 1, 0])
    side = torch.randn(5, 8, generator=gen, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(logits + side @ rows.T, labels, reduction="sum")
    loss.backward()
    g = gradient_difference(logits, rows, labels, side.detach())
    torch.testing.assert_close(g.float(), -side.grad, atol=1e-5, rtol=1e-5)


# ---- a small simulation with the refresh phase -------------------------------------------
STREAM = "pypi:bbc"


@pytest.fixture(scope="module")
def refresh_run(small_run) -> Path:
    return small_run(
        "refresh",
        stream=STREAM,
        num_devices=3,
        max_train=24,
        max_test=12,
        rounds_per_task=3,
        server_epochs=1,
        refresh_step=4.0,
        evaluate_every=2,
        record_wire=True,
    )


def test_refresh_resends_only_masked_gradients_of_held_samples(refresh_run):
    task = load_task(STREAM, seed=0, max_train=24, max_test=12)
    secret = CohortSecret.from_hex(os.environ[SECRET_ENV])
    train_ids = {secret.sample_id(task.name, ex.text) for ex in task.train}
    forbidden = [lbl.encode() for lbl in task.labels] + [ex.text[:24].encode() for ex in task.train]
    refreshed_by_round: dict[int, int] = {}
    for name, raw, msg in wire_messages(refresh_run, "train", "up"):
        for needle in forbidden:
            assert needle not in raw, f"{name} contains {needle!r}"
        rnd = int(name[:4])
        if rnd == 1:  # nothing held yet: first uploads (and the task's basis) only
            assert set(msg.content.keys()) == {UPLOAD, CONFIG, METRICS, BASIS}, name
            continue
        # later rounds: no activations or basis again, only the masked gradients' C
        # coefficients in the task's basis
        assert set(msg.content.keys()) == {UPLOAD, CONFIG, METRICS, REFRESH}, name
        assert msg.content[UPLOAD]["acts"].numpy().size == 0, name
        refresh = {k: v.numpy() for k, v in msg.content[REFRESH].items()}
        assert set(refresh) == REFRESH_KEYS
        assert refresh["targets"].dtype == np.float32
        assert refresh["targets"].shape[1] == len(task.labels)
        ids = {row.tobytes() for row in refresh["ids"]}
        assert ids <= train_ids
        refreshed_by_round[rnd] = refreshed_by_round.get(rnd, 0) + len(ids)
    assert refreshed_by_round == {2: len(task.train), 3: len(task.train)}
    # down: not the network, only the server's masked outputs for the samples it holds
    for name, _, msg in wire_messages(refresh_run, "train", "down"):
        assert set(msg.content.keys()) == {"config", "held"}, name
        held = {k: v.numpy() for k, v in msg.content["held"].items()}
        if int(name[:4]) == 1:
            assert set(held) == {"ids"} and held["ids"].shape[0] == 0
        else:
            assert set(held) == {"ids", "side_ids", "side"}
            np.testing.assert_array_equal(held["side_ids"], held["ids"])  # one task: all held
            assert held["side"].shape == (held["ids"].shape[0], len(task.labels))
            assert held["side"].dtype == np.float32 and np.abs(held["side"]).max() > 0


def test_refresh_run_trains_and_reports(refresh_run):
    metrics = pd.read_parquet(refresh_run / "metrics.parquet")
    refreshed = metrics[metrics.metric == "refreshed_samples"].set_index("round")["value"]
    assert refreshed[1] == 24 and refreshed[2] == 24 and refreshed[3] == 24
    summary = json.loads((refresh_run / "summary.json").read_text())
    assert summary["cache"]["samples"] == 24  # activations still uploaded once
    assert summary["rejected_uploads"] == []
    assert 0.0 <= next(iter(summary["final_accuracy"].values())) <= 1.0
    # evaluate_every=2: round 2, and round 3 (the last round and the task's end); not round 1
    messages = pd.read_parquet(refresh_run / "messages.parquet")
    assert sorted(set(messages[messages.phase == "evaluate"]["round"])) == [2, 3]


def test_evaluate_every_needs_an_aligned_schedule():
    from flower_pae.config import ConfigError

    with pytest.raises(ConfigError, match="stagger_rounds"):
        RunConfig(evaluate_every=2, stagger_rounds=1)
    with pytest.raises(ConfigError, match="evaluate_every"):
        RunConfig(evaluate_every=0)


# ---- the strategy rejects refresh records that break the protocol ------------------------
def _strategy(tmp_path, refresh_step=4.0):
    from flower_pae.runlog import RunRecorder
    from flower_pae.server.cache import ActivationCache
    from strategies.pae import PAEStrategy

    def make(layers, hidden):
        net = LadderSideNetwork(layers, hidden, OAAdapterConfig(r_max=2), out_rank=2)
        return net

    return PAEStrategy(
        make,
        TrainerConfig(epochs=1),
        ActivationCache(tmp_path / "spill"),
        RunRecorder(tmp_path / "run", RunConfig().to_dict()),
        refresh_step=refresh_step,
    )


def _reply(node: int, ids: list[bytes], acts: int, refresh: dict | None, values=None):
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    from flower_pae.wire import array_record, ids_to_array

    d, layers = 8, 2
    content = RecordDict(
        {
            UPLOAD: array_record(
                {
                    "ids": ids_to_array(ids[:acts]),
                    "acts": np.ones((acts, layers, d), np.float16) if values is None else values,
                    "targets": np.ones((acts, d), np.float32),
                }
            ),
            CONFIG: ConfigRecord({"task_key": "0123456789abcdef"}),
        }
    )
    if acts:  # the task's label basis, with new samples: here the identity (C = d)
        content[BASIS] = array_record({"basis": np.eye(d, dtype=np.float32)})
    if refresh is not None:
        content[REFRESH] = array_record(refresh)
    # a reply as the server's grid hands it over: from ``node``
    meta = Metadata(1, "m", node, 0, "q", "", 0.0, 60.0, "train")
    return Message(content, metadata=meta)


def test_refresh_for_samples_a_device_never_uploaded_is_rejected(tmp_path):
    from flower_pae.wire import ids_to_array

    strategy = _strategy(tmp_path)
    ids = [bytes([i]) * 16 for i in range(4)]
    strategy.aggregate_train(1, [_reply(1, ids, 4, None)])
    assert strategy.cache.task_size("0123456789abcdef") == 4
    good = {"ids": ids_to_array(ids[:2]), "targets": np.zeros((2, 8), np.float32)}
    strategy.aggregate_train(2, [_reply(1, ids, 0, good)])
    assert strategy.rejected == []
    # node 2 never uploaded these samples
    strategy.aggregate_train(3, [_reply(2, ids, 0, good)])
    assert len(strategy.rejected) == 1 and "never uploaded" in strategy.rejected[0]["reason"]
    bad = {"ids": ids_to_array(ids[:2]), "targets": np.full((2, 8), np.nan, np.float32)}
    strategy.aggregate_train(4, [_reply(1, ids, 0, bad)])
    assert "NaN" in strategy.rejected[-1]["reason"]
    wrong = {"ids": ids_to_array(ids[:2]), "targets": np.zeros((2, 5), np.float32)}
    strategy.aggregate_train(5, [_reply(1, ids, 0, wrong)])
    assert "refresh targets" in strategy.rejected[-1]["reason"]


def test_refresh_outside_the_refresh_phase_is_rejected(tmp_path):
    from flower_pae.wire import ids_to_array

    strategy = _strategy(tmp_path, refresh_step=0.0)
    ids = [bytes([i]) * 16 for i in range(2)]
    strategy.aggregate_train(1, [_reply(1, ids, 2, None)])
    refresh = {"ids": ids_to_array(ids), "targets": np.zeros((2, 8), np.float32)}
    strategy.aggregate_train(2, [_reply(1, ids, 0, refresh)])
    assert "outside the refresh phase" in strategy.rejected[-1]["reason"]


def test_a_new_sample_steps_only_where_the_output_is_zero(tmp_path):
    """A new sample's gradient was computed against s = 0: the server uses it only where its
    output is exactly zero, and otherwise keeps the sample at its current output."""
    import copy

    rng = np.random.default_rng(0)
    strategy = _strategy(tmp_path)
    ids = [bytes([i]) * 16 for i in range(6)]
    acts = rng.standard_normal((6, 2, 8)).astype(np.float16)
    strategy.aggregate_train(1, [_reply(1, ids[:4], 4, None, acts[:4])])
    # round 1: no trained output yet, so targets are η·g exactly (the uploaded g are ones)
    _, targets, _ = strategy.training_data("0123456789abcdef")
    np.testing.assert_allclose(targets.numpy(), 4.0 * np.ones((4, 8)), rtol=1e-6)
    before = copy.deepcopy(strategy.net).eval()
    with torch.no_grad():
        expected = before(torch.from_numpy(acts[4:].astype(np.float32))).numpy()
    assert np.abs(expected).max() > 0  # the network learned something in round 1
    strategy.aggregate_train(2, [_reply(2, ids[4:], 2, None, acts[4:])])
    assert strategy.rejected == []
    got = {bytes(i): t for i, t in zip(ids[:6], strategy_targets(strategy), strict=True)}
    np.testing.assert_allclose(np.stack([got[i] for i in ids[4:]]), expected, atol=1e-6)


def strategy_targets(strategy) -> np.ndarray:
    _, targets, _ = strategy.training_data("0123456789abcdef")
    return targets.numpy()


def test_coefficients_in_the_label_basis_are_exact():
    """Targets and side outputs cross the wire as C coefficients in ``U = Q·orth(W_tᵀ)·P``:
    targets are rebuilt exactly, and a side output's coefficients give the same logits
    ``W_t·Qᵀ·s̃`` as the whole vector (its part off the span never reaches a prediction)."""
    from flower_pae.device.difference import label_basis, lift, residual
    from flower_pae.wire import from_coefficients, to_coefficients

    gen = torch.Generator().manual_seed(0)
    d, c, n = 32, 5, 7
    rows = torch.randn(c, d, generator=gen, dtype=torch.float64)
    secret = CohortSecret(b"k" * 32)
    q = secret.rotation(d)
    basis = label_basis(rows, q, secret.rotation(c, "task"))
    np.testing.assert_allclose((basis.T @ basis).numpy(), np.eye(c), atol=1e-12)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=gen)
    side = torch.randn(n, d, generator=gen, dtype=torch.float64)
    for target in (
        lift(rows, residual(logits, labels)),
        gradient_difference(logits, rows, labels, side),
    ):
        masked = target @ q.T
        coefficients = to_coefficients(masked.numpy(), basis.numpy())
        assert coefficients.shape == (n, c)
        rebuilt = from_coefficients(coefficients, basis.numpy())
        np.testing.assert_allclose(rebuilt, masked.numpy(), rtol=1e-5, atol=1e-6)
    masked_side = side @ q.T
    projected = from_coefficients(to_coefficients(masked_side.numpy(), basis.numpy()), basis)
    through_rows = torch.from_numpy(projected).double() @ q @ rows.T
    torch.testing.assert_close(through_rows, masked_side @ q @ rows.T, rtol=1e-5, atol=1e-5)
    # the gauge P is secret: another task name gives another basis of the same span
    other = label_basis(rows, q, secret.rotation(c, "another task"))
    assert not torch.allclose(other, basis, atol=1e-3)
    torch.testing.assert_close(other @ other.T, basis @ basis.T)
