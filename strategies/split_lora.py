"""Split learning + LoRA as a Flower strategy: the second baseline of issue 5.

The devices run the backbone's first ``split_layer`` layers and send the hidden states of every
prompt token there, with the labels in clear; this strategy holds the rest of the backbone with
LoRA adapters (:class:`flower_pae.baselines.split_lora.ServerHalf`) and trains it on them. The
devices' half is frozen, so nothing but evaluation results goes back down. Each round:

1. ``train``: every sampled device gets the round number and replies with its training shard's
   states (``states`` record: ``states`` fp16 (Σ tokens, d), ``lengths``, ``labels``), its task
   key and label words; the server trains ``local_epochs`` epochs over all of them.
2. ``evaluate``: devices reply with their test shard's states (no labels);
   ``evaluate.scores``: the server sends each device the label logits of its rows (and the
   frozen backbone's, the first time it scores that device's task), the device replies with
   correct/total counts against its own labels.

The flow, the records and the run directory are :class:`strategies.baseline.StatesStrategy`'s;
this module adds what is split learning's: the states' checks and the frozen logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Message

from flower_pae.baselines.split_lora import ServerHalf, SplitUpload
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
    "SplitLoRAStrategy",
    "decode_upload",
]


def decode_upload(reply: Message, hidden_size: int, train: bool) -> SplitUpload:
    """A device's states (and labels) from its reply, checked before any use.

    Raises
    ------
    UploadError
        Missing or unknown arrays, wrong dtypes or shapes, token counts that do not add up,
        non-finite states, labels outside the label words.
    """
    arrays = read_states(reply)
    check_names(arrays, {"states", "lengths"}, train)
    states = arrays["states"]
    if states.dtype != np.float16 or states.ndim != 2 or states.shape[1] != hidden_size:
        raise UploadError(f"states must be float16 (tokens, {hidden_size}), got {states.shape}")
    check_lengths(arrays["lengths"], states)
    if not np.isfinite(states).all():
        raise UploadError("states hold NaN or Inf")
    return labelled_upload(reply, arrays, train)


class SplitLoRAStrategy(StatesStrategy):
    """Split learning: the server trains its half of the backbone (LoRA) on the devices' states.

    Parameters
    ----------
    recorder : RunRecorder
        Writes every message and metric into the run directory.
    server : ServerHalf
        The server's layers with their adapters and optimizer.
    method : str
        The method name written into ``summary.json``.
    **settings
        ``num_devices``, ``devices_per_round``, ``fraction_evaluate``, ``local_epochs``,
        ``batch_size``: as :class:`~strategies.baseline.StatesStrategy`.
    """

    server: ServerHalf

    def __init__(
        self,
        recorder: RunRecorder,
        server: ServerHalf,
        *,
        method: str = "split_lora",
        **settings: Any,
    ) -> None:
        super().__init__(recorder, server, method=method, **settings)
        self.adapter_params = server.lora_params
        self.hidden_size = int(server.view.hidden_size)
        self._zero_shot_sent: set[tuple[int, str]] = set()  # (node, task key) scored frozen

    def _decode(self, reply: Message, train: bool) -> SplitUpload:
        return decode_upload(reply, self.hidden_size, train)

    def _train_flops(self, tokens: int, samples: int) -> float:
        return self.server.train_flops(tokens)

    def _eval_flops(self, tokens: int, samples: int) -> float:
        return self.server.forward_flops(tokens)

    def _score(self, node: int, upload: SplitUpload) -> tuple[dict[str, np.ndarray], int]:
        """The logits, and the frozen backbone's the first time ``node`` sends this task: the
        device has no other way to its zero-shot accuracy."""
        arrays, tokens = super()._score(node, upload)
        if (node, upload.task_key) not in self._zero_shot_sent:
            arrays["zero_shot"], _ = self.server.logits(upload, self.batch_size, False)
            self._zero_shot_sent.add((node, upload.task_key))
            tokens *= 2
        return arrays, tokens

    def _describe(self) -> str:
        server = self.server
        return (
            f"server layers {server.split_layer + 1}..{server.num_layers} "
            f"with {server.lora_params} LoRA parameters"
        )

    def _summary_fields(self) -> dict[str, Any]:
        return {"split_layer": self.server.split_layer}
