"""MobiLLM-style server-assisted side tuning: the device's forwards, the server's side network.

MobiLLM (server-assisted side tuning) keeps the whole backbone on the device, frozen, and
moves all training to the server: the device only runs **inference forwards** and uploads the
intermediate activations of the backbone's layers for the **whole sequence**; the server trains
a side network that runs parallel to the backbone (Ladder Side Tuning) on them, with the
**labels, which the device sends in clear**. There is no activation cache and no shortcut:
every round the device forwards its whole shard again and uploads every token's states of every
selected layer. This is what PAE MobiLLM is compared against: PAE uploads the pivot token's
states only, once (its server caches them), and masked differences instead of labels.

Device (:class:`MobiLLMDevice`), on PAE's shards, prompts and schedule: one inference-mode
forward of the frozen backbone per prompt; it uploads, per sample,

- ``states``: the hidden states of the selected layers (``layers``: ``all``, ``last:K`` or
  indices, :func:`flower_pae.backbone.select_layers`) at **every** prompt token, padding
  stripped (:func:`flower_pae.baselines.split_lora.pack_states`): ``(Σ tokens, K, d)``,
  float16 or, with ``precision = "int8"``, int8 with a float16 scale per token and layer
  (``scales``, :func:`flower_pae.wire.encode_activations`);
- ``lengths``: the tokens of each sample (they give the mask and positions back);
- ``final``: the final (normed) hidden state at the pivot, float32 ``(N, d)``, which the side
  network's output is added to (the server has no backbone to compute it: it has only the
  device's states). float32 so that the untrained side network gives exactly the backbone's
  logits; it is 2.3 KB a sample next to the states' 4 MB (30 layers, fp16);
- ``labels`` (training only, in clear) with the task's label words (also in clear).

Server (:class:`SideServer`): the side network (:class:`SideNetwork`), trained with AdamW
at ``lr`` for ``local_epochs`` epochs over each round's uploads, with the loss of the
references and the other baselines: cross-entropy over the label words' frozen LM-head rows
(:func:`flower_pae.device.shortcut.label_rows`) at the pivot. Its output ``s`` is added to the
backbone's final pivot state: label logits ``z = W_t·(h + s)``.

Evaluation: the side network lives on the server, so the device sends its test rows' states
(no labels), the server returns their label logits, and the device scores them against its own
labels; the frozen backbone's (zero-shot) logits ``W_t·h`` it computes itself.

Flower-agnostic: arrays cross as ``{name: numpy array}``; the ClientApp in
``simulations/baseline_apps.py`` turns them into records.
"""

from __future__ import annotations

import random
import time
from collections.abc import MutableMapping, Sequence

import numpy as np
import torch
from torch import nn

from flower_pae.backbone import Backbone, load_backbone, select_layers
from flower_pae.data import Example, Task
from flower_pae.device.shortcut import build_prompt, label_rows
from flower_pae.wire import encode_activations

from .base import StatesDevice
from .base import StatesUpload as MobiLLMUpload  # states (Σ T, K, d), lengths, final, labels
from .split_lora import _positions, pack_states

__all__ = [
    "REDUCTION",
    "MobiLLMDevice",
    "MobiLLMUpload",
    "SideNetwork",
    "SideServer",
    "batch_states",
    "sequence_states",
]

# Side-network width d / REDUCTION (LST's reduction factor: 576 → 72 for SmolLM2-135M).
REDUCTION = 8


# ----------------------------------------------------------------------------- the wire


