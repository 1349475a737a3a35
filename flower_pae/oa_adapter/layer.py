"""The OA-Adapter layer and its orthogonality loss.

``adapter(x) = W2 · diag(γ) · W1 · x`` with the soft-thresholded gate
``γ_i = sign(g_i) · max(|g_i| − |τ|, 0)``. Dimensions with ``γ_i = 0`` are inactive: they cost
no parameters, and (through a straight-through gradient) they can come back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import OAAdapterConfig


def _abs_with_unit_grad_at_zero(t: Tensor) -> Tensor:
    """``|t|`` whose gradient at 0 is +1, not 0.

    ``torch.abs`` has zero gradient at 0, so a threshold initialised at ``τ = 0`` (the default)
    would never move. With +1 the loss can raise it; if it pushes it below 0 the value is
    mirrored, so the effective threshold is always non-negative.
    """
    return torch.where(t >= 0, t, -t)


class _SoftGate(torch.autograd.Function):
    """``γ = sign(g)·relu(|g| − t)`` with the straight-through slope for inactive gates.

    One autograd node instead of a dozen: the gate sits in every adapter of every ladder step,
    so its graph was most of the side network's backward pass. Gradients, exactly those of the
    composed form ``soft + c·[soft = 0]·(g − g.detach())``: ``∂γ/∂g`` is 1 where the gate is
    active and ``c`` (``inactive_grad``) where it is not; ``∂γ/∂t`` is ``−sign(g)`` where
    active, else 0.
    """

    @staticmethod
    def forward(ctx, g: Tensor, threshold: Tensor, inactive_grad: float) -> Tensor:
        soft = torch.sign(g) * torch.relu(g.abs() - threshold)
        active = soft != 0
        ctx.save_for_backward(g, active)
        ctx.inactive_grad = inactive_grad
        ctx.threshold_shape = threshold.shape
        return soft

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        g, active = ctx.saved_tensors
        grad_g = torch.where(active, grad, grad * ctx.inactive_grad)
        # a threshold shared by a row of gates (or by all of them) gets the row's summed slope
        grad_t = -(grad * torch.sign(g) * active).sum_to_size(ctx.threshold_shape)
        return grad_g, grad_t, None


class OAAdapter(nn.Module):
    """Low-rank adapter with an adaptive rank (OA-Adapter).

    Parameters
    ----------
    d_in, d_out : int
        Input and output widths.
    config : OAAdapterConfig
        Rank budget, threshold, gate and pruning settings.
    zero_init_output : bool
        Start ``W2`` at zero, so a new adapter adds nothing until it is trained (earlier tasks'
        outputs are untouched at the start of a new task), and so that an output map written in
        a rotated space stays exactly the rotation of the clear one under SGD.
    generator : torch.Generator, optional
        Source of the initial weights, so a network can be re-created identically without
        touching the global RNG.

    Notes
    -----
    The threshold is stored raw as ``tau`` and used as ``|tau|`` (with gradient +1 at 0), which
    keeps it non-negative without the offset a softplus would give at ``tau_init = 0``.

    The exact soft threshold has zero gradient for an inactive gate, so a dimension once switched
    off could never return, although the paper says it can. Inactive gates therefore get a
    straight-through gradient of slope ``config.inactive_grad``: the forward value is exactly 0,
    the backward pass treats ``γ_i`` as ``g_i``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        config: OAAdapterConfig | None = None,
        zero_init_output: bool = True,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if d_in < 1 or d_out < 1:
            raise ValueError(f"OAAdapter widths must be >= 1, got d_in={d_in}, d_out={d_out}")
        self.config = config if config is not None else OAAdapterConfig()
        self.d_in = int(d_in)
        self.d_out = int(d_out)
        self.frozen = False
        r = self.config.r_max
        kw = {"dtype": dtype if dtype is not None else torch.get_default_dtype()}
        self.W1 = nn.Parameter(torch.empty(r, self.d_in, **kw))
        self.W2 = nn.Parameter(torch.zeros(self.d_out, r, **kw))
        self.g = nn.Parameter(torch.full((r,), float(self.config.gate_init), **kw))
        self.tau = nn.Parameter(torch.tensor(float(self.config.tau_init), **kw))
        # peft's LoRA "A" init: small uniform, variance 1/(3·d_in).
        nn.init.kaiming_uniform_(self.W1, a=math.sqrt(5), generator=generator)
        if not zero_init_output:
            nn.init.kaiming_uniform_(self.W2, a=math.sqrt(5), generator=generator)
        if self.config.mode == "fixed":
            # γ ≡ 1 and no threshold: g and τ are kept only so every mode has the same state.
            self.g.requires_grad_(False)
            self.tau.requires_grad_(False)

    @property
    def adaptive(self) -> bool:
        """Whether the gates and threshold are trained (mode ``"adaptive"``)."""
        return self.config.mode == "adaptive"

    def threshold(self) -> Tensor:
        """Effective non-negative threshold ``|τ|`` (0 in fixed mode)."""
        if not self.adaptive:
            return torch.zeros((), dtype=self.tau.dtype, device=self.tau.device)
        return _abs_with_unit_grad_at_zero(self.tau)

    def gate(self) -> Tensor:
        """Diagonal gate ``γ = sign(g)·relu(|g| − |τ|)``, straight-through where inactive."""
        if not self.adaptive:
            return torch.ones_like(self.g)
        return _SoftGate.apply(self.g, self.threshold(), float(self.config.inactive_grad))

    def forward(self, x: Tensor) -> Tensor:
        """``((x · W1ᵀ) ⊙ γ) · W2ᵀ``, over the last dimension of ``x``."""
        return ((x @ self.W1.T) * self.gate()) @ self.W2.T

    @torch.no_grad()
    def active_mask(self) -> Tensor:
        """Boolean mask of the dimensions with ``γ_i ≠ 0``."""
        return self.gate() != 0

    def active_rank(self) -> int:
        """Number of active dimensions."""
        return int(self.active_mask().sum().item())

    def active_params(self) -> int:
        """Parameters that count: ``k·(d_in + d_out)`` plus ``k`` gates (adaptive mode only)."""
        k = self.active_rank()
        return k * (self.d_in + self.d_out) + (k if self.adaptive else 0)

    @torch.no_grad()
    def active_basis(self) -> Tensor:
        """``W2[:, active] · γ[active]``, detached: the subspace this adapter actually writes to.

        This is what becomes a historical subspace once the task ends (all columns in fixed mode,
        as in O-LoRA).
        """
        gamma = self.gate()
        mask = gamma != 0
        return (self.W2[:, mask] * gamma[mask]).detach().clone()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters an optimizer should update (none once frozen; no g, τ in fixed mode)."""
        if self.frozen:
            return []
        params = [self.W1, self.W2]
        if self.adaptive:
            params += [self.g, self.tau]
        return params

    def sparsity_penalty(self) -> Tensor:
        """``sparsity · Σ|γ|``: the pressure that prunes gates (0 in fixed mode)."""
        if not self.adaptive or self.config.sparsity == 0:
            return torch.zeros((), dtype=self.g.dtype, device=self.g.device)
        # |γ| = relu(|g| − |τ|) in value and in gradient: the gate's straight-through term is
        # zero in value and |·| has no slope at zero. This form is a few ops cheaper.
        return self.config.sparsity * torch.relu(self.g.abs() - self.threshold()).sum()

    def freeze(self) -> None:
        """Stop training this adapter for good (its task has ended); drops stale gradients."""
        for p in self.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.frozen = True

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, r_max={self.config.r_max}, "
            f"mode={self.config.mode}, frozen={self.frozen}"
        )


def stacked_gates(adapters: list[OAAdapter]) -> Tensor:
    """The gates ``γ`` of adapters of one rank and config, as rows of one ``(n, r)`` tensor.

    One autograd node for a whole ladder instead of one small graph per layer; the values and
    gradients are each adapter's :meth:`OAAdapter.gate`.
    """
    first = adapters[0]
    if not first.adaptive:
        return torch.ones(
            len(adapters), first.config.r_max, dtype=first.g.dtype, device=first.g.device
        )
    g, threshold = _stacked_gate_inputs(adapters)
    return _SoftGate.apply(g, threshold, float(first.config.inactive_grad))


def stacked_sparsity(adapters: list[OAAdapter]) -> Tensor:
    """The summed :meth:`OAAdapter.sparsity_penalty` of adapters of one rank and config, in
    one op (the same gradient; the sum in another float order)."""
    first = adapters[0]
    if not first.adaptive or first.config.sparsity == 0:
        return torch.zeros((), dtype=first.g.dtype, device=first.g.device)
    g, threshold = _stacked_gate_inputs(adapters)
    return first.config.sparsity * torch.relu(g.abs() - threshold).sum()


def _stacked_gate_inputs(adapters: list[OAAdapter]) -> tuple[Tensor, Tensor]:
    """The adapters' raw gates ``g`` (n, r) and effective thresholds ``|τ|`` (n, 1), stacked."""
    g = torch.stack([a.g for a in adapters])
    threshold = _abs_with_unit_grad_at_zero(torch.stack([a.tau for a in adapters]))
    return g, threshold[:, None]


