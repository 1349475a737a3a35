"""Defences of the server's training against poisoning devices.

A poisoning device can send well-formed differences that are scaled up (×100) or flipped in
sign; nothing in an upload's shape or dtype tells them apart from honest ones. The server
cannot decode a target (it is rotated by the devices' secret ``Q``), but an orthogonal
rotation keeps every norm: a defence that looks only at target norms acts the same on
masked and on clear targets, so training on masked targets still gives exactly the rotated
model of clear training (DESIGN, "Server").
"""

from __future__ import annotations

import torch


def clip_target_norms(targets: torch.Tensor, factor: float) -> tuple[torch.Tensor, int]:
    """Clip each target's norm at ``factor ×`` the median norm of ``targets``.

    Parameters
    ----------
    targets : torch.Tensor
        Masked targets ``(N, d)`` of one task.
    factor : float
        ``k`` in "at most ``k`` × median norm"; 0 turns the clipping off.

    Returns
    -------
    tuple[torch.Tensor, int]
        The clipped targets (a new tensor; ``targets`` itself is untouched) and how many
        rows were clipped.

    Notes
    -----
    The median is robust while fewer than half the samples are poisoned. Each row is only
    multiplied by ``min(1, k·m / ‖t‖)``, a factor that depends on norms alone, so
    ``clip(t·Qᵀ) = clip(t)·Qᵀ`` for every orthogonal ``Q``. It bounds what a scaled upload can
    do (its targets count at most ``k`` times a typical one); a sign flip keeps the norm and
    is not touched (measured in RESULTS.md, "Issue 6").
    """
    if factor < 0:
        raise ValueError(f"clip factor must be >= 0, got {factor}")
    if factor == 0 or targets.shape[0] == 0:
        return targets, 0
    if targets.ndim != 2:
        raise ValueError(f"targets must be (N, d), got {tuple(targets.shape)}")
    norms = targets.norm(dim=1)
    bound = factor * norms.median()
    over = norms > bound
    if not bool(over.any()):
        return targets, 0
    scale = torch.where(over, bound / norms.clamp_min(torch.finfo(norms.dtype).tiny), 1.0)
    return targets * scale.unsqueeze(1).to(targets.dtype), int(over.sum())
