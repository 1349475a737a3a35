"""The device side: shortcut features, label logits, differences and the secret."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flower_pae.backbone import load_backbone, select_layers
from flower_pae.device.difference import additive_prediction, lift, mask, residual, unmask
from flower_pae.device.secret import CohortSecret
from flower_pae.device.shortcut import label_rows, pivot_features, truncate_text

PROMPTS = ["Short one.\nAnswer:", "A much longer prompt that needs padding on the left.\nAnswer:"]


def _logits_at_pivot(backbone, prompt: str) -> torch.Tensor:
    enc = backbone.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        return backbone.model(**enc).logits[0, -1]


def _check_label_logits(backbone, labels, atol):
    feats = pivot_features(backbone, PROMPTS, select_layers("all", backbone.num_layers))
    rows = label_rows(backbone, labels)
    z = feats.final @ rows.T
    for i, prompt in enumerate(PROMPTS):
        logits = _logits_at_pivot(backbone, prompt)
        ids = [backbone.tokenizer(" " + w, add_special_tokens=False).input_ids for w in labels]
        expected = torch.stack([logits[t].mean() for t in ids])
        assert torch.allclose(z[i], expected, atol=atol), (z[i], expected)
    return feats


def test_shortcut_keeps_one_token_and_matches_the_model(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir))
    feats = _check_label_logits(backbone, ["World", "Sports", "very negative"], atol=1e-4)
    assert feats.acts.shape == (2, backbone.num_layers, backbone.hidden_size)
    # left padding must not change a prompt's features: compare with a batch of one
    alone = pivot_features(backbone, PROMPTS[:1], select_layers("all", backbone.num_layers))
    assert torch.allclose(alone.acts[0], feats.acts[0], atol=1e-4)


def test_the_mean_shortcut_averages_each_layer_over_the_prompts_tokens(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir))
    layers = select_layers("all", backbone.num_layers)
    mean = pivot_features(backbone, PROMPTS, layers, shortcut="mean")
    pivot = pivot_features(backbone, PROMPTS, layers)
    assert mean.acts.shape == pivot.acts.shape
    assert not torch.allclose(mean.acts, pivot.acts, atol=1e-3)
    assert torch.equal(mean.final, pivot.final)  # the label logits still come from the pivot
    for i, prompt in enumerate(PROMPTS):  # each prompt alone, unpadded, by hand
        enc = backbone.tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            states = backbone.model.get_decoder()(**enc, output_hidden_states=True).hidden_states
        expected = torch.stack([states[layer][0].mean(0) for layer in layers])
        assert torch.allclose(mean.acts[i], expected, atol=1e-4)
    with pytest.raises(ValueError, match="shortcut"):
        pivot_features(backbone, PROMPTS, layers, shortcut="max")


def test_without_the_shortcut_every_token_is_kept_and_the_server_reduces_it(tiny_model_dir):
    """The "no shortcut" ablation: a device's sequence upload holds each prompt's real tokens
    (as an unpadded forward gives them), and the server's reduction of it is what the shortcut
    keeps on the device; a bad sequence upload is refused."""
    from flower_pae.device.shortcut import sequence_features
    from flower_pae.server.validation import UploadError, summarize_sequence_upload
    from flower_pae.wire import decode_activations, encode_activations, ids_to_array

    backbone = load_backbone(str(tiny_model_dir))
    layers = select_layers("last:2", backbone.num_layers)
    seq = sequence_features(backbone, PROMPTS, layers)
    lengths = [len(backbone.tokenizer(p).input_ids) for p in PROMPTS]
    assert seq.lengths.tolist() == lengths and seq.states.shape[0] == sum(lengths)
    for i, prompt in enumerate(PROMPTS):  # each prompt alone, unpadded
        enc = backbone.tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            states = backbone.model.get_decoder()(**enc, output_hidden_states=True).hidden_states
        expected = torch.stack([states[layer][0] for layer in layers], dim=1)  # (T, L, d)
        start = sum(lengths[:i])
        assert torch.allclose(seq.states[start : start + lengths[i]], expected, atol=1e-4)
    for shortcut in ("pivot", "mean"):
        kept = pivot_features(backbone, PROMPTS, layers, shortcut=shortcut)
        assert torch.allclose(seq.summary(shortcut), kept.acts, atol=1e-5)
        upload = encode_activations(seq.states, "int8")
        upload.update(
            ids=ids_to_array([bytes(16), bytes([1]) * 16]),
            targets=np.zeros((2, 3), np.float32),
            lengths=seq.lengths.numpy(),
        )
        reduced = summarize_sequence_upload(upload, shortcut)
        assert set(reduced) == {"ids", "acts", "scales", "targets"}
        assert reduced["acts"].shape == (2, len(layers), backbone.hidden_size)
        step = kept.acts.abs().amax(-1, keepdim=True) / 127  # int8 twice: tokens, then kept
        assert ((decode_activations(reduced) - kept.acts).abs() <= 1.5 * step + 1e-6).all()
    with pytest.raises(UploadError, match="upload_sequence is off"):
        summarize_sequence_upload(upload, None)
    with pytest.raises(UploadError, match="add up"):
        summarize_sequence_upload({**upload, "lengths": seq.lengths.numpy() + 1}, "pivot")


def test_label_words_sharing_a_first_token_stay_distinct(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir))
    rows = label_rows(
        backbone, ["very negative", "negative", "neutral", "positive", "very positive"]
    )
    assert torch.cdist(rows, rows).add(torch.eye(5)).min() > 1e-3
    # every class can win: for each row, some hidden state ranks it first
    for c in range(5):
        sol = torch.linalg.lstsq(
            rows, 10 * torch.nn.functional.one_hot(torch.tensor(c), 5).float()
        ).solution
        assert (rows @ sol).argmax() == c


def test_truncation_keeps_the_pivot(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir))
    text = truncate_text(backbone, "word " * 500, 20)
    assert len(backbone.tokenizer(text, add_special_tokens=False).input_ids) <= 21


def test_layer_selection():
    assert select_layers("all", 4) == [1, 2, 3, 4]
    assert select_layers("last:2", 4) == [3, 4]
    assert select_layers("1, 3", 4) == [1, 3]
    with pytest.raises(ValueError, match="layers"):
        select_layers("0,5", 4)


def test_difference_lifts_back_to_the_residual_and_masks_exactly():
    torch.manual_seed(0)
    rows = torch.randn(4, 32)
    logits, labels = torch.randn(10, 4), torch.randint(0, 4, (10,))
    r = residual(logits, labels)
    assert torch.allclose(r.sum(-1), torch.zeros(10), atol=1e-6)
    t = lift(rows, r)
    assert torch.allclose(t @ rows.double().T, r.double(), atol=1e-8)
    q = CohortSecret(b"k" * 32).rotation(32)
    assert torch.allclose(q @ q.T, torch.eye(32, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(unmask(mask(t, q), q), t.float(), atol=1e-5)
    # adding the full residual through the label rows gives the true label
    pred = additive_prediction(logits, rows, t.float())
    assert torch.equal(pred, labels)


def test_secret_derivations_are_keyed():
    a, b = CohortSecret(b"a" * 32), CohortSecret(b"b" * 32)
    assert a.sample_id("agnews", "x") == a.sample_id("agnews", "x")
    assert a.sample_id("agnews", "x") != b.sample_id("agnews", "x")
    assert a.sample_id("agnews", "x") != a.sample_id("agnews", "y")
    assert a.task_key("agnews") != b.task_key("agnews")
    assert not torch.allclose(a.rotation(8), b.rotation(8))
    with pytest.raises(ValueError):
        CohortSecret(b"short")


@pytest.mark.slow
def test_real_smollm2_label_logits_equal_the_models(smollm2_dir):
    backbone = load_backbone("smollm2-135m-instruct")
    assert (backbone.num_layers, backbone.hidden_size) == (30, 576)
    _check_label_logits(backbone, ["World", "Sports", "Business"], atol=2e-4)


@pytest.mark.slow
def test_real_smollm2_simulation_with_four_devices(tmp_path, smollm2_dir):
    """The real backbone through Flower's simulation engine writes the run directory."""
    import json

    import pandas as pd

    from flower_pae.config import RunConfig
    from simulations.cli import simulate

    cfg = RunConfig(
        stream="pypi:bbc",
        num_devices=4,
        max_train=24,
        max_test=12,
        rounds_per_task=1,
        server_epochs=3,
        max_tokens=64,
    )
    summary = simulate(cfg, tmp_path / "run")
    messages = pd.read_parquet(tmp_path / "run" / "messages.parquet")
    assert messages.node_id.nunique() == 4
    up = messages[(messages.phase == "train") & (messages.direction == "up")]
    assert up.num_samples.sum() == 24
    # the shortcut: 30 layers × 576 × fp16 + a 576-float target, per sample
    assert up.payload_bytes.sum() / 24 < 30 * 576 * 2 + 576 * 4 + 2000
    (key,) = summary["task_keys"]
    assert 0.0 <= summary["final_accuracy"][key] <= 1.0
    assert json.loads((tmp_path / "run" / "tasks.json").read_text())[key] == "bbc"