@torch.inference_mode()
def sequence_states(
    backbone: Backbone,
    prompts: Sequence[str],
    layers: Sequence[int],
    batch_size: int,
    precision: str = "fp16",
) -> tuple[dict[str, np.ndarray], int]:
    """The device's forward: every prompt token's states at ``layers`` (1-based), packed.

    Returns ``{"states", ["scales"], "lengths", "final"}`` (see the module docstring) and the
    prompt tokens processed. The decoder body only: no vocabulary-sized logits.
    """
    tok, decoder = backbone.tokenizer, backbone.model.get_decoder()
    d, k = backbone.hidden_size, len(layers)
    states, lengths, finals = [], [], []
    for lo in range(0, len(prompts), batch_size):
        enc = tok(list(prompts[lo : lo + batch_size]), return_tensors="pt", padding=True)
        mask = enc["attention_mask"]
        out = decoder(
            input_ids=enc["input_ids"],
            attention_mask=mask,
            position_ids=_positions(mask),
            output_hidden_states=True,
            use_cache=False,
        )
        stacked = torch.stack([out.hidden_states[i] for i in layers], dim=2)  # (B, T, K, d)
        packed = pack_states(stacked.flatten(2), mask)  # fp16 (Σ T, K·d)
        states.append(packed["states"].reshape(-1, k, d))
        lengths.append(packed["lengths"])
        finals.append(out.last_hidden_state[:, -1, :].float().numpy())
    if not states:
        states, lengths = [np.zeros((0, k, d), np.float16)], [np.zeros(0, np.int32)]
        finals = [np.zeros((0, d), np.float32)]
    flat = np.concatenate(states)
    arrays = (
        {"states": flat}
        if precision == "fp16"
        else {
            ("states" if key == "acts" else key): value
            for key, value in encode_activations(torch.from_numpy(flat).float(), precision).items()
        }
    )
    arrays["lengths"] = np.concatenate(lengths)
    arrays["final"] = np.concatenate(finals)
    return arrays, int(arrays["lengths"].sum())


