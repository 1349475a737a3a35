"""The machine-wide activation store."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import torch

from flower_pae.backbone import load_backbone
from flower_pae.device.shortcut import pivot_features
from flower_pae.device.store import ActivationStore

PROMPTS = [f"Text number {i} about {'sports' if i % 2 else 'markets'}.\nAnswer:" for i in range(6)]


def test_store_returns_bit_identical_outputs(tmp_path, tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir))
    layers = [1, 2]

    def compute(prompts):
        f = pivot_features(backbone, prompts, layers, batch_size=8)
        return f.acts, f.final, f.seconds

    fresh_acts, fresh_final, _ = compute(PROMPTS)
    store = ActivationStore(tmp_path / "store")
    cold = store.features("tiny", layers, PROMPTS, compute)
    assert store.stats.misses == 6 and store.stats.hits == 0
    warm = store.features("tiny", layers, PROMPTS, compute)
    assert store.stats.hits == 6
    for acts, final, _ in (cold, warm):
        assert torch.equal(acts, fresh_acts) and torch.equal(final, fresh_final)
    assert warm[2] == cold[2] > 0  # the first measured forward time is still accounted
    # another layer selection or model is another key
    assert store.key("tiny", [1], PROMPTS[0]) != store.key("tiny", [1, 2], PROMPTS[0])
    # and another shortcut: the mean's entries never answer for the pivot's
    assert store.key("tiny", [1], PROMPTS[0], "mean") != store.key("tiny", [1], PROMPTS[0])
    assert store.key("tiny", [1], PROMPTS[0], "pivot") == store.key("tiny", [1], PROMPTS[0])


def _writer(root: str, seed: int) -> None:
    store = ActivationStore(root)
    for i in range(40):
        value = np.full((3, 4), float(i), dtype=np.float32)
        store.put(store.key("m", [1], f"p{i}"), {"acts": value, "seed": np.int64(seed)})


def test_concurrent_writers_do_not_corrupt(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = ActivationStore(tmp_path)
    for i in range(40):
        entry = store.get(store.key("m", [1], f"p{i}"))
        assert entry is not None and np.array_equal(entry["acts"], np.full((3, 4), float(i)))
    assert not list(tmp_path.glob("*/*.tmp"))


def test_cap_evicts_oldest(tmp_path):
    store = ActivationStore(tmp_path, max_bytes=10_000)
    for i in range(20):
        store.put(store.key("m", [1], str(i)), {"acts": np.zeros(500, np.float32)})
        store.enforce_cap()
    assert store.size_bytes() <= 10_000 and store.stats.evicted > 0
    assert store.get(store.key("m", [1], "19")) is not None
    # the model's own arrays, written before any prompt's entry, are never evicted
    store.model_arrays("m", "facts", lambda: {"params": np.int64(7)})
    for i in range(20, 40):
        store.put(store.key("m", [1], str(i)), {"acts": np.zeros(500, np.float32)})
        store.enforce_cap()
    assert store.model_arrays("m", "facts", lambda: {"params": np.int64(-1)})["params"] == 7


def test_model_arrays_are_computed_once_and_kept_apart_from_the_prompts(tmp_path):
    """A model's own arrays (label rows, its size) are computed once per store; a scale study
    counts only the prompts' entries as forwards."""
    from simulations.scale import store_entries

    store = ActivationStore(tmp_path / "store")
    calls = []

    def rows():
        calls.append(1)
        return {"rows": np.arange(6, dtype=np.float32).reshape(2, 3)}

    first = store.model_arrays("tiny", "label_rows\x1fa\x1fb", rows)
    again = ActivationStore(tmp_path / "store").model_arrays("tiny", "label_rows\x1fa\x1fb", rows)
    assert len(calls) == 1 and np.array_equal(first["rows"], again["rows"])
    assert store.model_arrays("other", "label_rows\x1fa\x1fb", rows) is not None
    assert len(calls) == 2  # another model, another entry
    store.features(
        "tiny", [1], ["a prompt"], lambda p: (torch.ones(1, 1, 2), torch.ones(1, 2), 0.5)
    )
    assert len(store_entries(tmp_path / "store")) == 1


def test_prompts_are_built_once_per_text_and_recipe_and_come_back_exactly(tmp_path):
    """Each text's prompt and token count are kept apart from the activations; a new recipe
    (another task's question, another cut, another prompt format) builds them again."""
    from simulations.scale import store_entries

    built = []

    def build(texts):
        built.extend(texts)
        return [f"«{t}»\n\0Answer:\0" for t in texts], [len(t) for t in texts]

    texts = ["naïve café", "b", ""]
    store = ActivationStore(tmp_path)
    first = store.prompts("tiny", "recipe 1", texts, build)
    assert first == ([f"«{t}»\n\0Answer:\0" for t in texts], [10, 1, 0])
    again = ActivationStore(tmp_path).prompts("tiny", "recipe 1", ["b", "new", *texts], build)
    assert built == [*texts, "new"]
    assert again == (["«b»\n\0Answer:\0", "«new»\n\0Answer:\0", *first[0]], [1, 3, *first[1]])
    store.prompts("tiny", "recipe 2", ["b"], build)
    store.prompts("other", "recipe 1", ["b"], build)
    assert built == [*texts, "new", "b", "b"]
    assert not store_entries(tmp_path) and store.stats.hits == store.stats.misses == 0
    # under the store's cap like the activations
    ActivationStore(tmp_path, max_bytes=0).enforce_cap()
    assert not list((tmp_path / "prompts").glob("*.npz"))
    store.prompts("tiny", "recipe 1", ["b"], build)
    assert built[-1] == "b" and len(built) == 7
