"""OA-Adapter: soft threshold, revival of inactive dims, modes, orthogonality loss."""

from __future__ import annotations

import pytest
import torch

from flower_pae.oa_adapter import OAAdapter, OAAdapterConfig, orthogonality_loss


def _orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


@pytest.mark.parametrize(
    "kwargs",
    [{"r_max": 0}, {"r_max": -3}, {"sparsity": -1e-3}, {"mode": "lora"}, {"inactive_grad": -1}],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        OAAdapterConfig(**kwargs)


def test_config_roundtrip() -> None:
    cfg = OAAdapterConfig(r_max=4, sparsity=0.1, mode="fixed")
    assert OAAdapterConfig.from_dict(cfg.to_dict()) == cfg


def test_initial_state_all_active_and_zero_output() -> None:
    a = OAAdapter(5, 7, OAAdapterConfig(r_max=4))
    assert a.active_rank() == 4
    assert a.active_params() == 4 * (5 + 7) + 4
    x = torch.randn(3, 5)
    assert torch.equal(a(x), torch.zeros(3, 7))  # W2 starts at zero
    assert a.W1.abs().max() > 0
    assert a.W1.shape == (4, 5) and a.W2.shape == (7, 4)


def test_soft_threshold_values() -> None:
    a = OAAdapter(3, 2, OAAdapterConfig(r_max=4), dtype=torch.float64)
    with torch.no_grad():
        a.g.copy_(torch.tensor([1.0, -0.5, 0.1, -0.2], dtype=torch.float64))
        a.tau.fill_(-0.3)  # used as |τ| = 0.3
    gamma = a.gate()
    torch.testing.assert_close(gamma, torch.tensor([0.7, -0.2, 0.0, 0.0], dtype=torch.float64))
    assert a.active_mask().tolist() == [True, True, False, False]
    assert a.active_rank() == 2
    assert a.active_params() == 2 * (3 + 2) + 2
    basis = a.active_basis()
    assert basis.shape == (2, 2)
    torch.testing.assert_close(basis, a.W2[:, :2].detach() * gamma[:2].detach())
    assert not basis.requires_grad


def test_threshold_at_zero_gets_gradient() -> None:
    """τ starts at 0; torch.abs would have zero gradient there and freeze it."""
    a = OAAdapter(3, 2, OAAdapterConfig(r_max=4, sparsity=1.0))
    a.sparsity_penalty().backward()
    assert a.tau.grad is not None and a.tau.grad.abs() > 0


def _revival_setup(inactive_grad: float) -> tuple[OAAdapter, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    cfg = OAAdapterConfig(r_max=2, sparsity=0.0, inactive_grad=inactive_grad)
    a = OAAdapter(4, 3, cfg, zero_init_output=False, dtype=torch.float64)
    x = torch.randn(64, 4, dtype=torch.float64)
    with torch.no_grad():
        # Target uses dimension 1 with gate 1.0; dimension 0 is not wanted.
        target = (x @ a.W1[1:2].T) @ a.W2[:, 1:2].T
        a.g.copy_(torch.tensor([1.0, 0.05], dtype=torch.float64))
        a.tau.fill_(0.2)
    return a, x, target


def test_inactive_dim_switches_off_and_comes_back() -> None:
    a, x, target = _revival_setup(inactive_grad=1.0)
    assert a.gate()[1].item() == 0.0
    assert a.active_rank() == 1
    out_before = a(x)
    torch.testing.assert_close(out_before, ((x @ a.W1[:1].T) * a.gate()[:1]) @ a.W2[:, :1].T)
    opt = torch.optim.Adam([a.g], lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        loss = (a(x) - target).pow(2).sum(1).mean()
        loss.backward()
        opt.step()
    assert a.active_mask()[1].item(), "dimension 1 should have come back"
    assert a.gate()[1].item() > 0.5
    assert loss.item() < 1e-2


def test_without_straight_through_inactive_dim_gets_no_gradient() -> None:
    """Why the straight-through leak exists: the exact soft threshold is flat when inactive."""
    a, x, target = _revival_setup(inactive_grad=0.0)
    loss = (a(x) - target).pow(2).sum(1).mean()
    loss.backward()
    assert a.g.grad[1].item() == 0.0
    assert a.g.grad[0].item() != 0.0


def test_sparsity_pressure_prunes_unneeded_dims() -> None:
    torch.manual_seed(0)
    cfg = OAAdapterConfig(r_max=8, sparsity=0.05, gate_init=0.3)
    a = OAAdapter(6, 6, cfg, zero_init_output=False, dtype=torch.float64)
    x = torch.randn(128, 6, dtype=torch.float64)
    with torch.no_grad():
        target = (x @ a.W1[:2].T * 0.3) @ a.W2[:, :2].T  # only 2 of 8 dims needed
    opt = torch.optim.Adam(a.trainable_parameters(), lr=0.01)
    for _ in range(600):
        opt.zero_grad()
        loss = (a(x) - target).pow(2).sum(1).mean() + a.sparsity_penalty()
        loss.backward()
        opt.step()
    assert a.active_rank() < 8
    assert a.active_params() < 8 * 12 + 8


@pytest.mark.parametrize("tau", [0.0, 0.4, -0.4])
def test_sparsity_penalty_is_the_l1_norm_of_the_gates(tau: float) -> None:
    """``sparsity · Σ|γ|`` in value and gradient, for active, inactive and sign-flipped gates
    (and a threshold at 0, where ``|τ|`` has a unit slope)."""
    cfg = OAAdapterConfig(r_max=6, sparsity=0.3, inactive_grad=1.0)
    a, b = (OAAdapter(4, 4, cfg, dtype=torch.float64) for _ in range(2))
    for adapter in (a, b):
        with torch.no_grad():
            adapter.g.copy_(torch.tensor([0.9, -0.7, 0.1, -0.2, 0.0, 1.5], dtype=torch.float64))
            adapter.tau.fill_(tau)
    a.sparsity_penalty().backward()
    by_gates = cfg.sparsity * b.gate().abs().sum()
    by_gates.backward()
    assert a.sparsity_penalty().item() == pytest.approx(by_gates.item(), abs=1e-15)
    torch.testing.assert_close(a.g.grad, b.g.grad, rtol=0, atol=1e-15)
    torch.testing.assert_close(a.tau.grad, b.tau.grad, rtol=0, atol=1e-15)
    assert (a.g.grad != 0).any()


def test_fixed_mode_is_plain_low_rank() -> None:
    a = OAAdapter(5, 4, OAAdapterConfig(r_max=3, mode="fixed"))
    assert torch.equal(a.gate(), torch.ones(3))
    assert not a.g.requires_grad and not a.tau.requires_grad
    assert a.active_rank() == 3
    assert a.active_params() == 3 * 9
    assert len(a.trainable_parameters()) == 2
    assert a.sparsity_penalty().item() == 0.0
    assert a.active_basis().shape == (4, 3)


def test_freeze() -> None:
    a = OAAdapter(5, 4, OAAdapterConfig(r_max=3))
    a.freeze()
    assert a.frozen
    assert all(not p.requires_grad for p in a.parameters())
    assert a.trainable_parameters() == []


def test_orthogonality_loss() -> None:
    q = _orthogonal(10)
    w = q[:, :3].clone().requires_grad_(True)
    assert orthogonality_loss(w, []).item() == 0.0
    orth = orthogonality_loss(w, [q[:, 3:6], q[:, 6:8]])
    assert orth.abs().item() < 1e-24
    overlap = orthogonality_loss(w, [q[:, 2:5]])  # shares column 2
    assert overlap.item() == pytest.approx(1.0, abs=1e-12)
    two = orthogonality_loss(w, [q[:, 2:5], 2 * q[:, 0:1]])
    assert two.item() == pytest.approx(1.0 + 4.0, abs=1e-12)
    two.backward()
    assert w.grad is not None and w.grad.abs().max() > 0
    # Invariant to a common rotation of the output space.
    r = _orthogonal(10, seed=1)
    h = torch.randn(10, 4, dtype=torch.float64)
    torch.testing.assert_close(
        orthogonality_loss(r @ w.detach(), [r @ h]), orthogonality_loss(w.detach(), [h])
    )
    assert orthogonality_loss(w, [torch.zeros(10, 0, dtype=torch.float64)]).item() == 0.0
    with pytest.raises(ValueError):
        orthogonality_loss(w, [torch.zeros(9, 2, dtype=torch.float64)])
