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
from tests.run_contract import download_payload_bytes


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
    err = (decode_activations(int8) - acts).abs()
    steps = torch.from_numpy(int8["scales"]).float().unsqueeze(-1)  # the scales that travel
    assert (err <= 0.5 * steps).all()  # every entry within half a step of its row's scale
    zero = decode_activations(encode_activations(torch.zeros(2, 3, 4), "int8"))
    assert torch.equal(zero, torch.zeros(2, 3, 4))
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


# ---- the side network's download (packed: one flat array per dtype) -----------------------
def _side_network(layers: int = 8, hidden: int = 576, rank: int = 16):
    from flower_pae.oa_adapter import OAAdapterConfig
    from flower_pae.side_network import LadderSideNetwork

    gen = torch.Generator().manual_seed(0)
    net = LadderSideNetwork(layers, hidden, OAAdapterConfig(r_max=rank), out_rank=rank)
    net.add_task("task")
    # hidden states with a few large dimensions (mean 300, std 5), as a backbone's have
    offset = torch.zeros(hidden)
    offset[:4] = 300.0
    acts = torch.randn(64, layers, hidden, generator=gen) * (1 + 4 * (offset > 0)) + offset
    net.fit_standardizer(acts)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return net.eval(), acts


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_the_device_computes_the_servers_outputs_after_the_download(precision):
    """Full size (8 layers of 576, rank 16): the device's outputs match the server's within
    the download's rounding (fp32 exactly), and the message is the payload, its layout and
    the framing of one array per dtype: every byte counted is in ``message_bytes``."""
    from flower_pae.side_network import LadderSideNetwork
    from flower_pae.wire import side_network_from_records, side_network_records

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    net, acts = _side_network()
    matrices = {n for n, p in net.named_parameters() if p.ndim >= 2}
    standardizer = ("input_mean", "input_std")
    content = side_network_records(
        net.meta(), net.state_dict(), matrices, precision, halved=standardizer
    )
    device_net = LadderSideNetwork.from_state(*side_network_from_records(content)).eval()
    with torch.no_grad():
        expected, got = net(acts), device_net(acts)
    tol = {"fp32": 0.0, "fp16": 2e-3, "int8": 2e-2}[precision] * float(expected.abs().max())
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)

    payload = download_payload_bytes(net.state_dict(), matrices, standardizer, precision)
    assert sum(a.numpy().nbytes for a in content["side_net"].values()) == payload
    message = Message(content, dst_node_id=3, message_type="evaluate")
    texts = sum(len(str(v)) for v in content["side_meta"].values())
    framing = message_bytes(message) - payload - texts
    assert 0 < framing < 500 * (len(content["side_net"]) + 1)
    if precision == "int8":  # 242,225 bytes as 59 arrays (per-array framing, fp32 standardizer)
        assert message_bytes(message) < 202_000


def test_packed_arrays_round_trip_and_a_layout_that_does_not_fit_is_refused():
    from flower_pae.wire import pack_arrays, unpack_arrays

    arrays = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.ones((4,), np.int8),
        "c": np.float32(2.5).reshape(()),
        "d": np.zeros((3, 0), np.float32),
        "e": np.full((2, 2), 7, np.int8),
    }
    flat, layout = pack_arrays(arrays)
    assert sorted(flat) == ["float32", "int8"]
    back = unpack_arrays(flat, layout)
    assert list(back) == list(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    with pytest.raises(ValueError, match="runs past"):
        unpack_arrays(flat, [*layout, ["f", "int8", [1]]])
    with pytest.raises(ValueError, match="runs past"):
        unpack_arrays(flat, [["g", "float16", [1]]])
    with pytest.raises(ValueError, match="unused"):
        unpack_arrays(flat, layout[:-1])