def test_a_device_process_rebuilds_each_distinct_side_network_once():
    """Devices of one process that receive the same download share one rebuilt network; a
    download that differs in one weight is rebuilt, and each computes what the server's does.
    The network the process would evict is reused for a download of the same meta (new
    weights only), and not for one of another meta (a new task)."""
    from flower_pae.side_network import LadderSideNetwork
    from flower_pae.wire import side_network_records
    from simulations.client_app import _SIDE_NETWORKS, _side_network

    _SIDE_NETWORKS.clear()

    def download(net):
        matrices = {name for name, p in net.named_parameters() if p.ndim >= 2}
        return side_network_records(net.meta(), net.state_dict(), matrices, "fp32")

    net = LadderSideNetwork(3, 16, out_rank=4, seed=5)
    net.add_task("a")
    net.fit_standardizer(torch.randn(20, 3, 16))
    with torch.no_grad():
        net.task_sets[0].out.W2.normal_()
    first = _side_network(download(net))
    assert _side_network(download(net)) is first
    with torch.no_grad():
        net.task_sets[0].out.W2[0, 0] += 1.0
    second = _side_network(download(net))
    assert second is not first
    acts = torch.randn(7, 3, 16)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(second(acts), net(acts), rtol=0, atol=0)
        assert not torch.allclose(first(acts), net(acts))
        net.task_sets[0].out.W2[1, 1] -= 2.0
        net.task_sets[0].layers[1].g.mul_(0.5)
    third = _side_network(download(net))
    assert third is first  # the oldest, same meta: reloaded, not rebuilt
    assert _side_network(download(net)) is third
    with torch.no_grad():
        torch.testing.assert_close(third(acts), net(acts), rtol=0, atol=0)
        torch.testing.assert_close(third(acts), _rebuilt(download(net))(acts), rtol=0, atol=0)
    net.add_task("b")
    fourth = _side_network(download(net))
    assert fourth is not second and fourth.task_keys == ["a", "b"]
    with torch.no_grad():
        torch.testing.assert_close(fourth(acts), net(acts), rtol=0, atol=0)


