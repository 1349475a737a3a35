"""Records on the wire, byte accounting, and the server's activation cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flower_pae.server.cache import ActivationCache
from flower_pae.server.validation import UploadError, validate_upload
from flower_pae.wire import (
    array_record,
    decode_activations,
    encode_activations,
    ids_to_array,
    message_bytes,
)


def _upload(n: int, start: int = 0, layers: int = 3, d: int = 8, precision: str = "fp16"):
    acts = torch.randn(n, layers, d)
    arrays = encode_activations(acts, precision)
    ids = [i.to_bytes(16, "little") for i in range(start, start + n)]
    arrays.update(ids=ids_to_array(ids), targets=np.random.randn(n, d).astype(np.float32))
    return arrays


def test_int8_round_trip_is_close_and_smaller():
    acts = torch.randn(20, 30, 64) * 5
    fp16, int8 = encode_activations(acts, "fp16"), encode_activations(acts, "int8")
    assert torch.allclose(decode_activations(fp16), acts, atol=5e-3 * 5)
    err = (decode_activations(int8) - acts).abs().max()
    assert err <= acts.abs().amax() / 127
    assert sum(v.nbytes for v in int8.values()) < 0.6 * fp16["acts"].nbytes


def test_message_bytes_grow_with_payload():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    small = Message(
        RecordDict({"u": array_record(_upload(1))}), dst_node_id=3, message_type="train"
    )
    big = Message(
        RecordDict({"u": array_record(_upload(101))}), dst_node_id=3, message_type="train"
    )
    per_sample = (message_bytes(big) - message_bytes(small)) / 100
    assert per_sample == pytest.approx(16 + 3 * 8 * 2 + 8 * 4, rel=0.02)


def test_cache_spills_under_its_cap_and_loses_nothing(tmp_path):
    cache = ActivationCache(tmp_path / "spill", memory_cap_bytes=4000)
    uploads = [_upload(10, start=10 * i) for i in range(6)]
    for arrays in uploads:
        assert cache.add("task", arrays) == 10
        assert cache.stats.bytes_in_memory <= 4000
    assert cache.stats.spilled_blocks > 0 and cache.stats.bytes_on_disk > 0
    acts, targets = cache.training_data("task")
    assert acts.shape == (60, 3, 8)
    expected = torch.cat([decode_activations(a) for a in uploads])
    assert torch.equal(acts, expected)
    assert np.array_equal(targets.numpy(), np.concatenate([a["targets"] for a in uploads]))


def test_cache_rejects_ids_it_holds():
    cache = ActivationCache(None, memory_cap_bytes=10**9)
    assert cache.add("t", _upload(5)) == 5
    assert cache.add("t", _upload(5, start=3)) == 3  # ids 3, 4 are held
    assert cache.stats.duplicates_rejected == 2 and len(cache) == 8


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda a: a.pop("targets"), "keys"),
        (lambda a: a.update(targets=a["targets"][:, :4]), "targets"),
        (lambda a: a.update(acts=a["acts"].astype(np.float64)), "float16 or int8"),
        (lambda a: a["targets"].__setitem__((0, 0), np.nan), "NaN"),
        (lambda a: a.update(ids=a["ids"][:, :8]), "ids"),
    ],
)
def test_bad_uploads_are_rejected_with_a_reason(mutate, needle):
    arrays = _upload(4)
    mutate(arrays)
    with pytest.raises(UploadError, match=needle):
        validate_upload(arrays, "abcd", None, width=8)


def test_upload_shape_must_match_earlier_uploads():
    with pytest.raises(UploadError, match="expected"):
        validate_upload(_upload(2, layers=4), "abcd", (3, 8), width=8)
