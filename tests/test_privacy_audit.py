"""The privacy audit: the server's view rebuilt from the wire, the attacks, the report.

The attacks are checked on synthetic cases where the answer is known (labels plainly
recoverable, or not at all), and end to end on a small simulation with the tiny model.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flower_pae.config import ConfigError, RunConfig
from flower_pae.device.noise import add_target_noise
from flower_pae.privacy import attacks as A
from flower_pae.privacy.server_view import AuditError, load_server_view


# ---- the attacks on synthetic data ---------------------------------------------------------
def _synthetic(n=240, d=48, classes=4, seed=0):
    """Masked targets built exactly as devices build them, with a random secret rotation."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(classes, d))
    final = rng.normal(size=(n, d)) * 0.3
    labels = rng.integers(classes, size=n)
    cand = A.candidate_targets(final, rows)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    masked = cand[np.arange(n), labels] @ q.T
    return masked, cand, labels, q, rows


def test_labels_are_recovered_when_the_geometry_is_intact():
    masked, cand, labels, q, rows = _synthetic()
    rank, _ = A.signal_rank(masked)
    assert rank == 3  # C − 1: the server reads the number of classes off the spectrum
    attack = A.informed_label_attack(masked, cand)
    assert (attack.labels == labels).mean() > 0.98
    basis = A.target_subspace(rows)
    assert basis.shape == (48, 3)
    assert np.linalg.norm(attack.rotation @ basis - q @ basis) < 1e-6  # Q leaks on the subspace
    clusters = A.kmeans(A.project(masked, rank), rank + 1)
    assert A.best_permutation_accuracy(clusters, labels) > 0.8
    assert A.adjusted_rand_index(clusters, labels) > 0.5


def test_attacks_are_at_chance_on_random_targets():
    masked, cand, labels, _, _ = _synthetic(seed=1)
    rng = np.random.default_rng(2)
    noise = rng.normal(size=masked.shape)
    attack = A.informed_label_attack(noise, cand)
    assert (attack.labels == labels).mean() < 0.25 + 0.12
    clusters = A.kmeans(noise, 4)
    assert abs(A.adjusted_rand_index(clusters, labels)) < 0.05
    assert A.best_permutation_accuracy(clusters, labels) < 0.25 + 0.15


def test_strong_noise_hides_labels_and_weak_noise_does_not():
    masked, cand, labels, q, _ = _synthetic(seed=3)
    clear = torch.from_numpy(masked @ q)  # back to the device's lifted targets
    weak = add_target_noise(clear, 0.5, b"12345678").numpy() @ q.T
    strong = add_target_noise(clear, 50.0, b"12345678").numpy() @ q.T
    assert (A.informed_label_attack(weak, cand).labels == labels).mean() > 0.9
    assert (A.informed_label_attack(strong, cand).labels == labels).mean() < 0.25 + 0.12


def test_best_attack_checks_itself_and_falls_back_to_zero_shot():
    masked, cand, labels, q, rows = _synthetic(seed=4)
    final_prior = np.log(np.full((len(labels), 4), 0.25))
    rng = np.random.default_rng(5)
    guess = np.where(rng.random(len(labels)) < 0.6, labels, rng.integers(4, size=len(labels)))
    final_prior[np.arange(len(labels)), guess] += 0.5  # a zero-shot answer, right ~70%
    clear = torch.from_numpy(masked @ q)
    weak = add_target_noise(clear, 0.5, b"abcdefgh").numpy() @ q.T
    strong = add_target_noise(clear, 50.0, b"abcdefgh").numpy() @ q.T
    good = A.best_label_attack(weak, cand, final_prior)
    assert good.source == "targets" and good.halves_cosine > 0.5
    assert (good.labels == labels).mean() > 0.9
    bad = A.best_label_attack(strong, cand, final_prior)
    assert bad.source == "zero-shot" and abs(bad.halves_cosine) < 0.2
    assert np.array_equal(bad.labels, final_prior.argmax(1))


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(0)
    for shape in [(3, 3), (4, 4), (5, 5), (3, 5), (5, 3)]:
        cost = rng.integers(0, 20, size=shape).astype(float)
        rows, cols = A.linear_sum_assignment(cost)
        assert len(rows) == min(shape) and len(set(cols)) == len(cols)
        small, big = min(shape), max(shape)
        best = min(
            sum(cost[r, c] if shape[0] <= shape[1] else cost[c, r] for r, c in enumerate(perm))
            for perm in itertools.permutations(range(big), small)
        )
        assert cost[rows, cols].sum() == best


def test_clustering_scores():
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert A.adjusted_rand_index(labels, labels) == pytest.approx(1.0)
    assert A.adjusted_rand_index((labels + 1) % 3, labels) == pytest.approx(1.0)
    assert A.best_permutation_accuracy((labels + 1) % 3, labels) == 1.0
    assert A.purity(np.zeros(6, int), labels) == pytest.approx(1 / 3)
    named = A.name_clusters_with_known(
        (labels + 1) % 3, np.eye(6), np.array([0, 2, 4]), labels[[0, 2, 4]]
    )
    assert (named == labels).all()


def test_candidate_matching():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(40, 8))
    assert A.match_candidates(pool[:10] + 1e-6, pool, np.arange(10), 40) == 1.0
    blind = A.match_candidates(rng.normal(size=(200, 8)) * 10, pool, np.arange(200) % 40, 10)
    assert blind < 0.25
    with pytest.raises(ValueError, match="pool_size"):
        A.match_candidates(pool[:2], pool, np.arange(2), 41)


