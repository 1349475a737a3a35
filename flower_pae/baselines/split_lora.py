"""Split learning + LoRA, the model halves: the device's first ``k`` layers, the server's rest.

Split learning cuts the backbone after decoder layer ``k = split_layer``. The device holds the
embeddings and layers ``1..k``, frozen, and runs them in inference mode on its prompts (the
PAE device's prompts, :func:`flower_pae.device.shortcut.build_prompt`); it sends the hidden
states of **every** prompt token after layer ``k`` (fp16, padding stripped: the lengths give the
mask and positions back), and for training the **labels in clear** with the task's label words.
The server holds layers ``k+1..L`` and the final norm with peft LoRA adapters (the same rank,
targets, dropout and initialisation as FedAvg + LoRA, :mod:`flower_pae.baselines.fedavg_lora`),
and trains them with the references' loss: cross-entropy over the label words' frozen LM-head
rows (:func:`~flower_pae.device.shortcut.label_rows`) at the pivot (last) position. The
device's half is frozen, so no gradient goes back down; there is no activation cache either:
every round the device forwards and sends its whole shard again.

Evaluation is split the same way: the device sends its test rows' states, the server returns
the label logits (and, the first time for a task, the frozen backbone's), and the device scores
them against its own labels; only counts come back.

Continuing a Hugging Face decoder from layer ``k``: both halves are the same
:class:`~transformers.LlamaModel` with its ``layers`` cut, called the way
:func:`flower_pae.references._pivot_states` calls the whole one (left padding, positions from
the attention mask). The device's half has no final norm; the server's gets the states as
``inputs_embeds`` and computes the causal mask and rotary embeddings from the same mask and
positions as a full forward would. So the two halves give the full model's pivot states
(``tests/test_split_lora.py``). This needs a model that feeds ``inputs_embeds`` unscaled into
its first layer (Llama, Mistral, Qwen2/3; not Gemma, which scales them).

Flower-agnostic: arrays cross as ``{name: numpy array}``; the ClientApp in
``simulations/baseline_apps.py`` turns them into records.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Sequence

import numpy as np
import torch

from flower_pae.backbone import Backbone
from flower_pae.data import Example, Task
from flower_pae.device.cost import forward_flops, lora_step_flops, matmul_params
from flower_pae.device.shortcut import build_prompt, label_rows

# The references' helpers: a fresh float32 model with left padding, the peft LoRA copy of the
# FedAvg baseline, and the decoder body.
from flower_pae.references import _decoder, _load_fresh, _lora_model

from .base import StatesDevice
from .base import StatesUpload as SplitUpload  # layer-k states (Σ T, d) fp16, lengths, labels
from .fedavg_lora import LORA_DROPOUT, LORA_TARGETS

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DeviceHalf",
    "ServerHalf",
    "SplitDevice",
    "SplitUpload",
    "pack_states",
    "unpack_states",
]

# Decoders whose first layer reads ``inputs_embeds`` as they are (no embedding scale), so the
# server's half can take the device's states in their place.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# ----------------------------------------------------------------------------- the wire


def pack_states(states: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    """A left-padded batch's states (B, T, d) without its padding: the real tokens of every
    row one after another, fp16 ``(Σ lengths, d)``, and the rows' ``lengths`` (int32)."""
    lengths = mask.sum(-1)
    rows = [states[i, states.shape[1] - int(n) :] for i, n in enumerate(lengths)]
    flat = torch.cat(rows) if rows else states.new_zeros(0, states.shape[-1])
    return {
        "states": flat.to(torch.float16).numpy(),
        "lengths": lengths.to(torch.int32).numpy(),
    }