def _rebuilt(content):
    from flower_pae.side_network import LadderSideNetwork
    from flower_pae.wire import side_network_from_records

    return LadderSideNetwork.from_state(*side_network_from_records(content))


def test_a_device_whose_store_is_warm_never_loads_the_backbone(
    tiny_model_dir, tmp_path, monkeypatch
):
    """With every prompt and backbone output in the activation store, a device (in a new
    process: nothing loaded, nothing cached) uploads and evaluates without loading the model's
    tokenizer or weights, and sends and computes exactly what the device that filled the store
    did. In a real new process, transformers is never imported."""
    import flower_pae.backbone as backbone_module
    import flower_pae.device.device as device_module
    from flower_pae.config import RunConfig
    from flower_pae.side_network import LadderSideNetwork

    monkeypatch.setenv("FLOWER_PAE_CACHE", str(tmp_path))
    stream = "pypi:bbc,pypi:rotten_tomatoes"  # evaluation reads the next task's rows too
    cfg = RunConfig(
        model=str(tiny_model_dir), stream=stream, num_devices=2, max_train=8, max_test=6
    )

    def new_process() -> None:
        monkeypatch.setattr(backbone_module, "_LOADED", {})
        for cached in ("_label_rows", "_label_basis", "_matmul_params"):
            getattr(device_module, cached).cache_clear()

    def run():
        new_process()
        device = device_module.Device(cfg, 1)
        upload = device.upload(1, set())
        net = LadderSideNetwork(device.backbone.num_layers, device.backbone.hidden_size, seed=3)
        net.add_task(upload.task_key)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(generator=torch.Generator().manual_seed(p.numel()))
        return device, upload, device.evaluate(1, net), net

    cold_device, cold, cold_eval, net = run()
    assert cold_device.backbone.model_loaded and cold.num_samples == 4
    warm_device, warm, warm_eval, _ = run()
    assert not warm_device.backbone.model_loaded and not warm_device.backbone.tokenizer_loaded
    assert warm_eval == cold_eval
    assert (warm.task_key, warm.flops, warm.forward_seconds) == (
        cold.task_key,
        cold.flops,
        cold.forward_seconds,
    )
    assert np.array_equal(warm.basis, cold.basis)
    assert warm.arrays.keys() == cold.arrays.keys()
    for name, value in cold.arrays.items():
        assert np.array_equal(warm.arrays[name], value), name
    torch.save(net.state_dict(), tmp_path / "net.pt")
    code = (
        "import sys, numpy as np, torch\n"
        "from flower_pae.config import RunConfig\n"
        "from flower_pae.device.device import Device\n"
        "from flower_pae.side_network import LadderSideNetwork\n"
        f"cfg = RunConfig(model={str(tiny_model_dir)!r}, stream={stream!r}, num_devices=2,"
        " max_train=8, max_test=6)\n"
        "device = Device(cfg, 1)\n"
        "np.save(sys.argv[1], device.upload(1, set()).arrays['targets'])\n"
        "net = LadderSideNetwork(device.backbone.num_layers, device.backbone.hidden_size)\n"
        f"net.add_task({warm.task_key!r})\n"
        "net.load_state_dict(torch.load(sys.argv[2]))\n"
        "print(repr(device.evaluate(1, net)))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'pandas'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "targets.npy"), str(tmp_path / "net.pt")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "FLOWER_PAE_CACHE": str(tmp_path)},
    )
    evaluation, modules = out.stdout.strip().splitlines()[-2:]
    assert modules == "[]" and evaluation == repr(cold_eval), out.stdout
    assert np.array_equal(np.load(tmp_path / "targets.npy"), cold.arrays["targets"])
    # the store is only a cache: without it, the device loads the weights and sends the same
    new_process()
    monkeypatch.setattr(cfg, "activation_store", False)
    device = device_module.Device(cfg, 1)
    assert np.array_equal(device.upload(1, set()).arrays["targets"], cold.arrays["targets"])
    assert device.backbone.model_loaded


