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


def disagreeing_devices(
    features: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor, neighbours: int
) -> list[int]:
    """Devices whose differences point away from those of similar samples of other devices.

    Parameters
    ----------
    features : torch.Tensor
        ``(N, h)`` a representation of each sample in which similar inputs are close: the
        pivot state of the last backbone layer (in clear, as the server holds it).
    targets : torch.Tensor
        ``(N, d)`` the samples' masked differences (or refresh gradients).
    owners : torch.Tensor
        ``(N,)`` integer id of the device that sent each row.
    neighbours : int
        ``k``: each sample is compared with the mean difference of its ``k`` most similar
        samples (cosine of the centred features) among the other devices' rows.

    Returns
    -------
    list[int]
        The excluded devices, in the order they were excluded.

    Notes
    -----
    A device's agreement is the mean over its rows of the cosine between ``t_i`` and the mean
    direction ``t_j / ‖t_j‖`` of its neighbours (directions, so that a few large differences
    cannot outvote the rest).
    While that of the least agreeing device is negative, that device is excluded and every
    agreement is computed again without its rows among the neighbours, so a few flipping
    devices do not drag honest ones below zero with them. A flipped difference keeps its
    norm (:func:`clip_target_norms` cannot see it) but points against the differences of the
    same inputs; an honest device's mean agreement is positive because similar inputs mostly
    share a label. Only cosines between targets enter, and a rotation keeps them, so the
    excluded set is the same for masked and for clear targets.
    """
    if neighbours <= 0:
        raise ValueError(f"neighbours must be > 0, got {neighbours}")
    if not (len(features) == len(targets) == len(owners)):
        raise ValueError("features, targets and owners need one row per sample")
    x = torch.nn.functional.normalize(features.double() - features.double().mean(0), dim=1)
    t = targets.double()
    directions = torch.nn.functional.normalize(t, dim=1)  # a large neighbour counts as one
    similarity = x @ x.T
    similarity[owners[:, None] == owners[None, :]] = -torch.inf  # only other devices' rows
    excluded: list[int] = []
    while True:
        candidates = ~torch.isinf(similarity)
        k = min(neighbours, int(candidates.sum(1).min()) if len(t) else 0)
        if k == 0:
            return excluded
        idx = similarity.topk(k, dim=1).indices
        agreement = torch.nn.functional.cosine_similarity(t, directions[idx].mean(1), dim=1)
        scores = {
            int(o): float(agreement[owners == o].mean())
            for o in owners.unique()
            if int(o) not in excluded
        }
        worst = min(scores, key=scores.get)
        if scores[worst] >= 0 or len(scores) <= 2:
            return excluded
        excluded.append(worst)
        similarity[:, owners == worst] = -torch.inf
