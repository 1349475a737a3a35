"""The FedAvg + LoRA baseline: a small simulation (tiny model, 3 devices, 2 rounds) inspected from
its run directory and its dumped messages, and the aggregation on hand-made replies."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from flower_pae.config import ConfigError, RunConfig
from flower_pae.device.cost import forward_flops, lora_step_flops
from flower_pae.runlog import RunRecorder
from flower_pae.wire import array_record, message_bytes
from strategies.fedavg_lora import ADAPTER, CONFIG, METRICS, FedAvgLoRAStrategy
from tests.run_contract import DEVICES, ROUNDS, STREAM, assert_recorded_bytes, round_messages

METHOD = "fedavg_lora"  # the small run of conftest's baseline_cfg and baseline_run


def _adapter(msg: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content[ADAPTER].items()}


# ---- the simulation --------------------------------------------------------------------------


def test_run_directory_follows_the_contract(baseline_run):
    for name in ("messages.parquet", "metrics.parquet", "config.json", "summary.json"):
        assert (baseline_run / name).is_file(), name
    messages = pd.read_parquet(baseline_run / "messages.parquet")
    # every device trains and evaluates every round: one message each way per phase
    assert len(messages) == ROUNDS * DEVICES * 2 * 2
    assert set(messages["phase"]) == {"train", "evaluate"}
    assert set(messages["direction"]) == {"down", "up"}
    assert (messages["payload_bytes"] > 0).all() and messages["ok"].all()
    summary = json.loads((baseline_run / "summary.json").read_text())
    assert summary["method"] == "fedavg_lora" and summary["rounds"] == ROUNDS
    (key,) = summary["task_keys"]
    assert set(summary["final_accuracy"]) == {key}
    assert 0.0 <= summary["final_accuracy"][key] <= 1.0
    assert np.array(summary["accuracy_matrix"], dtype=float).shape == (1, 1)
    assert summary["accuracy_matrix"][0][0] == summary["final_accuracy"][key]
    assert set(summary["bytes"]) == {"train/down", "train/up", "evaluate/down", "evaluate/up"}
    assert sum(summary["bytes"].values()) == messages["payload_bytes"].sum()
    assert json.loads((baseline_run / "tasks.json").read_text()) == {key: "bbc"}
    settings = json.loads((baseline_run / "config.json").read_text())["settings"]
    assert settings["method"] == "fedavg_lora" and settings["lora_r"] == 8


def test_recorded_bytes_are_the_serialized_messages(baseline_run):
    assert_recorded_bytes(baseline_run)


def test_global_adapter_is_the_example_weighted_mean_of_the_devices(baseline_run):
    """What round 2 sends down is FedAvg of what the devices sent up in round 1."""
    ups = round_messages(baseline_run, 1, "train", "up")
    assert len(ups) == DEVICES
    weights = np.array([float(m.content[METRICS]["num-examples"]) for m in ups])
    assert weights.sum() == 24
    adapters = [_adapter(m) for m in ups]
    first = _adapter(round_messages(baseline_run, 1, "train", "down")[0])
    assert any(not np.allclose(adapters[0][k], first[k]) for k in first)  # devices trained
    sent = round_messages(baseline_run, 2, "train", "down")
    for msg in sent + round_messages(baseline_run, 1, "evaluate", "down"):
        got = _adapter(msg)
        for key in got:
            mean = sum(w * a[key] for w, a in zip(weights, adapters, strict=True)) / weights.sum()
            np.testing.assert_allclose(got[key], mean, rtol=1e-5, atol=1e-7)


def test_device_cost_metrics_are_recorded(baseline_run, baseline_cfg):
    from flower_pae.baselines.fedavg_lora import lora_model

    metrics = pd.read_parquet(baseline_run / "metrics.parquet")
    per_node = metrics[metrics["node_id"].notna()]
    for name in ("local_train_seconds", "seconds_per_sample", "peak_rss_mb", "tokens", "flops"):
        rows = per_node[per_node["metric"] == name]
        assert len(rows) == ROUNDS * DEVICES, name
        assert (rows["value"] > 0).all(), name
    model = lora_model(baseline_cfg)
    tokens = per_node[per_node["metric"] == "tokens"].set_index(["round", "node_id"])["value"]
    flops = per_node[per_node["metric"] == "flops"].set_index(["round", "node_id"])["value"]
    expected = tokens.map(lambda t: lora_step_flops(model.base_params, model.lora_params, int(t)))
    pd.testing.assert_series_equal(flops, expected, check_names=False)
    # a LoRA step costs more than twice the forward over the same tokens
    assert (flops > 2 * tokens.map(lambda t: forward_flops(model.base_params, int(t)))).all()
    evals = per_node[per_node["metric"].isin(["eval_seconds", "eval_flops"])]
    assert len(evals) == 2 * ROUNDS * DEVICES
    summary = json.loads((baseline_run / "summary.json").read_text())
    cost = summary["device_cost"]
    assert cost["train_flops"] == pytest.approx(flops.sum())
    assert cost["peak_rss_mb_max"] > 0


def test_replies_carry_adapters_counts_and_costs_only(baseline_run):
    for server_round in range(1, ROUNDS + 1):
        for msg in round_messages(baseline_run, server_round, "train", "up"):
            assert set(msg.content.keys()) == {ADAPTER, METRICS, CONFIG}
            assert list(msg.content[CONFIG]) == ["task_key"]
        for msg in round_messages(baseline_run, server_round, "evaluate", "up"):
            assert set(msg.content.keys()) == {METRICS}
            names = set(msg.content[METRICS]) - {"num-examples", "eval_seconds", "eval_flops"}
            assert {n.rpartition("/")[2] for n in names} == {
                "correct",
                "zero_shot_correct",
                "total",
            }


def test_analysis_reads_the_run(baseline_run):
    from analysis import bytes_table, device_cost, load_run, overview

    run = load_run(baseline_run)
    messages = pd.read_parquet(baseline_run / "messages.parquet")
    assert bytes_table(run)["bytes"].sum() == messages["payload_bytes"].sum()
    table = overview([run])
    assert table.loc[run.name, "method"] == "fedavg_lora"
    summary = json.loads((baseline_run / "summary.json").read_text())
    assert table.loc[run.name, "final_accuracy"] == pytest.approx(
        next(iter(summary["final_accuracy"].values()))
    )
    cost = device_cost(run).loc[run.name]
    assert cost["compute_seconds_total"] == pytest.approx(
        summary["device_cost"]["local_train_seconds"]
    )
    assert cost["flops_total"] == pytest.approx(summary["device_cost"]["train_flops"])
    assert cost["peak_rss_mb_max"] == pytest.approx(summary["device_cost"]["peak_rss_mb_max"])


# ---- the aggregation, on hand-made replies ---------------------------------------------------


def _reply(node: int, adapter: dict[str, np.ndarray], examples: int) -> Message:
    content = RecordDict(
        {
            ADAPTER: array_record(adapter),
            METRICS: MetricRecord({"num-examples": examples, "flops": 1.0}),
            CONFIG: ConfigRecord({"task_key": "0123456789abcdef"}),
        }
    )
    return Message(content, metadata=Metadata(1, "m", node, 0, "q", "", 0.0, 60.0, "train"))


def test_aggregate_is_the_example_weighted_mean(tmp_path):
    rng = np.random.default_rng(0)
    strategy = FedAvgLoRAStrategy(
        RunRecorder(tmp_path / "run", RunConfig().to_dict()), num_devices=3
    )
    adapters = [
        {"a.lora_A.weight": rng.normal(size=(4, 6)), "a.lora_B.weight": rng.normal(size=(6, 4))}
        for _ in range(3)
    ]
    adapters = [{k: v.astype(np.float32) for k, v in a.items()} for a in adapters]
    examples = [10, 30, 60]
    replies = [_reply(n + 1, a, e) for n, (a, e) in enumerate(zip(adapters, examples, strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    for key in adapters[0]:
        expected = sum(e * a[key] for e, a in zip(examples, adapters, strict=True)) / 100
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    # every reply is recorded, with its serialized size and its sample count
    frame = strategy.recorder.messages_frame()
    assert list(frame["num_samples"]) == examples
    assert list(frame["payload_bytes"]) == [message_bytes(r) for r in replies]
    assert strategy.tasks == {"0123456789abcdef": [1, 1]}


# ---- settings --------------------------------------------------------------------------------


def test_fedavg_lora_refuses_a_task_stream():
    with pytest.raises(ConfigError, match="single task"):
        RunConfig(method="fedavg_lora", stream="pypi:bbc,pypi:r8")
    with pytest.raises(ConfigError, match="lora_r"):
        RunConfig(method="fedavg_lora", stream="pypi:bbc", lora_r=0)
    RunConfig(method="fedavg_lora", stream="pypi:bbc")


def test_fedavg_lora_cannot_resume(tmp_path):
    from simulations.baseline_apps import baseline_apps

    cfg = RunConfig(method="fedavg_lora", stream="pypi:bbc", resume=True)
    with pytest.raises(ConfigError, match="resume"):
        baseline_apps(cfg)


def test_pae_device_reports_the_forward_flops_of_its_new_samples(tiny_model_dir):
    from flower_pae.device.cost import matmul_params
    from flower_pae.device.device import Device
    from flower_pae.device.secret import CohortSecret
    from flower_pae.device.shortcut import build_prompt

    cfg = RunConfig(model=str(tiny_model_dir), stream=STREAM, num_devices=2, max_train=8)
    device = Device(cfg, 0, CohortSecret.from_hex("ab" * 32))
    upload = device.upload(1, held=set())
    task = device.task(0)
    texts = [ex.text for ex in device._shard(0, "train")]
    prompts = [build_prompt(device.backbone, task, t, cfg.max_tokens) for t in texts]
    tokens = sum(len(device.backbone.tokenizer(p).input_ids) for p in prompts)
    params = matmul_params(device.backbone.model)
    # the tiny model: 2 layers of q, k, v, o (64×64, 2× 32×64 for k/v) and a 64→128 MLP
    assert params == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)
    assert upload.num_samples == len(texts) and upload.flops == forward_flops(params, tokens)