def orthogonality_loss(current_W2: Tensor, historical: list[Tensor]) -> Tensor:
    """``Σ_s ‖current_W2ᵀ · H_s‖_F²``: how much the current task writes into earlier subspaces.

    Parameters
    ----------
    current_W2 : Tensor
        ``(d_out, r)`` output-side weights of the adapter being trained.
    historical : list of Tensor
        ``(d_out, k_s)`` bases of earlier tasks (see :meth:`OAAdapter.active_basis`); a basis
        with ``k_s = 0`` contributes nothing.

    Returns
    -------
    Tensor
        Scalar; zero for an empty list. Invariant to a common rotation of the output space.
    """
    for h in historical:
        if h.ndim != 2 or h.shape[0] != current_W2.shape[0]:
            raise ValueError(
                f"historical basis of shape {tuple(h.shape)} does not match current W2 of shape "
                f"{tuple(current_W2.shape)} (need ({current_W2.shape[0]}, k))"
            )
    bases = [h for h in historical if h.shape[1]]
    if not bases:
        return current_W2.new_zeros(())
    # Σ_s ‖W2ᵀ·H_s‖² = ‖W2ᵀ·[H_1 … H_S]‖²: one product for all earlier tasks.
    h = torch.cat(bases, dim=1).to(device=current_W2.device, dtype=current_W2.dtype)
    return (current_W2.T @ h).pow(2).sum()
