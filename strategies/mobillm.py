"""MobiLLM-style side tuning as a Flower strategy: the third baseline of issue 5.

The devices run the frozen backbone in inference mode and send the hidden states of the
selected layers at every prompt token, the final pivot state and, to train, the labels in
clear; this strategy trains a ladder side network on them
(:class:`flower_pae.baselines.mobillm.SideServer`). Nothing is cached: every round the devices
forward and send their whole shard again. The messages are those of split learning
(:mod:`strategies.split_lora`, same record names and round trips); each round:

1. ``train``: every sampled device gets the round number and replies with its training shard's
   states (``states`` record: ``states`` (Σ tokens, K, d) float16, or int8 with ``scales``
   (Σ tokens, K) float16; ``lengths``; ``final`` float32 (N, d); ``labels``), its task key
   and label words; the server trains ``local_epochs`` epochs over all of them.
2. ``evaluate``: devices reply with their test shard's states (no labels);
   ``evaluate.scores``: the server sends each device the label logits of its rows, the device
   replies with correct/total counts against its own labels (and the frozen backbone's,
   which it computes itself).

The flow, the records and the run directory are :class:`strategies.baseline.StatesStrategy`'s;
this module adds what is MobiLLM's: the states' checks, the upload cap and the side network.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Message

from flower_pae.baselines.mobillm import MobiLLMUpload, SideServer
from flower_pae.runlog import RunRecorder
from flower_pae.server.validation import UploadError
from strategies.baseline import (
    CONFIG,
    LOGITS,
    METRICS,
    SCORES,
    STATES,
    StatesStrategy,
    check_lengths,
    check_names,
    labelled_upload,
    read_states,
)

__all__ = [
    "CONFIG",
    "LOGITS",
    "METRICS",
    "SCORES",
    "STATES",
    "MobiLLMStrategy",
    "decode_upload",
]


def decode_upload(
    reply: Message,
    num_layers: int,
    hidden_size: int,
    train: bool,
    max_bytes: float = float("inf"),
) -> MobiLLMUpload:
    """A device's states (and labels) from its reply, checked before any use.

    The record's size is read before its arrays are decoded (``max_bytes``: the
    ``max_upload_mb`` cap).

    Raises
    ------
    UploadError
        A record over the cap, missing or unknown arrays, wrong dtypes or shapes (``K`` =
        ``num_layers`` layers of width ``hidden_size``), token counts that do not add up,
        non-finite values, labels outside the label words.
    """
    arrays = read_states(reply, max_bytes)
    int8 = "scales" in arrays
    check_names(arrays, {"states", "lengths", "final"} | ({"scales"} if int8 else set()), train)
    states, lengths, final = arrays["states"], arrays["lengths"], arrays["final"]
    shape = (num_layers, hidden_size)
    if states.dtype != (np.int8 if int8 else np.float16) or states.shape[1:] != shape:
        raise UploadError(
            f"states must be {'int8' if int8 else 'float16'} (tokens, {num_layers}, "
            f"{hidden_size}), got {states.dtype} {states.shape}"
        )
    check_lengths(lengths, states)
    if final.dtype != np.float32 or final.shape != (len(lengths), hidden_size):
        raise UploadError(f"final must be float32 (samples, {hidden_size}), got {final.shape}")
    if int8:
        scales = arrays["scales"]
        if scales.dtype != np.float16 or scales.shape != states.shape[:2]:
            raise UploadError(f"scales must be float16 {states.shape[:2]}, got {scales.shape}")
        if not np.isfinite(scales).all() or (scales <= 0).any():
            raise UploadError("scales must be finite and positive")
    elif not np.isfinite(states).all():
        raise UploadError("states hold NaN or Inf")
    if not np.isfinite(final).all():
        raise UploadError("final holds NaN or Inf")
    return labelled_upload(reply, arrays, train)


class MobiLLMStrategy(StatesStrategy):
    """MobiLLM: the server trains a side network on the devices' full-sequence states.

    Parameters
    ----------
    recorder : RunRecorder
        Writes every message and metric into the run directory.
    server : SideServer
        The side network with its optimizer and the label rows.
    max_upload_mb : float
        A reply's states record above this size is rejected unread.
    method : str
        The method name written into ``summary.json``.
    **settings
        ``num_devices``, ``devices_per_round``, ``fraction_evaluate``, ``local_epochs``,
        ``batch_size``: as :class:`~strategies.baseline.StatesStrategy`.
    """

    server: SideServer
    trained = "side network"

    def __init__(
        self,
        recorder: RunRecorder,
        server: SideServer,
        *,
        max_upload_mb: float = float("inf"),
        method: str = "mobillm",
        **settings: Any,
    ) -> None:
        super().__init__(recorder, server, method=method, **settings)
        self.adapter_params = server.params
        self.max_bytes = max_upload_mb * 2**20

    def _decode(self, reply: Message, train: bool) -> MobiLLMUpload:
        hidden_size = int(self.server.view.hidden_size)
        return decode_upload(reply, len(self.server.layers), hidden_size, train, self.max_bytes)

    def _train_flops(self, tokens: int, samples: int) -> float:
        return self.server.train_flops(tokens, samples)

    def _eval_flops(self, tokens: int, samples: int) -> float:
        return self.server.forward_flops(tokens, samples)

    def _describe(self) -> str:
        server = self.server
        return (
            f"side network over {len(server.layers)} layers, width {server.side.width}, "
            f"{server.params} parameters"
        )

    def _summary_fields(self) -> dict[str, Any]:
        return {"layers": list(self.server.layers), "side_width": self.server.side.width}
