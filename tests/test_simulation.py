"""A small Flower simulation (tiny model, 4 devices, 2 tasks), inspected from its run directory.

The privacy tests read the messages exactly as Flower serialized them (``record_wire``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flower_pae.config import RunConfig
from flower_pae.data import load_task, partition, resolve_stream
from flower_pae.device.secret import SECRET_ENV, CohortSecret
from flower_pae.wire import BASIS, CONFIG, METRICS, UPLOAD, UPLOAD_KEYS_FP16
from tests.run_contract import assert_recorded_bytes, assert_run_directory, wire_messages

STREAM = "pypi:bbc,pypi:rotten_tomatoes"


@pytest.fixture(scope="module")
def run_dir(small_run) -> Path:
    return small_run(
        "run",
        stream=STREAM,
        num_devices=4,
        max_train=32,
        max_test=16,
        rounds_per_task=2,
        server_epochs=2,
        record_wire=True,
    )


def _tasks():
    return [load_task(s, seed=0, max_train=32, max_test=16) for s in resolve_stream(STREAM)]


def test_run_directory_follows_the_contract(run_dir):
    assert_run_directory(run_dir, num_tasks=2, num_devices=4)
    # every message on the wire is one row: compare with the dumped messages
    messages = pd.read_parquet(run_dir / "messages.parquet")
    assert len(messages) == len(list((run_dir / "wire").glob("*.pb")))
    settings = json.loads((run_dir / "config.json").read_text())["settings"]
    assert settings["stream"] == STREAM and settings["num_devices"] == 4
    names = json.loads((run_dir / "tasks.json").read_text())
    assert sorted(names.values()) == ["bbc", "rotten_tomatoes"]


def test_device_uploads_carry_no_text_labels_logits_or_test_samples(run_dir):
    secret = CohortSecret.from_hex(os.environ[SECRET_ENV])
    tasks = _tasks()
    forbidden = [lbl.encode() for t in tasks for lbl in t.labels if len(lbl) >= 5]
    forbidden += [ex.text[:24].encode() for t in tasks for ex in t.train + t.test]
    train_ids = {secret.sample_id(t.name, ex.text) for t in tasks for ex in t.train}
    test_ids = {secret.sample_id(t.name, ex.text) for t in tasks for ex in t.test}
    uploaded = 0
    for name, raw, msg in wire_messages(run_dir, "train", "up"):
        for needle in forbidden:
            assert needle not in raw, f"{name} contains {needle!r}"
        upload = {k: v.numpy() for k, v in msg.content[UPLOAD].items()}
        assert set(upload) == UPLOAD_KEYS_FP16
        n = upload["ids"].shape[0]
        # the task's masked label basis comes with new samples only
        records = {UPLOAD, CONFIG, METRICS} | ({BASIS} if n else set())
        assert set(msg.content.keys()) == records, name
        assert upload["ids"].dtype == np.uint8 and upload["ids"].shape == (n, 16)
        assert upload["acts"].dtype == np.float16 and upload["acts"].ndim == 3
        # the only per-sample target: coefficients of a masked vector in that basis (no
        # label index; test_masked_targets_are_not_clear_residuals checks they are no residual)
        assert upload["targets"].dtype == np.float32 and upload["targets"].shape[0] == n
        if n:
            basis = msg.content[BASIS]["basis"].numpy()
            assert basis.shape == (upload["acts"].shape[2], upload["targets"].shape[1])
        ids = {row.tobytes() for row in upload["ids"]}
        assert ids <= train_ids and not ids & test_ids, name
        uploaded += n
        config = dict(msg.content[CONFIG])
        assert list(config) == ["task_key"] and re.fullmatch(r"[0-9a-f]{16}", config["task_key"])
        assert set(msg.content[METRICS]) == {
            "num-examples",
            "forward_seconds",
            "peak_rss_mb",
            "flops",
        }
    assert uploaded == sum(len(t.train) for t in tasks)


def test_evaluation_replies_carry_only_counts(run_dir):
    pattern = re.compile(r"[0-9a-f]{16}/(upcoming_)?(correct|zero_shot_correct|total)")
    replies = list(wire_messages(run_dir, "evaluate", "up"))
    assert replies
    for name, _, msg in replies:
        assert set(msg.content.keys()) == {METRICS}, name
        keys = set(msg.content[METRICS]) - {"num-examples"}
        assert keys and all(pattern.fullmatch(k) for k in keys), keys
        assert all(float(v).is_integer() for v in msg.content[METRICS].values())


def test_masked_targets_are_not_clear_residuals(run_dir):
    """The targets the server sees are rotated: decoding needs the devices' secret Q.

    On the wire they are C coefficients in the task's masked label basis ``U``; the server's
    vectors ``U·c`` are the device's masked lifted residuals ``Q·pinv(W_t)·r``, exactly.
    """
    import torch

    from flower_pae.backbone import load_backbone
    from flower_pae.device.device import Device
    from flower_pae.device.difference import lift, mask, residual

    secret = CohortSecret.from_hex(os.environ[SECRET_ENV])
    name, _, msg = next(wire_messages(run_dir, "train", "up"))
    coefficients = msg.content[UPLOAD]["targets"].numpy()
    basis = msg.content[BASIS]["basis"].numpy().astype(np.float64)
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-5)
    targets = torch.from_numpy(coefficients @ basis.T)
    q = secret.rotation(targets.shape[1])
    clear = targets @ q
    assert not torch.allclose(clear, targets, atol=1e-3)
    # the rotation preserves norms, so nothing is lost for training
    assert torch.allclose(clear.norm(dim=1), targets.norm(dim=1), rtol=1e-5)
    # the decoded vectors are exactly what the device computed (up to float32)
    settings = json.loads((run_dir / "config.json").read_text())["settings"]
    device = Device(RunConfig.from_dict(settings), 0, secret)
    task = device.task(0)
    backbone = load_backbone(settings["model"])
    ids = [row.tobytes() for row in msg.content[UPLOAD]["ids"].numpy()]
    by_id = {secret.sample_id(task.name, ex.text): ex for ex in task.train}
    examples = [by_id[i] for i in ids]
    feats = device.features(task, [ex.text for ex in examples])
    labels = torch.tensor([ex.label for ex in examples])
    expected = mask(lift(feats.rows, residual(feats.logits, labels)), q)
    assert backbone.hidden_size == targets.shape[1]
    torch.testing.assert_close(targets.float(), expected, atol=1e-5, rtol=1e-4)
    # and C coefficients are neither the residuals nor the label logits themselves
    assert coefficients.shape[1] == len(task.labels)
    r = residual(feats.logits, labels).numpy()
    assert not np.allclose(coefficients, r, atol=1e-2), name
    assert not np.allclose(coefficients, feats.logits.numpy(), atol=1e-2), name


def test_cached_samples_are_never_uploaded_again(run_dir):
    messages = pd.read_parquet(run_dir / "messages.parquet")
    up = messages[(messages.phase == "train") & (messages.direction == "up")]
    per_round = up.groupby("round")["num_samples"].sum()
    # rounds 1 and 3 open a task (all its samples come up), rounds 2 and 4 repeat it
    assert per_round[1] > 0 and per_round[3] > 0
    assert per_round[2] == 0 and per_round[4] == 0
    for name, _, msg in wire_messages(run_dir, "train", "up"):
        if name.startswith(("0002-", "0004-")):
            assert msg.content[UPLOAD]["acts"].numpy().size == 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["cache"]["samples"] == sum(len(t.train) for t in _tasks())


def test_every_task_gets_its_own_subspace_and_is_evaluated(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    tasks = {row["task"] for row in summary["rank_report"]}
    assert tasks == set(summary["task_keys"])
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    acc = metrics[(metrics.metric == "accuracy") & metrics.node_id.isna()]
    # task 1 is evaluated from round 1, task 2 only once devices have met it (round 3)
    first, second = summary["task_keys"]
    assert sorted(acc[acc.task == first]["round"]) == [1, 2, 3, 4]
    assert sorted(acc[acc.task == second]["round"]) == [3, 4]
    assert acc["value"].between(0, 1).all()


def test_partition_is_what_devices_used(run_dir):
    """Each device uploaded exactly its own shard of the first task."""
    messages = pd.read_parquet(run_dir / "messages.parquet")
    up = messages[
        (messages.phase == "train") & (messages.direction == "up") & (messages["round"] == 1)
    ]
    task = _tasks()[0]
    shards = partition([ex.label for ex in task.train], 4, seed=0)
    assert sorted(up["num_samples"]) == sorted(len(s) for s in shards)


def test_recorded_bytes_are_the_serialized_messages(run_dir):
    """payload_bytes is what Flower serializes for each message, re-measured from the dumps."""
    assert_recorded_bytes(run_dir)


def test_analysis_reads_the_run(run_dir):
    from analysis import bytes_table, load_run, upload_bytes_per_sample

    run = load_run(run_dir)
    messages = pd.read_parquet(run_dir / "messages.parquet")
    assert bytes_table(run)["bytes"].sum() == messages["payload_bytes"].sum()
    up = messages[(messages.phase == "train") & (messages.direction == "up")]
    assert upload_bytes_per_sample(run) == up.payload_bytes.sum() / up.num_samples.sum()
    per_node = run.metrics.dropna(subset=["node_id"])
    assert set(per_node["node_id"]) <= set(run.messages["node_id"])
    assert sorted(run.task_names.values()) == ["bbc", "rotten_tomatoes"]


def test_call_latency_pairs_each_request_with_its_reply(run_dir):
    """Every answered call gets one latency row from the two messages' Flower timestamps, and
    the timeline is the protocol's: no round's upload request is built before the last
    round's uploads came in, nor a round's evaluation before its uploads (the next round's
    uploads may go out while the server trains: ``tests/test_overlap.py``)."""
    from analysis import call_latency, load_run

    run = load_run(run_dir)
    latency = call_latency(run)
    replies = run.messages[run.messages["direction"] == "up"]
    assert len(latency) == len(replies)
    assert (latency["seconds"] > 0).all()
    first_request = latency.groupby(["round", "phase"])["request_at"].min()
    last_reply = latency.groupby(["round", "phase"])["reply_at"].max()
    rounds = sorted(latency["round"].unique())
    for r in rounds:
        assert first_request[(r, "evaluate")] >= last_reply[(r, "train")]
        if r + 1 in rounds:
            assert first_request[(r + 1, "train")] >= last_reply[(r, "train")]


def test_report_builds_from_the_run_and_its_tables_match_the_dataframes(run_dir, tmp_path):
    from analysis import bytes_table, load_run, overview, per_device_bytes, write_report

    run = load_run(run_dir)
    path = write_report([run], tmp_path / "report", target=0.0)
    text = path.read_text()
    for png in ("accuracy_vs_bytes.png", "run0_traffic.png", "run0_devices.png", "run0_matrix.png"):
        assert (tmp_path / "report" / png).stat().st_size > 0 and f"]({png})" in text
    table = pd.read_csv(tmp_path / "report" / "overview.csv", index_col="run")
    expected = overview([run])
    assert int(table.loc[run.name, "bytes_total"]) == run.messages["payload_bytes"].sum()
    assert int(table.loc[run.name, "bytes_up"]) == expected.loc[run.name, "bytes_up"]
    assert f"{int(expected.loc[run.name, 'bytes_total'])}" in text.replace(",", "")
    by_phase = pd.read_csv(tmp_path / "report" / "run0_bytes.csv", index_col=0)
    assert by_phase["bytes"].sum() == bytes_table(run)["bytes"].sum()
    devices = pd.read_csv(tmp_path / "report" / "run0_devices.csv", index_col=0)
    assert devices.loc["total", "count"] == len(per_device_bytes(run))
    reach = pd.read_csv(tmp_path / "report" / "bytes_to_reach.csv", index_col="run")
    # target 0: reached at the first evaluated round, after that round's traffic
    first = run.messages[run.messages["round"] == 1]["payload_bytes"].sum()
    assert reach.loc[run.name, "round"] == 1 and reach.loc[run.name, "bytes"] == first
    # the command writes the same report
    from simulations.cli import main

    assert main(["report", str(run_dir), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.md").is_file()
