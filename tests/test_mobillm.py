"""The MobiLLM baseline: the device's states are the backbone's, the untrained side network
is the zero-shot backbone, training lowers the loss, a small simulation (tiny model, 3
devices, 2 rounds) meets the run-directory contract with labels on the wire for training only,
and bad settings and bad uploads are refused with clear messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from flower_pae.backbone import load_backbone
from flower_pae.config import ConfigError, RunConfig
from flower_pae.server.validation import UploadError
from strategies.mobillm import CONFIG, LOGITS, METRICS, SCORES, STATES, decode_upload
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

METHOD = "mobillm"  # the small run of conftest's baseline_cfg and baseline_run
WORDS = ["business", "sport", "tech"]
PROMPTS = [
    "Classify this news article. Answer:",
    "Hi. Answer:",
    "A much longer prompt, so that the batch needs left padding for the short ones. Answer:",
    "Sports news: the team won the final. Answer:",
    "Shares fell sharply on the stock market today. Answer:",
    "A new phone chip was announced. Answer:",
]


def _upload(model_dir: Path, layers: str = "all", precision: str = "fp16", prompts=PROMPTS):
    from flower_pae.backbone import select_layers
    from flower_pae.baselines.mobillm import MobiLLMUpload, sequence_states

    backbone = load_backbone(str(model_dir))
    picked = select_layers(layers, backbone.num_layers)
    arrays, tokens = sequence_states(backbone, prompts, picked, batch_size=4, precision=precision)
    return MobiLLMUpload("k", list(WORDS), arrays, tokens=tokens), picked


# ---- the device's forward and the untrained side network -------------------------------------


def test_states_are_every_real_token_of_the_selected_layers(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir))
    upload, layers = _upload(tiny_model_dir)
    arrays = upload.arrays
    enc = backbone.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    assert mask.sum(-1).unique().numel() > 1  # really padded
    assert arrays["lengths"].tolist() == mask.sum(-1).tolist()
    assert arrays["states"].shape == (int(mask.sum()), len(layers), 64) == (upload.tokens, 2, 64)
    assert arrays["states"].dtype == np.float16 and arrays["final"].dtype == np.float32
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        out = backbone.model.get_decoder()(
            input_ids=enc["input_ids"],
            attention_mask=mask,
            position_ids=positions,
            output_hidden_states=True,
        )
    full = torch.stack([out.hidden_states[i] for i in layers], dim=2)[mask.bool()]
    np.testing.assert_allclose(arrays["states"], full.numpy(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(
        torch.from_numpy(arrays["final"]), out.last_hidden_state[:, -1], rtol=1e-5, atol=1e-5
    )


def _zero_shot_check(model_dir: Path, layers: str) -> None:
    from flower_pae.baselines.mobillm import SideServer
    from flower_pae.device.shortcut import label_rows
    from flower_pae.references import _decoder, _load_fresh, _pivot_states

    upload, picked = _upload(model_dir, layers)
    server = SideServer(str(model_dir), layers, lr=1e-3, seed=0)
    assert server.layers == picked
    zero = torch.zeros(len(PROMPTS), server.view.hidden_size)
    assert torch.equal(server.side_output(upload, 4), zero)  # up-projection starts at 0
    logits, tokens = server.logits(upload, batch_size=4)
    assert tokens == upload.tokens
    # exactly the device's own zero-shot logits W_t·h ...
    rows = label_rows(load_backbone(str(model_dir)), WORDS)
    assert np.array_equal(logits, (torch.from_numpy(upload.arrays["final"]) @ rows.T).numpy())
    # ... which are the full model's (the references' forward)
    model, tokenizer = _load_fresh(str(model_dir))
    with torch.inference_mode():
        full = _pivot_states(_decoder(model), tokenizer, PROMPTS) @ rows.T
    np.testing.assert_allclose(logits, full.numpy(), rtol=1e-5, atol=1e-5)


def test_untrained_side_network_gives_the_zero_shot_logits(tiny_model_dir):
    _zero_shot_check(tiny_model_dir, "all")


def test_untrained_side_network_of_smollm2_gives_the_zero_shot_logits(smollm2_dir):
    _zero_shot_check(smollm2_dir, "last:3")


def test_int8_states_decode_within_their_scale(tiny_model_dir):
    from flower_pae.baselines.mobillm import batch_states

    fp16, _ = _upload(tiny_model_dir)
    int8, _ = _upload(tiny_model_dir, precision="int8")
    assert int8.arrays["states"].dtype == np.int8
    assert int8.arrays["scales"].shape == int8.arrays["states"].shape[:2]
    assert int8.arrays["states"].nbytes * 2 == fp16.arrays["states"].nbytes
    rows = [(fp16.arrays, i) for i in range(len(PROMPTS))]
    a, mask, final = batch_states(rows)
    b, mask8, final8 = batch_states([(int8.arrays, i) for i in range(len(PROMPTS))])
    assert torch.equal(mask, mask8) and torch.equal(final, final8)
    scale = a.abs().amax(-1, keepdim=True)
    assert ((a - b).abs() <= scale / 127 + 1e-3).all()


def test_side_network_ignores_padding():
    from flower_pae.baselines.mobillm import SideNetwork

    net = SideNetwork(3, 16, seed=1)
    assert net.width == 2 and not net.up.weight.detach().any()  # d / 8, zero up
    torch.nn.init.normal_(net.up.weight)
    states = torch.randn(2, 7, 3, 16)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    states[0, :3] = 123.0  # padding holds garbage: it must not matter
    with torch.no_grad():
        both = net(states, mask)
        alone = net(states[:1, 3:], mask[:1, 3:])
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(both).all()
    # the pivot reads the tokens before it ...
    with torch.no_grad():
        changed = states.clone()
        changed[1, :4] += torch.randn(4, 3, 16)
        assert not torch.allclose(net(changed, mask)[1], both[1])
    # ... and nothing after it or at padding (a padded query sees itself only)
    allowed = ~SideNetwork(1, 16, width=4).attention_mask(torch.tensor([[0, 1, 1]]))
    assert allowed.shape == (4, 3, 3)  # one per head
    assert allowed[0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_training_lowers_the_loss(tiny_model_dir):
    from flower_pae.baselines.mobillm import SideServer

    upload, _ = _upload(tiny_model_dir)
    upload.arrays["labels"] = np.array([0, 1, 2, 1, 0, 2])
    server = SideServer(str(tiny_model_dir), "all", lr=1e-2, seed=0)
    batch = [(upload, i) for i in range(upload.num_samples)]
    with torch.no_grad():
        before = float(server._batch_loss(batch))
    before_logits, _ = server.logits(upload, 4)
    loss, seconds, tokens = server.train([upload], epochs=10, batch_size=3, server_round=1)
    with torch.no_grad():
        after = float(server._batch_loss(batch))
    assert np.isfinite(loss) and seconds > 0 and tokens == 10 * upload.tokens
    assert after < 0.5 * before
    after_logits, _ = server.logits(upload, 4)
    assert (after_logits.argmax(-1) == upload.arrays["labels"]).all()
    assert not np.allclose(before_logits, after_logits)
    assert server.train_flops(upload.tokens, 6) > 3 * server.forward_flops(upload.tokens, 6) - 1


# ---- the simulation --------------------------------------------------------------------------


def test_run_directory_follows_the_contract(baseline_run):
    summary = assert_run_directory(baseline_run, num_tasks=1, num_devices=DEVICES)
    messages = pd.read_parquet(baseline_run / "messages.parquet")
    # train: request + states; evaluate: request + states, then logits + counts
    assert len(messages) == ROUNDS * DEVICES * 6
    assert messages["ok"].all()
    assert summary["method"] == "mobillm" and summary["layers"] == [1, 2]
    assert summary["side_width"] == 8
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
    assert 0 <= summary["zero_shot_accuracy"][key] <= 1


def test_recorded_bytes_are_the_serialized_messages(baseline_run):
    assert_recorded_bytes(baseline_run)


def test_the_wire_carries_states_labels_for_training_only_and_logits(baseline_run, baseline_cfg):
    from flower_pae.baselines.mobillm import MobiLLMDevice

    hidden, layers = 64, 2
    words = list(MobiLLMDevice(baseline_cfg, 0).data.task(0).labels)
    assert len(words) == 5
    uploaded = []
    for server_round in range(1, ROUNDS + 1):
        for msg in round_messages(baseline_run, server_round, "train", "down"):
            assert set(msg.content.keys()) == {CONFIG}  # nothing but the round number
        for msg in round_messages(baseline_run, server_round, "train", "up"):
            assert set(msg.content.keys()) == {STATES, METRICS, CONFIG}
            assert set(msg.content[STATES]) == {"states", "lengths", "final", "labels"}
            upload = decode_upload(msg, layers, hidden, train=True)  # labels in clear
            tokens = int(msg.content[METRICS]["tokens"])
            assert upload.arrays["states"].shape == (tokens, layers, hidden)
            assert upload.label_words == words
            uploaded.append((server_round, msg.metadata.src_node_id, upload))
        downs = round_messages(baseline_run, server_round, "evaluate", "down")
        ups = round_messages(baseline_run, server_round, "evaluate", "up")
        assert {m.metadata.message_type for m in downs} == {"evaluate", SCORES}
        states = [m for m in ups if STATES in m.content]
        assert len(states) == DEVICES
        for msg in states:
            assert set(msg.content[STATES]) == {"states", "lengths", "final"}  # no test labels
            decode_upload(msg, layers, hidden, train=False)
        for msg in (m for m in downs if m.metadata.message_type == SCORES):
            assert set(msg.content[LOGITS]) == {"logits"}  # zero-shot is the device's own
            assert msg.content[LOGITS]["logits"].numpy().shape[1] == len(words)
        for msg in (m for m in ups if STATES not in m.content):
            assert set(msg.content.keys()) == {METRICS}
            names = set(msg.content[METRICS]) - {"num-examples"}
            assert {n.rpartition("/")[2] for n in names} == {
                "correct",
                "zero_shot_correct",
                "total",
            }
    # no cache: every round each device sends the same shard again, state for state
    first = {node: u for r, node, u in uploaded if r == 1}
    for _, node, upload in (x for x in uploaded if x[0] == 2):
        for name in ("states", "lengths", "labels"):
            assert np.array_equal(upload.arrays[name], first[node].arrays[name])
    # the devices' FLOPs are the forward of the whole decoder
    params = MobiLLMDevice(baseline_cfg, 0).params
    assert params == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # two tiny layers
    assert_forward_flops(baseline_run, params)


def test_analysis_reads_the_run(baseline_run):
    assert_analysis_reads(baseline_run, "mobillm")


# ---- settings and bad uploads ----------------------------------------------------------------


def test_layers_are_checked_against_the_model(tiny_model_dir):
    model = str(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"method 'mobillm'.*indices in 1\.\.2.*layers='3'"):
        RunConfig(method="mobillm", stream=STREAM, model=model, layers="3")
    with pytest.raises(ConfigError, match=r"last:0 needs 1 <= K <= 2"):
        RunConfig(method="mobillm", stream=STREAM, model=model, layers="last:0")
    with pytest.raises(ConfigError, match="mobillm"):
        RunConfig(method="mobillm", stream=STREAM, model=model, layers="first:2")
    assert RunConfig(method="mobillm", stream=STREAM, model=model, layers="2").layers == "2"


def test_mobillm_trains_a_single_task_and_cannot_resume():
    from simulations.baseline_apps import baseline_apps

    with pytest.raises(ConfigError, match="'mobillm' trains a single task"):
        RunConfig(method="mobillm", stream="pypi:bbc,pypi:r8", model="x")
    with pytest.raises(ConfigError, match="resume"):
        baseline_apps(RunConfig(method="mobillm", stream=STREAM, model="x", resume=True))


def test_bad_uploads_are_rejected():
    good = {
        "states": np.zeros((5, 3, 4), np.float16),
        "lengths": np.array([2, 3], np.int32),
        "final": np.zeros((2, 4), np.float32),
        "labels": np.array([0, 1], np.int64),
    }
    upload = decode_upload(states_reply(good), 3, 4, train=True)
    assert upload.num_samples == 2 and upload.label_words == ["a", "b"]
    int8 = {**good, "states": np.zeros((5, 3, 4), np.int8), "scales": np.ones((5, 3), np.float16)}
    assert decode_upload(states_reply(int8), 3, 4, train=True).num_samples == 2
    bad = [
        ({**good, "lengths": np.array([2, 2], np.int32)}, "add up"),
        ({**good, "states": np.zeros((5, 3, 4), np.float32)}, "float16"),
        ({**good, "states": np.zeros((5, 2, 4), np.float16)}, r"\(tokens, 3, 4\)"),
        ({**good, "states": np.full((5, 3, 4), np.inf, np.float16)}, "NaN or Inf"),
        ({**good, "final": np.zeros((2, 4), np.float16)}, "final must be float32"),
        ({**good, "final": np.full((2, 4), np.nan, np.float32)}, "final holds NaN"),
        ({**int8, "scales": np.zeros((5, 3), np.float16)}, "positive"),
        ({**int8, "scales": np.ones((5, 2), np.float16)}, "scales must be float16"),
        ({**good, "labels": np.array([0, 2])}, "index the 2 label words"),
        ({k: v for k, v in good.items() if k != "labels"}, "exactly"),
        ({k: v for k, v in good.items() if k != "final"}, "exactly"),
        ({**good, "extra": np.zeros(1)}, "exactly"),
    ]
    for arrays, reason in bad:
        with pytest.raises(UploadError, match=reason):
            decode_upload(states_reply(arrays), 3, 4, train=True)
    with pytest.raises(UploadError, match="label_words"):
        decode_upload(states_reply(good, words=("a",)), 3, 4, train=True)
    with pytest.raises(UploadError, match="exactly"):
        decode_upload(states_reply(good), 3, 4, train=False)  # evaluation carries no labels
    with pytest.raises(UploadError, match="over max_upload_mb"):
        decode_upload(states_reply(good), 3, 4, train=True, max_bytes=100)
    empty = Message(RecordDict({METRICS: MetricRecord({})}), metadata=states_reply(good).metadata)
    with pytest.raises(UploadError, match="records"):
        decode_upload(empty, 3, 4, train=True)
