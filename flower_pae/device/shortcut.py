"""The activation shortcut: one inference-mode forward, keep one vector per selected layer.

The pivot is the last prompt position, where the label word is predicted. For each selected
layer we keep its hidden state there, ``A ∈ R^{L×d}``; every other position is dropped. The
``"mean"`` shortcut keeps instead, per layer, the mean of the prompt's hidden states over its
tokens (same shape, same bytes; an extension of the paper's pivot-only shortcut, measured in
RESULTS.md). Either way the backbone's own label logits come from the pivot's final state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flower_pae.backbone import Backbone
from flower_pae.wire import SHORTCUTS as SHORTCUTS  # where the choices are defined
from flower_pae.wire import summarize_sequences


@dataclass
class PivotFeatures:
    """Backbone outputs at the pivot token for a batch of prompts."""

    acts: torch.Tensor  # (N, L, d) hidden states of the selected layers
    final: torch.Tensor  # (N, d) final normed hidden state h (what the LM head reads)
    seconds: float  # wall time of the forward passes
    tokens: int  # prompt tokens processed


def truncate_text(backbone: Backbone, text: str, max_tokens: int) -> str:
    """Cut a text to ``max_tokens`` tokens so the prompt's end (the pivot) always survives."""
    ids = backbone.tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return text
    return backbone.tokenizer.decode(ids[:max_tokens])


# The activation store keeps each text's prompt under a key that names this version: change
# it whenever build_prompt (or truncate_text) would build another prompt from the same input.
PROMPT_FORMAT = "1"


def build_prompt(backbone: Backbone, task, text: str, max_tokens: int) -> str:
    """The device's prompt for a sample: its pivot (last token) is where the label word goes.

    Instruction-tuned backbones get their own chat format (the question as the user's turn,
    then ``Answer:`` opening the assistant's); others get the plain prompt. Measured on
    agnews with SmolLM2-135M-Instruct: zero-shot 58% with the chat format, 24% without.
    Changing what it builds needs a new :data:`PROMPT_FORMAT`.
    """
    question = task.question(truncate_text(backbone, text, max_tokens))
    tok = backbone.tokenizer
    if getattr(tok, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{head}Answer:"
    return f"{question}\nAnswer:"


def _forwards(backbone: Backbone, prompts: Sequence[str], batch_size: int):
    """One inference-mode forward per batch of prompts (left-padded): yields each batch's
    attention mask and hidden states (embeddings first, one per layer)."""
    if not prompts:  # nothing to forward: the weights need not load
        return
    # The decoder body only: the LM head's logits over the whole vocabulary at every
    # position (B × T × 49k floats for SmolLM2) are never needed on the device.
    tok, model = backbone.tokenizer, backbone.model.get_decoder()
    for i in range(0, len(prompts), batch_size):
        enc = tok(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
        mask = enc["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: real tokens from 0
        out = model(
            input_ids=enc["input_ids"],
            attention_mask=mask,
            position_ids=positions,
            output_hidden_states=True,
            use_cache=False,
        )
        yield mask, out.hidden_states


@torch.inference_mode()
def pivot_features(
    backbone: Backbone,
    prompts: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 8,
    shortcut: str = "pivot",
) -> PivotFeatures:
    """Run the frozen backbone once per prompt and keep one state per selected layer: the
    pivot token's, or (``shortcut="mean"``) the mean over the prompt's tokens."""
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    acts, finals, tokens = [], [], 0
    if prompts:
        backbone.load()  # not on the clock
    start = time.perf_counter()
    for mask, hidden in _forwards(backbone, prompts, batch_size):
        finals.append(hidden[-1][:, -1, :].float())
        if shortcut == "pivot":
            states = torch.stack([hidden[i][:, -1, :] for i in layers], dim=1)
        else:  # the mean over real tokens; left padding is masked out
            weights = (mask / mask.sum(-1, keepdim=True)).unsqueeze(-1).to(hidden[0])
            states = torch.stack([(hidden[i] * weights).sum(1) for i in layers], dim=1)
        acts.append(states.float())  # (B, L, d)
        tokens += int(mask.sum())
    seconds = time.perf_counter() - start
    d = backbone.hidden_size
    if not acts:
        empty = torch.zeros(0, len(layers), d)
        return PivotFeatures(empty, torch.zeros(0, d), seconds, 0)
    return PivotFeatures(torch.cat(acts), torch.cat(finals), seconds, tokens)


@dataclass
class SequenceFeatures:
    """Every prompt token's states: what a device would upload without the shortcut."""

    # (ΣT, L, d): each prompt's real tokens in order, prompts one after another
    states: torch.Tensor
    lengths: torch.Tensor  # (N,) int64: each prompt's token count
    final: torch.Tensor  # (N, d) final normed hidden state at the pivot
    seconds: float

    def summary(self, shortcut: str) -> torch.Tensor:
        """(N, L, d): what :func:`pivot_features` keeps, from these states."""
        return summarize_sequences(self.states, self.lengths, shortcut)


@torch.inference_mode()
def sequence_features(
    backbone: Backbone, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 8
) -> SequenceFeatures:
    """Run the frozen backbone once per prompt and keep every real token's state per selected
    layer (the "no shortcut" ablation)."""
    states, lengths, finals = [], [], []
    if prompts:
        backbone.load()  # not on the clock
    start = time.perf_counter()
    for mask, hidden in _forwards(backbone, prompts, batch_size):
        finals.append(hidden[-1][:, -1, :].float())
        per_layer = torch.stack([hidden[i] for i in layers], dim=2)  # (B, T, L, d)
        real = mask.bool()
        states.append(per_layer[real].float())  # row-major: prompt by prompt, tokens in order
        lengths.append(mask.sum(-1))
    seconds = time.perf_counter() - start
    d = backbone.hidden_size
    if not states:
        return SequenceFeatures(
            torch.zeros(0, len(layers), d),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, d),
            seconds,
        )
    return SequenceFeatures(torch.cat(states), torch.cat(lengths), torch.cat(finals), seconds)


def label_rows(backbone: Backbone, labels: Sequence[str]) -> torch.Tensor:
    """Frozen LM-head rows of the label words, ``W_t ∈ R^{C×d}``.

    A label word of several tokens (" very negative") is scored by the mean of its tokens'
    rows, so labels that share a first token (" very") still get distinct rows and the
    shortcut stays at the pivot position. For a one-token label this is exactly the
    model's own logit for that token. Rows can be linearly dependent (amazon's five
    sentiment labels span only four dimensions: "very negative" − "negative" =
    "very positive" − "positive" up to a factor); ``pinv`` then lifts the least-squares
    part of a residual, and every class stays reachable by argmax since no row lies in
    the convex hull of the others.
    """
    weight = backbone.lm_head_weight().float()
    rows = []
    for label in labels:
        ids = backbone.tokenizer(" " + label, add_special_tokens=False).input_ids
        rows.append(weight[ids].mean(dim=0))
    w = torch.stack(rows)
    if torch.cdist(w, w).add(torch.eye(len(labels))).min() < 1e-6:
        raise ValueError(f"label words {list(labels)} do not give distinct LM-head rows")
    return w