def unpack_states(
    states: np.ndarray, lengths: np.ndarray, rows: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of :func:`pack_states`' output as a left-padded float32 batch and its mask.

    Padding positions hold zeros (their values never reach a real position: the mask keeps
    them out of every real token's attention).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    rows = list(range(len(lengths))) if rows is None else list(rows)
    width = int(max((lengths[i] for i in rows), default=0))
    d = states.shape[-1]
    batch = torch.zeros(len(rows), width, d)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for j, i in enumerate(rows):
        n, s = int(lengths[i]), int(starts[i])
        if n:
            batch[j, width - n :] = torch.from_numpy(states[s : s + n].astype(np.float32))
            mask[j, width - n :] = 1
    return batch, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: real tokens from 0 (as ``_pivot_states``)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _check_split(model: torch.nn.Module, split_layer: int) -> int:
    layers = int(model.config.num_hidden_layers)
    if not 1 <= split_layer < layers:
        raise ValueError(
            f"split_layer={split_layer}: the model has {layers} decoder layers, so the split "
            f"must leave at least one on each side (1 <= split_layer <= {layers - 1})"
        )
    kind = getattr(model.config, "model_type", "")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"split learning continues the decoder from inputs_embeds, which is exact for "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models; this one is {kind!r}"
        )
    return layers


# ----------------------------------------------------------------------------- device half


class DeviceHalf:
    """The device's half of the backbone: embeddings and decoder layers ``1..k``, frozen.

    Only those weights stay in memory (the other layers of the loaded copy are dropped).
    """

    def __init__(self, model_name: str, split_layer: int) -> None:
        model, self.tokenizer = _load_fresh(model_name)
        _check_split(model, split_layer)
        self.split_layer = split_layer
        self.decoder = _decoder(model)
        self.decoder.layers = self.decoder.layers[:split_layer]
        self.decoder.norm = torch.nn.Identity()  # the final norm is the server's
        self.decoder.requires_grad_(False).eval()
        self.config = model.config
        self.view = Backbone(name=model_name, model=model, tokenizer=self.tokenizer)
        self.params = matmul_params(self.decoder)  # P of the first k layers

    def prompts(self, task: Task, examples: Sequence[Example], max_tokens: int) -> list[str]:
        """The PAE device's prompts for ``examples`` (its tokenizer: the model's own)."""
        return [build_prompt(self.view, task, ex.text, max_tokens) for ex in examples]

    @torch.inference_mode()
    def states(self, prompts: Sequence[str], batch_size: int) -> tuple[dict[str, np.ndarray], int]:
        """Hidden states after layer ``k`` of every prompt token, packed; and the token count."""
        parts: list[dict[str, np.ndarray]] = []
        for lo in range(0, len(prompts), batch_size):
            enc = self.tokenizer(
                list(prompts[lo : lo + batch_size]), return_tensors="pt", padding=True
            )
            mask = enc["attention_mask"]
            out = self.decoder(
                input_ids=enc["input_ids"],
                attention_mask=mask,
                position_ids=_positions(mask),
                use_cache=False,
            )
            parts.append(pack_states(out.last_hidden_state, mask))
        if not parts:
            d = int(self.config.hidden_size)
            return {"states": np.zeros((0, d), np.float16), "lengths": np.zeros(0, np.int32)}, 0
        packed = {k: np.concatenate([p[k] for p in parts]) for k in ("states", "lengths")}
        return packed, int(packed["lengths"].sum())


# ----------------------------------------------------------------------------- server half


class ServerHalf:
    """The server's half: decoder layers ``k+1..L`` and the final norm, with peft LoRA.

    LoRA (rank ``r``, ``alpha = 2·r``, ``q_proj``/``v_proj``, dropout 0.05, seeded ``A``,
    ``B = 0``) is applied to the whole model as FedAvg + LoRA does, then the first ``k``
    layers are dropped, so the server's adapters are the FedAvg baseline's initial adapters
    of layers ``k+1..L``. AdamW at ``lr`` persists across rounds (one trainer, as the
    centralized reference). The frozen LM head gives the label rows ``W_t``.
    """

    def __init__(self, model_name: str, split_layer: int, r: int, lr: float, seed: int) -> None:
        self.peft_model, self.view = _lora_model(
            model_name,
            r=r,
            alpha=2 * r,
            dropout=LORA_DROPOUT,
            target_modules=LORA_TARGETS,
            seed=seed,
        )
        self.num_layers = _check_split(self.view.model, split_layer)
        self.split_layer = split_layer
        self.decoder = _decoder(self.view.model)
        self.decoder.layers = self.decoder.layers[split_layer:]
        self.trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.lora_params = sum(p.numel() for p in self.trainable)
        self.params = matmul_params(self.decoder)  # P of layers k+1..L
        self.optimizer = torch.optim.AdamW(self.trainable, lr=lr)
        self.seed = seed
        self.peft_model.eval()
        self._rows: dict[tuple[str, ...], torch.Tensor] = {}

    def rows(self, label_words: Sequence[str]) -> torch.Tensor:
        """The frozen LM-head rows ``W_t`` of the label words (LoRA on q/v leaves them)."""
        key = tuple(label_words)
        if key not in self._rows:
            self._rows[key] = label_rows(self.view, list(key))
        return self._rows[key]

    def pivot_states(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final (normed) hidden state at the pivot from the device's states, (B, d).

        :func:`flower_pae.references._pivot_states` for the second half: the same call with
        the states in place of the embeddings. Gradients flow unless in inference mode.
        """
        out = self.decoder(
            inputs_embeds=states,
            attention_mask=mask,
            position_ids=_positions(mask),
            use_cache=False,
        )
        return out.last_hidden_state[:, -1, :].float()

    def train(
        self,
        batches: Sequence[SplitUpload],
        epochs: int,
        batch_size: int,
        server_round: int,
    ) -> tuple[float, float, int]:
        """``epochs`` epochs over every sample of ``batches`` (the round's uploads), shuffled
        across devices, in mini-batches of ``batch_size``.

        Returns the mean cross-entropy of the last epoch, the seconds of all epochs and the
        tokens processed (all epochs).
        """
        samples = [(u, i) for u in batches for i in range(len(u.arrays["lengths"]))]
        if not samples:
            return float("nan"), 0.0, 0
        rng = random.Random(f"{self.seed}:split:{server_round}")
        torch.manual_seed(rng.randrange(2**31))  # LoRA dropout
        order = list(range(len(samples)))
        self.peft_model.train()
        loss_sum, tokens = 0.0, 0
        start = time.perf_counter()
        for _ in range(epochs):
            rng.shuffle(order)
            loss_sum = 0.0
            for lo in range(0, len(order), batch_size):
                batch = [samples[j] for j in order[lo : lo + batch_size]]
                loss = self._batch_loss(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                loss_sum += float(loss.detach()) * len(batch)
                tokens += sum(int(u.arrays["lengths"][i]) for u, i in batch)
        seconds = time.perf_counter() - start
        self.peft_model.eval()
        return loss_sum / len(samples), seconds, tokens

    def _batch_loss(self, batch: Sequence[tuple[SplitUpload, int]]) -> torch.Tensor:
        """Mean cross-entropy of a batch; each sample against its own task's label rows."""
        h = self._pivot_grouped(batch)
        losses = []
        for words in dict.fromkeys(tuple(u.label_words) for u, _ in batch):
            sel = [j for j, (u, _) in enumerate(batch) if tuple(u.label_words) == words]
            z = h[sel] @ self.rows(words).T
            gold = torch.tensor([int(batch[j][0].arrays["labels"][batch[j][1]]) for j in sel])
            losses.append(torch.nn.functional.cross_entropy(z, gold, reduction="sum"))
        return sum(losses) / len(batch)

    def _pivot(self, upload: SplitUpload, rows: Sequence[int]) -> torch.Tensor:
        states, mask = unpack_states(upload.arrays["states"], upload.arrays["lengths"], rows)
        return self.pivot_states(states, mask)

    def _pivot_grouped(self, batch: Sequence[tuple[SplitUpload, int]]) -> torch.Tensor:
        """Pivot states of a batch drawn from several uploads, padded together, in order."""
        d = batch[0][0].arrays["states"].shape[-1]
        width = max(int(u.arrays["lengths"][i]) for u, i in batch)
        states = torch.zeros(len(batch), width, d)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, (u, i) in enumerate(batch):
            one, m = unpack_states(u.arrays["states"], u.arrays["lengths"], [i])
            n = one.shape[1]
            states[j, width - n :], mask[j, width - n :] = one[0], m[0]
        return self.pivot_states(states, mask)

    @torch.no_grad()  # not inference mode: the label rows it caches are used in training
    def logits(
        self, upload: SplitUpload, batch_size: int, adapters: bool = True
    ) -> tuple[np.ndarray, int]:
        """Label logits ``z = h·W_tᵀ`` (N, C) of an evaluation upload, float32, and its tokens;
        ``adapters=False``: the frozen backbone's (zero-shot)."""
        rows = self.rows(upload.label_words)
        n = len(upload.arrays["lengths"])
        out = []
        for lo in range(0, n, batch_size):
            idx = list(range(lo, min(n, lo + batch_size)))
            if adapters:
                out.append(self._pivot(upload, idx) @ rows.T)
            else:
                with self.peft_model.disable_adapter():
                    out.append(self._pivot(upload, idx) @ rows.T)
        z = torch.cat(out) if out else torch.zeros(0, len(rows))
        return z.numpy().astype(np.float32), int(upload.arrays["lengths"].sum())

    def train_flops(self, tokens: int) -> float:
        """FLOPs of the server's LoRA steps over ``tokens`` tokens (its layers only)."""
        return lora_step_flops(self.params, self.lora_params, tokens)

    def forward_flops(self, tokens: int) -> float:
        """FLOPs of the server's inference forward over ``tokens`` tokens."""
        return forward_flops(self.params + self.lora_params, tokens)


# ----------------------------------------------------------------------------- device


@functools.lru_cache(maxsize=4)
def device_half(model_name: str, split_layer: int) -> DeviceHalf:
    """The process's device half (loaded once per Ray actor)."""
    return DeviceHalf(model_name, split_layer)


class SplitDevice(StatesDevice):
    """One device of the split-learning baseline (settings: ``split_layer``, ``batch_size``,
    ``max_tokens``, ...): its uploads are the states after layer ``k``, and the server sends
    the frozen backbone's logits the first time it scores a task (:meth:`evaluate`)."""

    @functools.cached_property
    def half(self) -> DeviceHalf:
        return device_half(self.cfg.model, self.cfg.split_layer)

    @property
    def params(self) -> int:
        """``P`` of the first ``k`` layers: the device's forward runs them only."""
        return self.half.params

    def _prompts(self, task: Task, examples: Sequence[Example]) -> list[str]:
        return self.half.prompts(task, examples, self.cfg.max_tokens)

    def _states(self, prompts: Sequence[str]) -> tuple[dict[str, np.ndarray], int]:
        return self.half.states(prompts, self.cfg.batch_size)

    def describe(self, upload: SplitUpload) -> str:
        return f"layers 1..{self.cfg.split_layer} on {upload.num_samples} samples"
