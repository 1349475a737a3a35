"""Configuration of the OA-Adapter (Wan, Du, Li et al., 2025)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

OAMode = Literal["adaptive", "fixed"]
OA_MODES: tuple[str, ...] = ("adaptive", "fixed")


@dataclass
class OAAdapterConfig:
    """Hyper-parameters of one OA-Adapter.

    Parameters
    ----------
    r_max : int
        Rank budget: rows of ``W1`` / columns of ``W2``. The active rank is what the soft
        threshold leaves of it.
    tau_init : float
        Initial threshold. 0 keeps every dimension active at the start, so the adapter begins as
        a full-budget one and only prunes what training shows it does not need.
    gate_init : float
        Initial value of every diagonal gate ``g_i`` (so ``γ_i = gate_init − |τ|`` at the start).
    sparsity : float
        Weight of the L1 term ``sparsity · Σ_i |γ_i|``. The paper's soft threshold alone gives no
        reason to prune: the task loss usually wants every dimension. This pressure (our
        addition, not the paper's) is what drives gates down to the threshold, where they switch
        off. 0 disables pruning pressure.
    mode : {"adaptive", "fixed"}
        ``"adaptive"``: ``g`` and ``τ`` are trained (the OA-Adapter). ``"fixed"``: ``γ ≡ 1`` and
        there is no threshold, the fixed-budget O-LoRA-style baseline.
    inactive_grad : float
        Slope of the straight-through gradient given to inactive gates (``|g_i| ≤ |τ|``). The
        exact soft threshold has zero gradient there, so a switched-off dimension could never
        come back; this leak lets the task loss revive it. The forward value is unchanged.
    """

    r_max: int = 16
    tau_init: float = 0.0
    gate_init: float = 1.0
    sparsity: float = 1e-3
    mode: OAMode = "adaptive"
    inactive_grad: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.r_max, int) or isinstance(self.r_max, bool) or self.r_max < 1:
            raise ValueError(f"OAAdapterConfig.r_max must be an integer >= 1, got {self.r_max!r}")
        if self.sparsity < 0:
            raise ValueError(f"OAAdapterConfig.sparsity must be >= 0, got {self.sparsity!r}")
        if self.mode not in OA_MODES:
            raise ValueError(f"OAAdapterConfig.mode must be one of {OA_MODES}, got {self.mode!r}")
        if self.inactive_grad < 0:
            raise ValueError(
                f"OAAdapterConfig.inactive_grad must be >= 0, got {self.inactive_grad!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for run configs and for re-creating a network from its state."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OAAdapterConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)