def test_target_noise_setting():
    t = torch.randn(16, 32, dtype=torch.float64)
    assert add_target_noise(t, 0.0, b"x" * 8) is t
    noisy = add_target_noise(t, 2.0, b"abcdefgh")
    rms = t.pow(2).sum(1).mean().sqrt()
    assert (noisy - t).pow(2).sum(1).mean().sqrt() / rms == pytest.approx(2.0, rel=0.15)
    assert torch.equal(noisy, add_target_noise(t, 2.0, b"abcdefgh"))  # seeded: reproducible
    assert not torch.equal(noisy, add_target_noise(t, 2.0, b"abcdefgi"))
    assert RunConfig.load(None, ["target_noise=0.5"]).target_noise == 0.5
    with pytest.raises(ConfigError, match="target_noise"):
        RunConfig.load(None, ["target_noise=-1"])


def test_attack_code_does_not_import_the_devices_secret():
    """The privacy boundary is visible in the imports: the attacker's modules never load it."""
    code = (
        "import sys\n"
        "import flower_pae.privacy.server_view, flower_pae.privacy.attacks\n"
        "import flower_pae.privacy.public_model\n"
        "bad = {'flower_pae.device.secret', 'flower_pae.device.difference'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- end to end on a small simulation ------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(small_run) -> Path:
    return small_run(
        "audit-run",
        stream="pypi:bbc",
        num_devices=2,
        max_train=40,
        max_test=10,
        rounds_per_task=2,
        server_epochs=1,
        record_wire=True,
    )


def test_server_view_is_exactly_the_cache(run_dir):
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from flower_pae.server.cache import ActivationCache
    from flower_pae.wire import BASIS, CONFIG, UPLOAD, from_coefficients

    view = load_server_view(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert view.num_samples == summary["cache"]["samples"] == 40
    messages = pd.read_parquet(run_dir / "messages.parquet")
    up = messages[(messages.phase == "train") & (messages.direction == "up")]
    assert {k: t.num_samples for k, t in view.tasks.items()} == (
        up.groupby("task_key")["num_samples"].sum().to_dict()
    )
    # the server's own cache, fed the same uploads (targets decoded from the task's basis as
    # the strategy decodes them), holds the same arrays
    cache = ActivationCache(spill_dir=run_dir / "spill-test")
    dumps = sorted((run_dir / "wire").glob("*-train-up-*.pb"), key=lambda p: p.stem[-6:])
    bases = {}
    for path in dumps:
        msg = message_from_proto(ProtoMessage.FromString(path.read_bytes()))
        key = str(msg.content[CONFIG]["task_key"])
        if BASIS in msg.content:
            bases.setdefault(key, msg.content[BASIS]["basis"].numpy())
        arrays = {k: v.numpy() for k, v in msg.content[UPLOAD].items()}
        if len(arrays["ids"]):
            arrays["targets"] = from_coefficients(arrays["targets"], bases[key])
            cache.add(key, arrays)
    for key, tv in view.tasks.items():
        acts, targets = cache.training_data(key)
        assert np.array_equal(tv.acts, acts.numpy())
        assert np.array_equal(tv.targets, targets.numpy())
        assert [bytes(i) for i in tv.ids] == cache.task_ids(key)
        assert set(tv.nodes.tolist()) <= set(up.node_id.tolist())


def test_audit_writes_its_report_and_finds_the_labels(run_dir, tmp_path, capsys):
    from simulations.cli import main

    out = tmp_path / "audit"
    args = ["audit", str(run_dir), "--out", str(out), "--content-samples", "10"]
    assert main([*args, "--pool-sizes", "5,20"]) == 0
    for name in ("report.md", "audit.json", "label_inference.png", "geometry.png", "content.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    result = json.loads((out / "audit.json").read_text())["runs"][0]
    (task,) = result["tasks"].values()
    assert task["task"] == "bbc" and task["samples"] == 40
    assert task["classes_estimate"] == task["classes"] == 5
    # on the real wire data, with the label words, the masked targets give the labels away
    assert task["targets_informed"] > 0.9
    assert task["rotation_error_on_task_subspace"] < 1e-2
    assert task["content"]["all_layers_top1_pool20"] > 0.9
    report = (out / "report.md").read_text()
    assert "Label inference" in report and "Content leakage" in report
    assert "shortcut `pivot`" in report and "uploaded pivot states" in report
    assert "report.md" in capsys.readouterr().out


def test_tradeoff_over_several_runs(run_dir, tmp_path):
    from flower_pae.privacy.report import run_audit

    noisy = tmp_path / "noisy"
    shutil.copytree(run_dir, noisy)
    config = json.loads((noisy / "config.json").read_text())
    config["settings"]["target_noise"] = 1.0  # only the label on the axis: same uploads
    (noisy / "config.json").write_text(json.dumps(config))
    result = run_audit([run_dir, noisy], tmp_path / "out", content=False)
    assert [r["target_noise"] for r in result["runs"]] == [0.0, 1.0]
    assert (tmp_path / "out" / "tradeoff.png").is_file()
    assert "privacy against accuracy" in (tmp_path / "out" / "report.md").read_text()


def test_run_without_wire_dumps_is_refused(run_dir, tmp_path, capsys):
    from simulations.cli import main

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "summary.json", "messages.parquet"):
        shutil.copy(run_dir / name, bare / name)
    with pytest.raises(AuditError, match="record_wire=true"):
        load_server_view(bare)
    assert main(["audit", str(bare), "--out", str(tmp_path / "o")]) == 1
    assert "record_wire=true" in capsys.readouterr().err