def batch_states(
    items: Sequence[tuple[dict[str, np.ndarray], int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples ``(arrays, row)`` of one or several uploads as a left-padded float32 batch.

    Returns the states ``(B, T, K, d)`` (zeros at padding), the mask ``(B, T)`` and the final
    pivot states ``(B, d)``. Only the batch's rows are decoded (int8 with their scales).
    """
    spans = []
    for arrays, row in items:
        lengths = arrays["lengths"]
        start = int(lengths[:row].sum()) if row else 0
        spans.append((arrays, row, start, int(lengths[row])))
    _, k, d = items[0][0]["states"].shape
    width = max(n for *_, n in spans)
    states = torch.zeros(len(items), width, k, d)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    finals = torch.zeros(len(items), d)
    for j, (arrays, row, start, n) in enumerate(spans):
        part = torch.from_numpy(np.ascontiguousarray(arrays["states"][start : start + n])).float()
        if "scales" in arrays:
            scales = arrays["scales"][start : start + n]
            part = part * torch.from_numpy(np.ascontiguousarray(scales)).float().unsqueeze(-1)
        states[j, width - n :] = part
        mask[j, width - n :] = 1
        finals[j] = torch.from_numpy(np.asarray(arrays["final"][row], np.float32))
    return states, mask, finals


# ----------------------------------------------------------------------------- side network


class SideNetwork(nn.Module):
    """A ladder side network on full-sequence states (Ladder Side Tuning, as MobiLLM).

    For the selected backbone layers ``l = 1..K`` (states ``X_l`` of every token)::

        x_l   = down_l(LayerNorm_l(X_l))                       (d → r = d / REDUCTION)
        in_1  = x_1
        in_l  = (1 − μ_l)·x_l + μ_l·h_{l−1},   μ_l = sigmoid(α_l), α_l = 0 at the start
        h_l   = block_l(in_l)                                  causal transformer block, width r
        s     = up(LayerNorm(h_K[pivot]))                      (r → d), ``up`` zero-initialised

    ``block_l`` is a pre-norm :class:`torch.nn.TransformerEncoderLayer` (4 heads where ``r``
    allows, feed-forward ``4·r``, no dropout) under a causal mask that also keeps padding out
    of every real token's attention (left padding: a padded query attends to itself only, so
    it stays finite, and no real query reads it). No positional embedding: the backbone's
    states carry position, and the causal mask orders the tokens. ``s`` lives in the
    backbone's hidden space and is added to its final pivot state (:meth:`SideServer.logits`);
    with ``up = 0`` the untrained network leaves the backbone's predictions exactly as they are.

    Parameters
    ----------
    num_layers : int
        ``K``, the backbone layers whose states come in.
    hidden : int
        ``d``, the backbone's hidden width.
    width : int, optional
        ``r``; default ``max(1, d // REDUCTION)``.
    seed : int
        Seeds the initial weights (the global generator is left as it was).
    """

    def __init__(self, num_layers: int, hidden: int, width: int | None = None, seed: int = 0):
        super().__init__()
        r = width or max(1, hidden // REDUCTION)
        self.num_layers, self.hidden, self.width = num_layers, hidden, r
        self.heads = next(h for h in (4, 2, 1) if r % h == 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(num_layers))
            self.downs = nn.ModuleList(nn.Linear(hidden, r) for _ in range(num_layers))
            self.gates = nn.Parameter(torch.zeros(num_layers))
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(
                    r, self.heads, 4 * r, dropout=0.0, batch_first=True, norm_first=True
                )
                for _ in range(num_layers)
            )
            self.out_norm = nn.LayerNorm(r)
            self.up = nn.Linear(r, hidden, bias=False)
            nn.init.zeros_(self.up.weight)

    def attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``(B·heads, T, T)``, True where attention is not allowed."""
        t = mask.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        allowed = causal & mask.bool()[:, None, :]
        allowed = allowed | torch.eye(t, dtype=torch.bool)
        return (~allowed).repeat_interleave(self.heads, dim=0)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Side output ``s`` ``(B, d)`` at the pivot (last position) of a left-padded batch.

        ``states``: ``(B, T, K, d)`` float32; ``mask``: ``(B, T)`` (1 at real tokens).
        """
        if states.shape[2] != self.num_layers or states.shape[3] != self.hidden:
            raise ValueError(
                f"the side network takes (B, T, {self.num_layers}, {self.hidden}) states, "
                f"got {tuple(states.shape)}"
            )
        attn = self.attention_mask(mask)
        keep = mask.unsqueeze(-1).to(states.dtype)
        mu = torch.sigmoid(self.gates)
        h = None
        for i in range(self.num_layers):
            x = self.downs[i](self.norms[i](states[:, :, i]))
            x = x if h is None else (1 - mu[i]) * x + mu[i] * h
            h = self.blocks[i](x, src_mask=attn) * keep  # padding positions held at zero
        return self.up(self.out_norm(h[:, -1]))

    def token_params(self) -> int:
        """Weights of the matrix multiplications each token goes through (downs and blocks)."""
        return sum(
            p.numel()
            for name, p in self.named_parameters()
            if p.ndim == 2 and name.startswith(("downs.", "blocks."))
        )

    def pivot_params(self) -> int:
        """Weights applied at the pivot only (the up-projection)."""
        return int(self.up.weight.numel())


# ----------------------------------------------------------------------------- server


class SideServer:
    """The server of MobiLLM: the side network, its AdamW and the label words' LM-head rows.

    It loads the backbone only for its frozen LM head and tokenizer (the label rows ``W_t``);
    it never runs it. AdamW at ``lr`` persists across rounds (one trainer, as split learning's
    server); mini-batches are shuffled across devices, seeded by round.
    """

    def __init__(
        self,
        model_name: str,
        layers: str,
        lr: float,
        seed: int,
        width: int | None = None,
    ) -> None:
        self.view = load_backbone(model_name)
        self.layers = select_layers(layers, self.view.num_layers)
        self.side = SideNetwork(len(self.layers), self.view.hidden_size, width, seed)
        self.params = sum(p.numel() for p in self.side.parameters())
        self.optimizer = torch.optim.AdamW(self.side.parameters(), lr=lr)
        self.seed = seed
        self._rows: dict[tuple[str, ...], torch.Tensor] = {}
        self.side.eval()

    def rows(self, label_words: Sequence[str]) -> torch.Tensor:
        """The frozen LM-head rows ``W_t`` of the label words."""
        key = tuple(label_words)
        if key not in self._rows:
            self._rows[key] = label_rows(self.view, list(key))
        return self._rows[key]

    def train(
        self,
        uploads: Sequence[MobiLLMUpload],
        epochs: int,
        batch_size: int,
        server_round: int,
    ) -> tuple[float, float, int]:
        """``epochs`` epochs over every sample of ``uploads`` (the round's), shuffled across
        devices, in mini-batches of ``batch_size``.

        Returns the mean cross-entropy of the last epoch, the seconds of all epochs and the
        tokens processed (all epochs).
        """
        samples = [(u, i) for u in uploads for i in range(u.num_samples)]
        if not samples:
            return float("nan"), 0.0, 0
        rng = random.Random(f"{self.seed}:mobillm:{server_round}")
        order = list(range(len(samples)))
        self.side.train()
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
        self.side.eval()
        return loss_sum / len(samples), seconds, tokens

    def _batch_loss(self, batch: Sequence[tuple[MobiLLMUpload, int]]) -> torch.Tensor:
        """Mean cross-entropy of a batch; each sample against its own task's label rows."""
        states, mask, final = batch_states([(u.arrays, i) for u, i in batch])
        h = final + self.side(states, mask)
        losses = []
        for words in dict.fromkeys(tuple(u.label_words) for u, _ in batch):
            sel = [j for j, (u, _) in enumerate(batch) if tuple(u.label_words) == words]
            z = h[sel] @ self.rows(words).T
            gold = torch.tensor([int(batch[j][0].arrays["labels"][batch[j][1]]) for j in sel])
            losses.append(nn.functional.cross_entropy(z, gold, reduction="sum"))
        return sum(losses) / len(batch)

    @torch.no_grad()
    def side_output(self, upload: MobiLLMUpload, batch_size: int) -> torch.Tensor:
        """The side network's output ``s`` ``(N, d)`` for an upload's samples."""
        n = upload.num_samples
        out = []
        for lo in range(0, n, batch_size):
            rows = range(lo, min(n, lo + batch_size))
            states, mask, _ = batch_states([(upload.arrays, i) for i in rows])
            out.append(self.side(states, mask))
        return torch.cat(out) if out else torch.zeros(0, self.view.hidden_size)

    @torch.no_grad()
    def logits(self, upload: MobiLLMUpload, batch_size: int) -> tuple[np.ndarray, int]:
        """Label logits ``z = W_t·(h + s)`` ``(N, C)`` of an upload, float32, and its tokens.

        ``h`` is the final pivot state the device sent; the last product runs over the whole
        upload at once, as the device computes its zero-shot ``W_t·h``.
        """
        final = torch.from_numpy(np.asarray(upload.arrays["final"], np.float32))
        z = (final + self.side_output(upload, batch_size)) @ self.rows(upload.label_words).T
        return z.numpy().astype(np.float32), int(upload.arrays["lengths"].sum())

    def train_flops(self, tokens: int, samples: int) -> float:
        """FLOPs of the side network's training steps: ``6·P·T`` (forward, activation and
        weight gradients; every weight trains) with ``P`` its per-token weights, plus the
        up-projection at the pivots. Attention scores left out, as in ``cost.py``."""
        return 6.0 * self.side.token_params() * tokens + 6.0 * self.side.pivot_params() * samples

    def forward_flops(self, tokens: int, samples: int) -> float:
        """FLOPs of the side network's inference forward."""
        return 2.0 * self.side.token_params() * tokens + 2.0 * self.side.pivot_params() * samples


# ----------------------------------------------------------------------------- device


class MobiLLMDevice(StatesDevice):
    """One device of the MobiLLM baseline (settings: ``layers``, ``precision``,
    ``batch_size``, ``max_tokens``, ...).

    It holds the whole frozen backbone and its selected layers, as PAE's device does (the same
    process-wide copy) and only ever runs it in inference mode; so it counts the frozen
    backbone's correct answers itself (:meth:`eval_upload`).
    """

    @property
    def backbone(self) -> Backbone:
        return self.data.backbone

    @property
    def layers(self) -> list[int]:
        return self.data.layers

    @property
    def params(self) -> int:
        """``P`` of the whole decoder body: the device's forward runs all of it (counted once
        per process, by the shared backbone)."""
        return self.backbone.matmul_params

    def _prompts(self, task: Task, examples: Sequence[Example]) -> list[str]:
        return [build_prompt(self.backbone, task, ex.text, self.cfg.max_tokens) for ex in examples]

    def _states(self, prompts: Sequence[str]) -> tuple[dict[str, np.ndarray], int]:
        cfg = self.cfg
        return sequence_states(self.backbone, prompts, self.layers, cfg.batch_size, cfg.precision)

    def describe(self, upload: MobiLLMUpload) -> str:
        return (
            f"{len(self.layers)} layers' states of {upload.num_samples} samples "
            f"({upload.tokens} tokens)"
        )

    def eval_upload(
        self, server_round: int, zero_shot: MutableMapping[str, int] | None = None
    ) -> MobiLLMUpload:
        """The current task's test shard's states (no labels).

        ``zero_shot`` (the device's persistent state) gets the frozen backbone's correct count
        for the task, ``argmax W_t·h`` against the device's labels: the device has the whole
        backbone, so it needs no server for that.
        """
        upload = super().eval_upload(server_round)
        if zero_shot is not None:
            index = self.data.task_index(server_round)
            task = self.data.task(index)
            rows = label_rows(self.backbone, task.labels)
            z = torch.from_numpy(upload.arrays["final"]) @ rows.T
            correct = int((z.argmax(-1).numpy() == self._labels(index, "test")).sum())
            zero_shot[task.name] = correct
        return upload
