"""Device cost accounting: FLOPs estimates and the peak memory of one device step.

The FLOPs are the usual dense-transformer estimate (Kaplan et al., 2020): a forward pass costs
``2·P`` per token, with ``P`` the weights of the matrix multiplications the token goes through
(the decoder body's projections: no embedding lookup, and no LM head, which neither PAE's
device forward nor the label-logit loss computes over the vocabulary). A backward pass costs
``2·P`` per token for the gradients with respect to the activations plus ``2·P`` for those with
respect to the weights, and the latter only for trainable weights. So

- PAE's device step (one inference forward): ``2·P·T``;
- a LoRA training step (forward, backward through the whole frozen body to the lowest
  adapter, weight gradients of the adapters only): ``4·P·T + 6·P_lora·T``.

``T`` counts the prompt tokens actually processed (padding excluded). Attention-score
products (``≈ 4·layers·T·d`` per token) are left out: under 5% at 128-token prompts.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

__all__ = [
    "PeakMemory",
    "forward_flops",
    "lora_step_flops",
    "matmul_params",
]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of the decoder body's matrix multiplications (frozen base weights only).

    Counts the 2-D parameters under the decoder layers (attention and MLP projections);
    embeddings, the LM head, norms and LoRA factors are excluded.

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face causal LM (possibly peft-wrapped) whose decoder has ``layers``.

    Returns
    -------
    int
        ``P`` of the FLOPs estimates.
    """
    layers = _decoder_layers(model)
    return sum(
        p.numel() for name, p in layers.named_parameters() if p.ndim == 2 and "lora_" not in name
    )


def _decoder_layers(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    raise ValueError(f"{type(model).__name__} has no decoder layers (a 'layers' ModuleList)")


def forward_flops(params: int, tokens: int) -> float:
    """FLOPs of an inference forward over ``tokens`` tokens: ``2·P·T``."""
    return 2.0 * params * tokens


def lora_step_flops(params: int, lora_params: int, tokens: int) -> float:
    """FLOPs of a LoRA training step over ``tokens`` tokens: ``4·P·T + 6·P_lora·T``.

    Forward ``2·P·T``; backward ``2·P·T`` for the activation gradients through the frozen body
    (no weight gradients for frozen weights); the adapters' own forward, activation and weight
    gradients ``6·P_lora·T``. The optimizer step (``O(P_lora)``) is negligible.
    """
    return 4.0 * params * tokens + 6.0 * lora_params * tokens


def _status_mb(key: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory of this process while a block runs, in MiB.

    On Linux the high-water mark (``VmHWM``) is reset on entry (``/proc/self/clear_refs``),
    so ``peak_mb`` is the peak of the block itself: what a device needs for that step,
    including the model it holds. Elsewhere (or if the reset is refused) it falls back to
    the process's lifetime peak (``ru_maxrss``), an upper bound; ``exact`` says which.

    Examples
    --------
    >>> with PeakMemory() as mem:
    ...     _ = bytearray(10**6)
    >>> mem.peak_mb > 0
    True
    """

    def __init__(self) -> None:
        self.exact = False
        self.peak_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        try:
            _CLEAR_REFS.write_text("5")
            self.exact = _status_mb("VmHWM") is not None
        except OSError:
            self.exact = False
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_mb("VmHWM") if self.exact else None
        if hwm is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hwm = peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
        self.peak_mb = hwm
