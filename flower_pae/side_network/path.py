"""One task's ladder path as one autograd node, with a hand-written backward.

The recurrence (:class:`~flower_pae.side_network.LadderSideNetwork`)::

    h_1 = x_1 + A_1(x_1)
    inp_l = (1 − μ_l)·x_l + μ_l·h_{l−1},   h_l = inp_l + A_l(inp_l)      (l = 2..L)
    A_l(v) = ((v · W1_lᵀ) ⊙ γ_l) · W2_lᵀ

is sequential in ``l`` and made of small matrix products. Under autograd a training step
recorded some ten ops per layer and replayed them one by one, and the server trains this path
ten epochs every round. Here the forward runs four ops per layer and the backward walks the
layers once, taking each layer's gradients while its tensors are still in cache. The values
and gradients are those of the composed form, up to float rounding
(``tests/test_side_network.py`` compares them in float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def ladder_path(
    x: Tensor, mus: Tensor, gates: Tensor, w1: Sequence[Tensor], w2: Sequence[Tensor]
) -> Tensor:
    """``h_L`` ``(B, d)``, the top of one task's ladder.

    Parameters
    ----------
    x : Tensor
        ``(B, L, d)``, the standardized inputs ``x_l``.
    mus : Tensor
        ``(L − 1,)``, the ladder gates ``μ_l`` of layers ``2..L``.
    gates : Tensor
        ``(L, r)``, the adapters' gates ``γ_l``.
    w1, w2 : sequence of Tensor
        The adapters' ``W1`` ``(r, d)`` and ``W2`` ``(d, r)``, one per layer.
    """
    if len(w1) != x.shape[1] or len(w2) != x.shape[1]:
        raise ValueError(f"{x.shape[1]} layers of inputs, but {len(w1)} W1 and {len(w2)} W2")
    inputs = (x, mus, gates, *w1, *w2)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _LadderPath.apply(*inputs)
    return _forward(x, mus, gates, w1, w2)


def _forward(x, mus, gates, w1, w2, saved: dict[str, list[Tensor]] | None = None) -> Tensor:
    """``h_L``; with ``saved``, keeps each layer's input ``inp_l``, code ``inp_l · W1_lᵀ`` and
    output ``h_l`` (all but the last, the result) for the backward."""
    h = x[:, 0]
    for layer in range(len(w1)):
        if saved is not None and layer > 0:
            saved["outputs"].append(h)
        inp = h if layer == 0 else torch.lerp(x[:, layer], h, mus[layer - 1])
        code = inp @ w1[layer].T
        h = torch.addmm(inp, code * gates[layer], w2[layer].T)
        if saved is not None:
            saved["inputs"].append(inp)
            saved["codes"].append(code)
    return h


class _LadderPath(torch.autograd.Function):
    """First derivatives only: the backward raises under double backward, and ``torch.func``
    transforms do not apply (no ``setup_context``)."""

    @staticmethod
    def forward(ctx, x, mus, gates, *weights):
        layers = len(weights) // 2
        saved: dict[str, list[Tensor]] = {"inputs": [], "codes": [], "outputs": []}
        h = _forward(x, mus, gates, weights[:layers], weights[layers:], saved)
        # through save_for_backward, so that an in-place change to any of them is caught
        ctx.save_for_backward(
            x, mus, gates, *weights, *saved["inputs"], *saved["codes"], *saved["outputs"]
        )
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        x, mus, gates, *rest = ctx.saved_tensors
        layers = len(rest) // 5 + 1  # 2·L weights, L inputs, L codes, L − 1 outputs
        w1, w2 = rest[:layers], rest[layers : 2 * layers]
        inputs, codes = rest[2 * layers : 3 * layers], rest[3 * layers : 4 * layers]
        outputs = rest[4 * layers :]
        need_x, need_mus, need_gates = ctx.needs_input_grad[:3]
        need_w1 = ctx.needs_input_grad[3 : 3 + layers]
        need_w2 = ctx.needs_input_grad[3 + layers :]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_mus = torch.zeros_like(mus) if need_mus else None
        grad_gates = torch.zeros_like(gates) if need_gates else None
        grad_w1: list[Tensor | None] = [None] * layers
        grad_w2: list[Tensor | None] = [None] * layers
        g = grad_h  # ∂loss/∂h_l, walking down from the top
        for layer in range(layers - 1, -1, -1):
            gamma, code = gates[layer], codes[layer]
            grad_gated = g @ w2[layer]  # ∂loss/∂(code ⊙ γ)
            grad_code = grad_gated * gamma
            if need_gates:
                grad_gates[layer] = (grad_gated * code).sum(0)
            if need_w2[layer]:
                grad_w2[layer] = g.T @ (code * gamma)
            if need_w1[layer]:
                grad_w1[layer] = grad_code.T @ inputs[layer]
            if layer == 0:
                if need_x:
                    grad_x[:, 0] = torch.addmm(g, grad_code, w1[0])
                break
            grad_inp = torch.addmm(g, grad_code, w1[layer])
            mu = mus[layer - 1]
            if need_mus:  # inp_l = x_l + μ_l·(h_{l−1} − x_l)
                below = outputs[layer - 1] - x[:, layer]
                grad_mus[layer - 1] = torch.vdot(grad_inp.flatten(), below.flatten())
            if need_x:
                grad_x[:, layer] = grad_inp * (1 - mu)
            g = grad_inp * mu
        return grad_x, grad_mus, grad_gates, *grad_w1, *grad_w2
