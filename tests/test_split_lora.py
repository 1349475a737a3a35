"""The split-learning baseline: the two halves give the full model's pivot states, a small
simulation (tiny model, 3 devices, 2 rounds) meets the run-directory contract, and bad
settings and bad uploads are refused with clear messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from flower_pae.config import ConfigError, RunConfig
from flower_pae.references import _decoder, _load_fresh, _pivot_states
from flower_pae.server.validation import UploadError
from strategies.split_lora import CONFIG, LOGITS, METRICS, SCORES, STATES, decode_upload
from tests.run_contract import (
    DEVICES,
    ROUNDS,
    STREAM,
    assert_analysis_reads,
    assert_forward_flops,
    assert_recorded_bytes,
    assert_run_directory,
    round_messages,
    states_reply,
)

METHOD = "split_lora"  # the small run of conftest's baseline_cfg and baseline_run
PROMPTS = [
    "Classify this news article. Answer:",
    "Hi. Answer:",
    "A much longer prompt, so that the batch needs left padding for the short ones. Answer:",
]


# ---- the split -------------------------------------------------------------------------------


def _split_check(model_dir: Path, split_layer: int, label_words: list[str]) -> None:
    from flower_pae.baselines.split_lora import DeviceHalf, ServerHalf, _positions, unpack_states

    model, tokenizer = _load_fresh(str(model_dir))
    device = DeviceHalf(str(model_dir), split_layer)
    server = ServerHalf(str(model_dir), split_layer, r=8, lr=1e-3, seed=0)  # LoRA B = 0
    rows = server.rows(label_words)
    with torch.inference_mode():
        full = _pivot_states(_decoder(model), tokenizer, PROMPTS)
        # float32 states straight from the device's half: the same numbers as a full forward
        enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        mask = enc["attention_mask"]
        states = device.decoder(
            input_ids=enc["input_ids"],
            attention_mask=mask,
            position_ids=_positions(mask),
            use_cache=False,
        ).last_hidden_state
        assert mask.sum(-1).unique().numel() == len(PROMPTS)  # really padded
        split = server.pivot_states(states, mask)
        torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-5)
        # ... and through the wire: fp16 states without padding, re-padded by the server
        arrays, tokens = device.states(PROMPTS, batch_size=2)
        assert tokens == int(mask.sum()) == arrays["states"].shape[0]
        assert arrays["states"].dtype == np.float16
        wired = server.pivot_states(*unpack_states(arrays["states"], arrays["lengths"]))
    scale = full.abs().max()
    assert (wired - full).abs().max() < 2e-3 * scale  # fp16 rounding of the states only
    z_full, z_wired = full @ rows.T, wired @ rows.T
    assert (z_wired - z_full).abs().max() < 2e-3 * z_full.abs().max()
    assert torch.equal(z_wired.argmax(-1), z_full.argmax(-1))


def test_device_half_then_server_half_is_the_full_forward(tiny_model_dir):
    _split_check(tiny_model_dir, 1, ["business", "sport", "tech"])


def test_split_of_smollm2_in_the_middle_is_the_full_forward(smollm2_dir):
    _split_check(smollm2_dir, 15, ["World", "Sports", "Business", "Technology"])


def test_pack_and_unpack_keep_the_real_tokens():
    from flower_pae.baselines.split_lora import pack_states, unpack_states

    states = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    packed = pack_states(states, mask)
    assert packed["lengths"].tolist() == [2, 4] and packed["states"].shape == (6, 3)
    batch, back = unpack_states(packed["states"], packed["lengths"])
    assert torch.equal(back, mask)
    assert torch.equal(batch * mask[..., None], states * mask[..., None])
    one, m = unpack_states(packed["states"], packed["lengths"], [0])
    assert one.shape == (1, 2, 3) and torch.equal(one[0], states[0, 2:])
    assert m.tolist() == [[1, 1]]


def test_server_training_moves_the_logits(tiny_model_dir):
    from flower_pae.baselines.split_lora import DeviceHalf, ServerHalf, SplitUpload

    device = DeviceHalf(str(tiny_model_dir), 1)
    server = ServerHalf(str(tiny_model_dir), 1, r=8, lr=1e-2, seed=0)
    arrays, _ = device.states(PROMPTS, batch_size=8)
    arrays["labels"] = np.array([0, 1, 2])
    upload = SplitUpload("k", ["business", "sport", "tech"], arrays)
    before, _ = server.logits(upload, 8)
    loss, seconds, tokens = server.train([upload], epochs=3, batch_size=2, server_round=1)
    after, _ = server.logits(upload, 8)
    assert np.isfinite(loss) and seconds > 0 and tokens == 3 * int(arrays["lengths"].sum())
    assert not np.allclose(before, after)
    frozen, _ = server.logits(upload, 8, adapters=False)
    np.testing.assert_allclose(frozen, before, rtol=1e-5, atol=1e-5)  # B = 0 at the start


# ---- the simulation --------------------------------------------------------------------------


def test_run_directory_follows_the_contract(baseline_run):
    summary = assert_run_directory(baseline_run, num_tasks=1, num_devices=DEVICES)
    messages = pd.read_parquet(baseline_run / "messages.parquet")
    # train: request + states; evaluate: request + states, then logits + counts
    assert len(messages) == ROUNDS * DEVICES * 6
    assert messages["ok"].all()
    assert summary["method"] == "split_lora" and summary["split_layer"] == 1
    (key,) = summary["task_keys"]
    assert summary["accuracy_matrix"][0][0] == summary["final_accuracy"][key]
    assert set(summary["bytes"]) == {"train/down", "train/up", "evaluate/down", "evaluate/up"}
    assert sum(summary["bytes"].values()) == messages["payload_bytes"].sum()
    train_up = messages[(messages["phase"] == "train") & (messages["direction"] == "up")]
    assert train_up["num_samples"].sum() == ROUNDS * 24 and (train_up["task_key"] == key).all()
    assert json.loads((baseline_run / "tasks.json").read_text()) == {key: "bbc"}
    server = summary["server_cost"]
    assert server["train_seconds"] > 0 and server["eval_flops"] > 0
    assert server["train_tokens"] == summary["device_cost"]["train_tokens"]  # 1 epoch
    assert summary["adapter_params"] > 0


def test_recorded_bytes_are_the_serialized_messages(baseline_run):
    assert_recorded_bytes(baseline_run)


def test_the_wire_carries_states_labels_and_logits(baseline_run, baseline_cfg):
    from flower_pae.baselines.split_lora import device_half
    from flower_pae.device.device import Device

    hidden = 64
    words = list(Device(baseline_cfg, 0).task(0).labels)
    assert len(words) == 5
    for server_round in range(1, ROUNDS + 1):
        for msg in round_messages(baseline_run, server_round, "train", "down"):
            assert set(msg.content.keys()) == {CONFIG}  # no weights: the device half is frozen
        for msg in round_messages(baseline_run, server_round, "train", "up"):
            assert set(msg.content.keys()) == {STATES, METRICS, CONFIG}
            upload = decode_upload(msg, hidden, train=True)  # labels in clear
            tokens = int(msg.content[METRICS]["tokens"])
            assert upload.arrays["states"].shape == (tokens, hidden)
            assert upload.label_words == words
        downs = round_messages(baseline_run, server_round, "evaluate", "down")
        ups = round_messages(baseline_run, server_round, "evaluate", "up")
        assert {m.metadata.message_type for m in downs} == {"evaluate", SCORES}
        states = [m for m in ups if STATES in m.content]
        assert len(states) == DEVICES
        for msg in states:
            assert "labels" not in msg.content[STATES]  # test labels stay on the device
        scores = [m for m in downs if m.metadata.message_type == SCORES]
        for msg in scores:
            logits = msg.content[LOGITS]
            assert logits["logits"].numpy().shape[1] == len(words)
            assert ("zero_shot" in logits) == (server_round == 1)  # once per device and task
        counts = [m for m in ups if STATES not in m.content]
        for msg in counts:
            assert set(msg.content.keys()) == {METRICS}
            names = set(msg.content[METRICS]) - {"num-examples"}
            assert {n.rpartition("/")[2] for n in names} == {
                "correct",
                "zero_shot_correct",
                "total",
            }
    # the devices' FLOPs are the forward of their first split_layer layers
    params = device_half(baseline_cfg.model, baseline_cfg.split_layer).params
    assert params == 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128  # one tiny layer
    assert_forward_flops(baseline_run, params)


def test_analysis_reads_the_run(baseline_run):
    assert_analysis_reads(baseline_run, "split_lora")


# ---- settings and bad uploads ----------------------------------------------------------------


def test_split_layer_must_leave_a_layer_on_each_side(tiny_model_dir):
    with pytest.raises(ConfigError, match="split_layer must be > 0"):
        RunConfig(method="split_lora", stream=STREAM, model=str(tiny_model_dir), split_layer=0)
    with pytest.raises(ConfigError, match=r"has 2 decoder layers.*1 <= split_layer <= 1"):
        RunConfig(method="split_lora", stream=STREAM, model=str(tiny_model_dir), split_layer=2)
    RunConfig(method="split_lora", stream=STREAM, model=str(tiny_model_dir), split_layer=1)
    # other methods ignore it (but it must be positive)
    RunConfig(stream=STREAM, model=str(tiny_model_dir), split_layer=2)


def test_split_layer_is_checked_against_smollm2(smollm2_dir):
    with pytest.raises(ConfigError, match="has 30 decoder layers"):
        RunConfig(method="split_lora", stream=STREAM, split_layer=30)
    assert RunConfig(method="split_lora", stream=STREAM).split_layer == 15


def test_unknown_model_is_checked_on_load():
    from flower_pae.baselines.split_lora import _check_split

    class Cfg:
        num_hidden_layers, model_type = 4, "gemma"

    class Model:
        config = Cfg()

    with pytest.raises(ValueError, match="1 <= split_layer <= 3"):
        _check_split(Model(), 4)
    with pytest.raises(ValueError, match="'gemma'"):
        _check_split(Model(), 2)


def test_split_lora_trains_a_single_task_and_cannot_resume():
    from simulations.baseline_apps import baseline_apps

    with pytest.raises(ConfigError, match="'split_lora' trains a single task"):
        RunConfig(method="split_lora", stream="pypi:bbc,pypi:r8", split_layer=1, model="x")
    with pytest.raises(ConfigError, match="resume"):
        baseline_apps(RunConfig(method="split_lora", stream=STREAM, model="x", resume=True))


def test_bad_uploads_are_rejected():
    good = {
        "states": np.zeros((5, 4), np.float16),
        "lengths": np.array([2, 3], np.int32),
        "labels": np.array([0, 1], np.int64),
    }
    upload = decode_upload(states_reply(good), 4, train=True)
    assert upload.num_samples == 2 and upload.label_words == ["a", "b"]
    bad = [
        ({**good, "lengths": np.array([2, 2], np.int32)}, "add up"),
        ({**good, "states": np.zeros((5, 4), np.float32)}, "float16"),
        ({**good, "states": np.full((5, 4), np.inf, np.float16)}, "NaN or Inf"),
        ({**good, "labels": np.array([0, 2])}, "index the 2 label words"),
        ({k: v for k, v in good.items() if k != "labels"}, "exactly"),
        ({**good, "extra": np.zeros(1)}, "exactly"),
    ]
    for arrays, reason in bad:
        with pytest.raises(UploadError, match=reason):
            decode_upload(states_reply(arrays), 4, train=True)
    with pytest.raises(UploadError, match="label_words"):
        decode_upload(states_reply(good, words=("a",)), 4, train=True)
    with pytest.raises(UploadError, match="exactly"):
        decode_upload(states_reply(good), 4, train=False)  # evaluation carries no labels
    empty = Message(RecordDict({METRICS: MetricRecord({})}), metadata=states_reply(good).metadata)
    with pytest.raises(UploadError, match="records"):
        decode_upload(empty, 4, train=True)
