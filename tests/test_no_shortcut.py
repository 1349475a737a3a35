"""The "no shortcut" ablation (``upload_sequence=true``): devices upload every prompt token's
states; the server keeps what the shortcut would have kept, so it learns exactly the same,
and only the wire carries more."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from flower_pae.server.checkpoint import load_state
from tests.run_contract import wire_messages

SETTINGS = dict(
    stream="pypi:bbc",
    num_devices=3,
    max_train=18,
    max_test=9,
    rounds_per_task=2,
    server_epochs=2,
    layers="last:2",
    record_wire=True,
)


@pytest.fixture(scope="module")
def runs(small_run):
    return small_run("shortcut", **SETTINGS), small_run(
        "sequence", upload_sequence=True, **SETTINGS
    )


def test_without_the_shortcut_the_server_learns_the_same(runs):
    """The same network, up to float rounding: the devices' forwards may be batched
    differently (the store's entries against fresh forwards), nothing else differs."""
    shortcut, sequence = (json.loads((r / "summary.json").read_text()) for r in runs)
    assert sequence["cache"]["samples"] == shortcut["cache"]["samples"] == 18
    # the trained side networks, weight for weight (the last round's checkpoint)
    nets = [load_state(r / "checkpoint")[1]["net"] for r in runs]
    assert list(nets[0]) == list(nets[1])
    for name, value in nets[0].items():
        torch.testing.assert_close(nets[1][name], value, rtol=1e-4, atol=1e-6, msg=name)
    # and so the same predictions, but for a test row at a near-tie
    accuracy = [np.array(s["accuracy_matrix"], dtype=float) for s in (shortcut, sequence)]
    assert np.abs(accuracy[0] - accuracy[1]).max() <= 1 / 9 + 1e-9  # 9 test rows


def _train_up(run_dir):
    messages = pd.read_parquet(run_dir / "messages.parquet")
    return messages[(messages.phase == "train") & (messages.direction == "up")]


def test_without_the_shortcut_the_upload_carries_every_token(runs):
    """The same samples; the sequence uploads' activations are every token's (fp16, L × d
    each) where the shortcut's are one per sample, and that is all the extra bytes are."""
    shortcut, sequence = (_train_up(r) for r in runs)
    assert sequence.num_samples.sum() == shortcut.num_samples.sum() == 18
    uploads = [
        [msg.content["upload"] for _, _, msg in wire_messages(r, "train", "up")] for r in runs
    ]
    assert set().union(*(u.keys() for u in uploads[1])) == {"ids", "acts", "targets", "lengths"}
    tokens = sum(int(u["lengths"].numpy().sum()) for u in uploads[1])
    assert tokens > 5 * 18  # every prompt token, not one per sample
    row = 2 * 2 * uploads[0][0]["acts"].numpy().shape[-1]  # fp16, 2 layers, d
    acts = [sum(u["acts"].numpy().nbytes for u in us) for us in uploads]
    assert acts == [18 * row, tokens * row]
    extra = sequence.payload_bytes.sum() - shortcut.payload_bytes.sum()
    lengths = sum(u["lengths"].numpy().nbytes for u in uploads[1])
    assert (
        acts[1] - acts[0] + lengths <= extra <= acts[1] - acts[0] + lengths + 600 * len(uploads[1])
    )
