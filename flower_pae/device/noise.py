"""Optional Gaussian noise on the lifted prediction differences, added on the device.

A privacy knob (``target_noise``): before masking, each lifted difference ``t`` gets
isotropic Gaussian noise whose norm is about ``target_noise`` × the RMS norm of the upload's
targets. The scale is one number per upload, not per sample, so the noise does not reveal a
sample's own norm (which, for a clear target, depends on its label). The noise is drawn from
a generator seeded by a keyed hash the server cannot compute, so runs stay reproducible while
the server cannot subtract the noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def add_target_noise(target: torch.Tensor, scale: float, seed: bytes) -> torch.Tensor:
    """Return ``target + noise`` with ``‖noise‖ ≈ scale · RMS_i ‖target_i‖`` per row.

    Parameters
    ----------
    target : torch.Tensor
        Lifted differences of one upload, (N, d).
    scale : float
        ``target_noise``; 0 returns ``target`` unchanged.
    seed : bytes
        At least 8 secret bytes (a keyed hash derived from the cohort secret), all used.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``target``.
    """
    if scale <= 0 or target.numel() == 0:
        return target
    if len(seed) < 8:
        raise ValueError("the noise seed needs at least 8 bytes")
    d = target.shape[-1]
    rms = target.double().pow(2).sum(-1).mean().sqrt()
    # numpy's PCG64 takes the whole seed (torch's CPU generator keeps only 32 bits of it)
    rng = np.random.default_rng(int.from_bytes(seed, "little"))
    noise = torch.from_numpy(rng.standard_normal(tuple(target.shape)))
    return (target.double() + noise * (scale * rms / math.sqrt(d))).to(target.dtype)