def test_the_weights_load_off_the_clock_and_only_for_a_forward(tiny_model_dir, monkeypatch):
    """A backbone loaded without its weights loads them before a forward's clock starts (the
    store keeps each measured forward time for later runs), and not at all for no prompts."""
    import time

    import flower_pae.backbone as backbone_module

    load = backbone_module._load_model

    def slow_load(*args):
        time.sleep(1.0)
        return load(*args)

    monkeypatch.setattr(backbone_module, "_LOADED", {})
    monkeypatch.setattr(backbone_module, "_load_model", slow_load)
    backbone = load_backbone(str(tiny_model_dir), weights=False)
    layers = select_layers("all", backbone.num_layers)
    assert pivot_features(backbone, [], layers).acts.shape == (0, len(layers), 64)
    assert not backbone.model_loaded
    feats = pivot_features(backbone, PROMPTS, layers)
    assert backbone.model_loaded and feats.seconds < 1.0


def test_the_prompts_are_keyed_by_the_tokenizers_files(tiny_model_dir, tmp_path, monkeypatch):
    """Another tokenizer (here another chat template) at the same model path changes the
    fingerprint the store keys prompts by; a hub name has none (its prompts are not kept);
    a config that is no JSON object is a clear error."""
    import shutil

    import flower_pae.backbone as backbone_module

    monkeypatch.setattr(backbone_module, "_LOADED", {})
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = load_backbone(str(model), weights=False).tokenizer_fingerprint
    config = model / "tokenizer_config.json"
    config.write_text(config.read_text().replace("<|im_start|>", "<|im_start|> "))
    monkeypatch.setattr(backbone_module, "_LOADED", {})
    after = load_backbone(str(model), weights=False).tokenizer_fingerprint
    assert before and after and before != after
    hub = backbone_module.Backbone("org/name", config=object(), path="org/name")
    assert hub.tokenizer_fingerprint is None
    (model / "config.json").write_text("[1]")
    monkeypatch.setattr(backbone_module, "_LOADED", {})
    with pytest.raises(backbone_module.BackboneError, match="no JSON object"):
        load_backbone(str(model), weights=False)


def test_a_config_without_the_generic_names_asks_the_models_own(monkeypatch):
    """GPT-2's config says ``n_layer``; the generic config read at once does not know that
    alias, the model's own config does."""
    from types import SimpleNamespace

    import flower_pae.backbone as backbone_module

    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=3, hidden_size=8))
    monkeypatch.setattr(backbone_module, "_load_model", lambda name, path: model)
    config = SimpleNamespace(n_layer=3, n_embd=8)
    backbone = backbone_module.Backbone("gpt2-like", None, config=config, path="unused")
    assert (backbone.num_layers, backbone.hidden_size) == (3, 8)


def test_the_prompt_format_is_pinned_to_its_version(tiny_model_dir):
    """The activation store keeps each text's prompt under ``PROMPT_FORMAT``: a change to what
    ``build_prompt`` builds from the same input must come with a new ``PROMPT_FORMAT`` (then
    update what this test expects), or warm stores would hand out prompts of the old format."""
    from types import SimpleNamespace

    from flower_pae.device.shortcut import PROMPT_FORMAT, build_prompt

    backbone = load_backbone(str(tiny_model_dir), weights=False)
    task = SimpleNamespace(question=lambda text: f"Classify.\nText: {text}")
    texts = ["Short.", "A longer text, cut to eight tokens: its end never reaches the prompt."]
    head = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nClassify.\nText: "
    )
    tail = "<|im_end|>\n<|im_start|>assistant\nAnswer:"
    expected = [f"{head}Short.{tail}", f"{head}A longer text, cut to eight tokens{tail}"]
    assert PROMPT_FORMAT == "1"
    assert [build_prompt(backbone, task, text, 8) for text in texts] == expected
