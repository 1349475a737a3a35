"""Device-defined prediction differences, and the device's additive prediction.

The server never sees a label: it sees ``Q·t``, where ``t = pinv(W_t)·(onehot(y) −
softmax(z))`` lifts the residual the side network must add into the backbone's hidden space,
and ``Q`` is the cohort's secret rotation.

Every such difference lies in the C-dimensional span of ``Q·W_tᵀ`` (C labels), and so does
all of the side output a device's prediction reads (``W_t·Qᵀ`` is zero on its complement).
Both therefore cross the wire as C coefficients in the task's *masked label basis*
``U_t = Q·orth(W_tᵀ)·P_t`` (``P_t``: a secret rotation of the C coordinates), sent once with a
task's first upload: exact, and d/C times smaller (576/4 on AG News). Given the differences
the server could compute such a basis itself, up to a rotation of it; ``P_t`` makes the sent
one a uniformly random choice among those, so the basis adds nothing to what it learns.
"""

from __future__ import annotations

import torch


def residual(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``onehot(y) − softmax(z)``: what must be added to the backbone's label distribution."""
    onehot = torch.nn.functional.one_hot(labels.long(), logits.shape[-1]).to(logits.dtype)
    return onehot - torch.softmax(logits, dim=-1)


def lift(rows: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``t = pinv(W_t)·r`` for each row of ``r``: the hidden-space vector with ``W_t·t = r``."""
    return r.double() @ torch.linalg.pinv(rows.double()).T


def mask(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotate hidden-space targets by the secret ``Q`` (row vectors: ``t·Qᵀ``)."""
    return (t.double() @ q.T).float()


def label_basis(rows: torch.Tensor, q: torch.Tensor, gauge: torch.Tensor) -> torch.Tensor:
    """The task's masked label basis ``U_t = Q·orth(W_tᵀ)·P_t``, (d, C) float64, orthonormal.

    Parameters
    ----------
    rows : torch.Tensor
        The label rows ``W_t``, (C, d).
    q : torch.Tensor
        The secret mask ``Q``, (d, d).
    gauge : torch.Tensor
        A secret rotation ``P_t`` of the C coordinates, (C, C).
    """
    frame, _ = torch.linalg.qr(rows.double().T)
    return q.double() @ frame @ gauge.double()


def unmask(s_masked: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Decode the side network's masked output: ``s = Qᵀ·s̃`` (row vectors: ``s̃·Q``)."""
    return (s_masked.double() @ q).float()


def gradient_difference(
    logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, side: torch.Tensor
) -> torch.Tensor:
    """``W_tᵀ·(onehot(y) − softmax(z + W_t·s))``: the refresh phase's difference.

    The negative gradient of the cross-entropy of ``z + W_t·s`` with respect to the side output
    ``s``, in hidden space. A server that regresses ``s`` onto ``s + η·g`` every round follows
    cross-entropy (functional gradient descent) without seeing a label.
    """
    r = residual(logits.double() + side.double() @ rows.double().T, labels)
    return r @ rows.double()


def additive_prediction(
    logits: torch.Tensor, rows: torch.Tensor, side: torch.Tensor, space: str = "prob"
) -> torch.Tensor:
    """The backbone's prediction plus the side correction, through the frozen label rows.

    ``space="prob"``: ``argmax(softmax(z) + W_t·s)`` (one-shot differences);
    ``space="logit"``: ``argmax(z + W_t·s)`` (refreshed cross-entropy differences).
    """
    if space == "logit":
        return (logits + side @ rows.T).argmax(dim=-1)
    if space != "prob":
        raise ValueError(f"space must be 'prob' or 'logit', got {space!r}")
    return (torch.softmax(logits, dim=-1) + side @ rows.T).argmax(dim=-1)
