"""OA-Adapter: low-rank adapters with an adaptive rank and orthogonal task subspaces.

After Wan, Du, Li et al. (2025). ``config`` holds the settings, ``layer`` the adapter and the
orthogonality loss; the per-task bookkeeping lives in :mod:`flower_pae.side_network`.
"""

from .config import OA_MODES, OAAdapterConfig, OAMode
from .layer import OAAdapter, orthogonality_loss, stacked_gates, stacked_sparsity

__all__ = [
    "OA_MODES",
    "OAAdapter",
    "OAAdapterConfig",
    "OAMode",
    "orthogonality_loss",
    "stacked_gates",
    "stacked_sparsity",
]
