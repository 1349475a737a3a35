"""Reference baselines on a tiny random model: zero-shot, centralized LoRA, device step cost."""

from __future__ import annotations

import random

import pytest
import torch

from flower_pae.backbone import load_backbone
from flower_pae.data import Example, Task
from flower_pae.device.shortcut import pivot_features
from flower_pae.references import (
    _decoder,
    _pivot_states,
    device_step_cost,
    train_lora,
    zero_shot_accuracy,
)

_FILLER = ["on the table", "in the garden", "near the road", "by the river", "at home", "today"]


def _toy_task(n_train: int = 40, n_test: int = 20, seed: int = 0) -> Task:
    """Learnable: the first word decides the label ("apple ..." → fruit, "stone ..." → rock)."""
    rng = random.Random(seed)

    def rows(n: int) -> list[Example]:
        out = []
        for i in range(n):
            label = i % 2
            word = "apple" if label == 0 else "stone"
            out.append(Example(f"{word} {rng.choice(_FILLER)} {rng.choice(_FILLER)}", label))
        rng.shuffle(out)
        return out

    return Task(
        name="toy",
        labels=["fruit", "rock"],
        train=rows(n_train),
        test=rows(n_test),
        instruction="Is this about a fruit or a rock?",
    )


def test_zero_shot_accuracy_in_range_and_matches_decoder(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir))
    task = _toy_task()
    acc = zero_shot_accuracy(backbone, task, batch_size=8)
    assert 0.0 <= acc <= 1.0
    # The body-only pivot state used by train_lora is the device's final state h, and
    # h·W_tᵀ equals the model's own label-word logits.
    prompts = [task.prompt(ex.text) for ex in task.test[:5]]
    with torch.inference_mode():
        h = _pivot_states(_decoder(backbone.model), backbone.tokenizer, prompts)
        ref = pivot_features(backbone, prompts, [backbone.num_layers], batch_size=8).final
    torch.testing.assert_close(h, ref, atol=1e-5, rtol=1e-5)


def test_train_lora_learns_and_leaves_cached_backbone_alone(tiny_model_dir):
    name = str(tiny_model_dir)
    backbone = load_backbone(name)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    task = _toy_task()
    res = train_lora(
        name, task, lr=2e-2, epochs=4, batch_size=8, val_fraction=0.25, progress=False, seed=0
    )
    assert res.train_samples == 30 and res.val_samples == 10 and res.test_samples == 20
    assert len(res.val_accuracy) == 4 and len(res.train_loss) == 4
    assert res.val_accuracy_initial is not None
    assert res.val_accuracy[-1] > res.val_accuracy_initial
    assert res.val_accuracy[-1] >= 0.9
    assert res.train_loss[-1] < res.train_loss[0]
    assert 0.0 <= res.test_accuracy <= 1.0 and set(res.task_test_accuracy) == {"toy"}
    assert res.seconds_per_sample > 0 and res.peak_rss_mb > 0
    assert 0 < res.trainable_params < res.total_params
    # the cached frozen backbone is untouched
    after = backbone.model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not any("lora" in k for k in after)


def test_train_lora_on_several_tasks(tiny_model_dir):
    a = _toy_task(12, 6, seed=1)
    b = Task(
        "toy2",
        ["red", "blue", "green"],
        [Example(f"colour {i}", i % 3) for i in range(9)],
        [Example(f"colour {i}", i % 3) for i in range(6)],
        "Which colour?",
    )
    res = train_lora(str(tiny_model_dir), [a, b], epochs=1, val_fraction=0.0, progress=False)
    assert res.train_samples == 21 and res.val_samples == 0 and res.val_accuracy == []
    assert set(res.task_test_accuracy) == {"toy", "toy2"} and res.test_samples == 12


@pytest.mark.slow  # three child processes, each importing torch + transformers (~20 s)
def test_device_step_cost_positive(tiny_model_dir):
    task = _toy_task(16, 2)
    prompts = [task.prompt(ex.text) for ex in task.train]
    labels = [ex.label for ex in task.train]
    cost = device_step_cost(
        str(tiny_model_dir), prompts, labels=labels, label_words=task.labels, batch_size=8
    )
    assert cost.samples == 16
    for value in (
        cost.pae_seconds_per_sample,
        cost.lora_seconds_per_sample,
        cost.loaded_rss_mb,
        cost.pae_peak_rss_mb,
        cost.lora_peak_rss_mb,
        cost.time_ratio,
        cost.memory_ratio,
    ):
        assert value > 0
    assert cost.pae_peak_rss_mb >= cost.loaded_rss_mb * 0.9
    assert set(cost.children) == {"load", "pae", "lora"}
    assert cost.children["lora"]["trainable_params"] > 0
