"""Ladder side network and trainer: tasks, freezing, ranks, masked exactness, state."""

from __future__ import annotations

import copy

import pytest
import torch

from flower_pae.oa_adapter import OAAdapterConfig
from flower_pae.side_network import LadderSideNetwork, SideNetworkTrainer, TrainerConfig

N, L, D = 200, 4, 24
F64 = torch.float64


def _data(seed: int = 0, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations with per-layer offsets/scales, and a rank-3 linear target of the last layer."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(N, L, D, generator=gen, dtype=F64) * 2.0 + 0.5
    u = torch.randn(D, 3, generator=gen, dtype=F64) / D**0.5
    v = torch.randn(3, D, generator=gen, dtype=F64)
    targets = acts[:, -1] @ u @ v
    return acts.to(dtype), targets.to(dtype)


def _net(method: str = "oa", r: int = 4, **kw) -> LadderSideNetwork:
    cfg = OAAdapterConfig(r_max=r)
    return LadderSideNetwork(L, D, cfg, out_rank=r, method=method, dtype=F64, **kw)


def _n_params(net: LadderSideNetwork) -> int:
    return sum(p.numel() for p in net.parameters())


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        LadderSideNetwork(0, D)
    with pytest.raises(ValueError):
        LadderSideNetwork(L, D, method="lora")
    with pytest.raises(ValueError):
        LadderSideNetwork(L, D, out_rank=0)


def test_no_task_outputs_zero_and_shape_checks() -> None:
    net = _net()
    acts, _ = _data()
    assert torch.equal(net(acts), torch.zeros(N, D, dtype=F64))
    with pytest.raises(ValueError):
        net(acts[:, :2])
    with pytest.raises(RuntimeError):
        SideNetworkTrainer(net).fit(acts, acts[:, 0])


def test_method_forces_gate_mode() -> None:
    assert _net("oa").adapter_config.mode == "adaptive"
    assert _net("olora").adapter_config.mode == "fixed"


def test_add_task_allocates_params() -> None:
    net = _net()
    base = _n_params(net)
    assert net.add_task("a") is True
    one = _n_params(net)
    assert one > base
    assert net.add_task("a") is False
    assert _n_params(net) == one
    assert net.add_task("b") is True
    assert _n_params(net) - one == one - base
    assert net.task_keys == ["a", "b"] and net.current_task == "b"
    assert net.is_frozen("a") and not net.is_frozen("b")  # a new task ends the previous one
    with pytest.raises(ValueError):
        net.add_task("")


def test_sequential_shares_one_adapter_set() -> None:
    net = _net("sequential")
    assert net.add_task("a") is True
    one = _n_params(net)
    assert net.add_task("b") is False
    assert _n_params(net) == one
    net.freeze_task("a")
    assert not net.is_frozen("a") and not net.is_frozen("b")
    assert net.task_keys == ["a", "b"] and net.current_task == "b"
    acts, t = _data()
    tr = SideNetworkTrainer(net, TrainerConfig(epochs=1))
    tr.fit(acts, t)
    assert net.orthogonality_penalty().item() == 0.0
    assert not net.alpha.requires_grad  # α trains only with the first task
    assert {row["task"] for row in net.rank_report()} == {"b"}


def test_fit_reduces_loss_and_learns() -> None:
    acts, t = _data()
    net = _net(r=8)
    net.add_task("a")
    tr = SideNetworkTrainer(net, TrainerConfig(epochs=30, batch_size=32, lr=3e-3, out_lr=0.02))
    hist = tr.fit(acts, t)
    assert len(hist["loss"]) == 30
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    zero_mse = float(t.pow(2).sum(1).mean())
    assert tr.evaluate_mse(acts, t) < 0.2 * zero_mse
    # Held-out samples of the same function are fitted too (the map is learned, not memorised).
    acts2, t2 = _data(seed=0)
    gen = torch.Generator().manual_seed(5)
    new_acts = torch.randn(100, L, D, generator=gen, dtype=F64) * 2.0 + 0.5
    u_v = torch.linalg.lstsq(acts2[:, -1], t2).solution
    new_t = new_acts[:, -1] @ u_v
    assert tr.evaluate_mse(new_acts, new_t) < 0.5 * float(new_t.pow(2).sum(1).mean())


def test_float32_default() -> None:
    acts, t = _data(dtype=torch.float32)
    net = LadderSideNetwork(L, D, OAAdapterConfig(r_max=4), out_rank=4)
    assert net.alpha.dtype == torch.float32
    net.add_task("a")
    tr = SideNetworkTrainer(net, TrainerConfig(epochs=2))
    hist = tr.fit(acts, t)
    assert hist["loss"][-1] < hist["loss"][0]
    assert tr.predict(acts).dtype == torch.float32


def test_standardizer_fitted_once() -> None:
    acts, t = _data()
    net = _net()
    net.add_task("a")
    x = net.input_mean.clone()
    assert torch.equal(x, torch.zeros(L, D, dtype=F64))
    SideNetworkTrainer(net, TrainerConfig(epochs=1)).fit(acts, t)
    assert bool(net.standardizer_fitted)
    torch.testing.assert_close(net.input_mean, acts.mean(0))
    assert net.fit_standardizer(acts * 3 + 1) is False
    torch.testing.assert_close(net.input_mean, acts.mean(0))
    assert net.fit_standardizer(acts * 3 + 1, force=True) is True


def test_frozen_task_unchanged_by_new_task() -> None:
    acts, t = _data()
    net = _net()
    net.add_task("a")
    tr = SideNetworkTrainer(net, TrainerConfig(epochs=3))
    tr.fit(acts, t)
    assert net.alpha.requires_grad
    alpha_before = net.alpha.detach().clone()
    net.freeze_task("a")
    assert not net.alpha.requires_grad
    set_a = net.task_sets[0]
    before = {k: v.clone() for k, v in set_a.state_dict().items()}
    net.add_task("b")
    hist = tr.fit(acts, -t)
    assert hist["loss"][-1] < hist["loss"][0]
    for name, p in set_a.named_parameters():
        assert not p.requires_grad
        assert p.grad is None, name
        assert torch.equal(p.detach(), before[name]), name
    assert torch.equal(net.alpha.detach(), alpha_before)
    # The new task did train.
    assert net.task_sets[1].out.W2.abs().max() > 0


def test_orthogonality_penalty_and_bases() -> None:
    acts, t = _data()
    results = {}
    for lam in (0.0, 20.0):
        net = _net()
        net.add_task("a")
        tr = SideNetworkTrainer(net, TrainerConfig(epochs=5, lambda_orth=lam))
        tr.fit(acts, t)
        assert net.orthogonality_penalty().item() == 0.0  # first task: no history
        net.add_task("b")
        assert net.orthogonality_penalty().item() == 0.0  # new W2 starts at zero
        tr.fit(acts, t)
        results[lam] = net.orthogonality_penalty().item()
    assert results[0.0] > 0
    assert results[20.0] < 0.2 * results[0.0]


def test_historical_bases_active_vs_all_columns() -> None:
    for method, expected in (("oa", 3), ("olora", 4)):
        net = _net(method)
        net.add_task("a")
        with torch.no_grad():
            for a in [*net.task_sets[0].layers, net.task_sets[0].out]:
                a.W2.normal_()
                a.g[0] = 0.0  # switch one dim off (no effect in fixed mode)
        net.add_task("b")
        for slot in [*range(L), "out"]:
            (basis,) = net.historical_bases(slot)
            assert basis.shape == (D, expected)


def test_rank_report_counts() -> None:
    net = _net(r=4)
    net.add_task("a")
    net.add_task("b")
    with torch.no_grad():
        net.task_sets[1].layers[2].g[:2] = 0.0
        net.task_sets[0].out.tau.fill_(10.0)  # everything below threshold
    rows = net.rank_report()
    assert len(rows) == 2 * (L + 1)
    by = {(r["task"], r["layer"]): r for r in rows}
    assert by[("a", 0)]["active_rank"] == 4
    assert by[("a", 0)]["active_params"] == 4 * (2 * D) + 4
    assert by[("b", 2)]["active_rank"] == 2
    assert by[("b", 2)]["active_params"] == 2 * (2 * D) + 2
    assert by[("a", "out")]["active_rank"] == 0
    assert by[("a", "out")]["active_params"] == 0
    assert net.active_params() == sum(r["active_params"] for r in rows) + (L - 1)


def _train_pair(out_optimizer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acts, t = _data()
    gen = torch.Generator().manual_seed(123)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=F64))
    cfg = TrainerConfig(epochs=5, seed=7, out_optimizer=out_optimizer)
    preds = []
    for targets in (t, t @ q.T):
        net = _net("oa", r=8, seed=3)
        net.add_task("a")
        tr = SideNetworkTrainer(net, cfg)
        tr.fit(acts, targets)
        # A second task, so the orthogonality penalty (also rotation-invariant) is exercised.
        net.add_task("b")
        tr.fit(acts, targets * 0.5, epochs=2)
        preds.append(tr.predict(acts))
    return preds[0], preds[1], q


def test_masked_training_is_exact() -> None:
    """KEY: training on Q·t gives Q·(model trained on t): the server loses nothing by the mask."""
    clear, masked, q = _train_pair("sgd")
    assert clear.abs().max() > 1e-2  # trained to something non-trivial
    decoded = masked @ q  # s = Qᵀ·s̃ row-wise
    assert (decoded - clear).abs().max().item() < 1e-8
    gen = torch.Generator().manual_seed(9)
    readout = torch.randn(5, D, generator=gen, dtype=F64)
    z = torch.randn(N, 5, generator=gen, dtype=F64)
    assert torch.equal((z + clear @ readout.T).argmax(1), (z + decoded @ readout.T).argmax(1))


def test_adam_on_output_breaks_exactness() -> None:
    """Why the output W2 uses SGD: Adam scales each masked coordinate on its own."""
    clear, masked, q = _train_pair("adam")
    assert (masked @ q - clear).abs().max().item() > 1e-4


def test_deterministic_and_rounds_continue_optimizer() -> None:
    acts, t = _data()
    nets = [_net(seed=1) for _ in range(2)]
    for n in nets:
        n.add_task("a")
    s0, s1 = (n.state_dict() for n in nets)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    # Two fit() calls of 1 epoch == one call of 2 epochs (optimizer state and shuffling persist).
    tr0 = SideNetworkTrainer(nets[0], TrainerConfig(seed=4))
    tr0.fit(acts, t, epochs=1)
    opts = list(tr0._optimizers)
    tr0.fit(acts, t, epochs=1)
    assert tr0._optimizers == opts
    tr1 = SideNetworkTrainer(nets[1], TrainerConfig(seed=4))
    tr1.fit(acts, t, epochs=2)
    torch.testing.assert_close(tr0.predict(acts), tr1.predict(acts), rtol=0, atol=1e-12)
    nets[0].add_task("b")
    tr0.fit(acts, t, epochs=1)
    assert all(o not in opts for o in tr0._optimizers)  # reset on a new task


def test_state_round_trip_two_tasks() -> None:
    acts, t = _data()
    net = _net(seed=2)
    net.add_task("task/a")
    tr = SideNetworkTrainer(net, TrainerConfig(epochs=2))
    tr.fit(acts, t)
    net.add_task("task.b")
    tr.fit(acts, -t)
    meta, state = net.meta(), copy.deepcopy(net.state_dict())
    assert meta["task_keys"] == ["task/a", "task.b"] and meta["frozen"] == [True, False]
    other = LadderSideNetwork.from_state(meta, state)
    assert other.meta() == meta
    assert other.is_frozen("task/a") and not other.is_frozen("task.b")
    assert other.current_task == "task.b"
    assert not other.alpha.requires_grad
    torch.testing.assert_close(other(acts), net(acts), rtol=0, atol=0)
    assert other.rank_report() == net.rank_report()
    torch.testing.assert_close(other.orthogonality_penalty(), net.orthogonality_penalty())
    # Training continues on the restored network.
    SideNetworkTrainer(other, TrainerConfig(epochs=1)).fit(acts, -t)
    for o in (net, other):
        assert o.task_sets[0].out.W2.requires_grad is False


def test_state_round_trip_sequential() -> None:
    net = _net("sequential")
    net.add_task("a")
    net.add_task("b")
    other = LadderSideNetwork.from_state(net.meta(), net.state_dict())
    assert len(other.task_sets) == 1 and other.task_keys == ["a", "b"]


def test_privacy_boundary_imports() -> None:
    """Server-side modules import nothing from the device side (secret, masking)."""
    import ast
    import pathlib

    import flower_pae.oa_adapter as oa
    import flower_pae.side_network as sn

    files = [*pathlib.Path(sn.__file__).parent.glob("*.py")]
    files += [*pathlib.Path(oa.__file__).parent.glob("*.py")]
    assert len(files) >= 6
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            assert not any("device" in n for n in names), (f, names)


def test_a_later_task_never_changes_an_earlier_tasks_predictions() -> None:
    """With the earlier task's label span protected, its predictions (the output read through
    its label rows) are exactly what they were, and the later task still learns its own."""
    acts, t = _data()
    gen = torch.Generator().manual_seed(5)
    rows_a = torch.randn(3, D, generator=gen, dtype=F64)  # task a's label rows (clear = masked)
    rows_b = torch.randn(4, D, generator=gen, dtype=F64)
    span_a, _ = torch.linalg.qr(rows_a.T)
    span_b, _ = torch.linalg.qr(rows_b.T)
    net = _net()
    net.add_task("a")
    SideNetworkTrainer(net, TrainerConfig(epochs=3)).fit(acts, t @ span_a @ span_a.T)
    before = net(acts).detach()
    free = copy.deepcopy(net)
    net.add_task("b", protected=span_a)
    assert net.meta()["protected_dims"] == [0, 3]
    target_b = -t @ span_b @ span_b.T  # in task b's label span
    hist = SideNetworkTrainer(net, TrainerConfig(epochs=3)).fit(acts, target_b)
    assert hist["loss"][-1] < hist["loss"][0]
    after = net(acts).detach()
    torch.testing.assert_close(after @ rows_a.T, before @ rows_a.T, rtol=0, atol=1e-10)
    assert ((after - before) @ rows_b.T).abs().max() > 1e-2  # task b learned through its rows
    # without protection the same training moves task a's predictions
    free.add_task("b")
    SideNetworkTrainer(free, TrainerConfig(epochs=3)).fit(acts, target_b)
    assert (free(acts).detach() @ rows_a.T - before @ rows_a.T).abs().max() > 1e-3
    # the protected directions travel with the network's state
    other = LadderSideNetwork.from_state(net.meta(), net.state_dict())
    torch.testing.assert_close(other(acts), net(acts), rtol=0, atol=0)
    with pytest.raises(ValueError, match="sequential"):
        _net("sequential").add_task("a", protected=span_a)
    with pytest.raises(ValueError, match="protected must be"):
        _net().add_task("a", protected=span_a[:5])


def test_frozen_tasks_output_computed_once_per_fit_trains_the_same(monkeypatch) -> None:
    """The trainer adds earlier tasks' frozen outputs computed once per fit; the current task
    trains exactly as with the whole network run at every step."""
    torch.manual_seed(0)
    acts, targets = torch.randn(40, 3, 16), torch.randn(40, 16)

    def trained(cache_constant: bool) -> LadderSideNetwork:
        net = LadderSideNetwork(3, 16, out_rank=4, seed=2)
        trainer = SideNetworkTrainer(net, TrainerConfig(epochs=3, batch_size=16, seed=1))
        for key in ("a", "b", "c"):
            net.add_task(key)
            trainer.fit(acts, targets * (1 + len(net.task_keys)))
        if not cache_constant:
            monkeypatch.setattr(LadderSideNetwork, "constant_sets", lambda self: [])
        trainer.fit(acts, targets)
        monkeypatch.undo()
        return net

    assert trained(True).constant_sets() == [0, 1]
    cached, uncached = trained(True), trained(False)
    cached_state, uncached_state = cached.state_dict(), uncached.state_dict()
    for (name, p), q in zip(cached_state.items(), uncached_state.values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():
        x = cached.standardize(acts)
        torch.testing.assert_close(
            cached.constant_output(x) + cached.side_output(x, skip_constant=True), cached(acts)
        )


def _composed_path(x, mus, gates, w1, w2):
    """The ladder recurrence in plain autograd ops: what ``ladder_path`` must equal."""
    h = x[:, 0] + ((x[:, 0] @ w1[0].T) * gates[0]) @ w2[0].T
    for layer in range(1, x.shape[1]):
        inp = (1 - mus[layer - 1]) * x[:, layer] + mus[layer - 1] * h
        h = inp + ((inp @ w1[layer].T) * gates[layer]) @ w2[layer].T
    return h


@pytest.mark.parametrize("layers", [1, 3])
def test_ladder_path_matches_autograd(layers: int) -> None:
    """The hand-written backward: numerical gradients (gradcheck) and the composed form's."""
    from flower_pae.side_network.path import ladder_path

    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_()

    b, d, r = 5, 6, 3
    x, mus, gates = rand(b, layers, d), rand(layers - 1), rand(layers, r)
    w1 = [rand(r, d) for _ in range(layers)]
    w2 = [rand(d, r) for _ in range(layers)]
    inputs = (x, mus, gates, *w1, *w2)

    def path(x, mus, gates, *w):
        return ladder_path(x, mus, gates, w[:layers], w[layers:])

    assert torch.autograd.gradcheck(path, inputs)
    probe = torch.randn(b, d, generator=gen, dtype=F64)
    ours = torch.autograd.grad((path(*inputs) * probe).sum(), inputs, materialize_grads=True)
    composed = (_composed_path(x, mus, gates, w1, w2) * probe).sum()
    theirs = torch.autograd.grad(composed, inputs, materialize_grads=True)  # no μ for 1 layer
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, e)
    # only the weights train (later tasks): no gradient is built for the frozen inputs
    frozen = (x.detach(), mus.detach(), gates.detach())
    grads = torch.autograd.grad(path(*frozen, *w1, *w2).sum(), w1 + w2)
    expected = torch.autograd.grad(_composed_path(*frozen, w1, w2).sum(), w1 + w2)
    for a, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, e)
    with torch.no_grad():
        torch.testing.assert_close(path(*inputs), _composed_path(x, mus, gates, w1, w2))


def test_ladder_path_frees_its_graph_and_refuses_double_backward() -> None:
    """No reference cycle through the saved tensors (a step's graph goes with its loss, not at
    the next garbage collection), and a second derivative raises rather than being wrong."""
    import gc
    import weakref

    from flower_pae.side_network.path import ladder_path

    layers, b, d, r = 4, 5, 6, 3
    x, mus, gates = torch.randn(b, layers, d), torch.rand(layers - 1), torch.rand(layers, r)
    w1 = [torch.randn(r, d, requires_grad=True) for _ in range(layers)]
    w2 = [torch.randn(d, r, requires_grad=True) for _ in range(layers)]
    gc.disable()
    try:
        out = ladder_path(x, mus, gates, w1, w2)
        alive = weakref.ref(out)
        del out
        assert alive() is None
    finally:
        gc.enable()
    first = torch.autograd.grad(ladder_path(x, mus, gates, w1, w2).sum(), w1[0], create_graph=True)
    with pytest.raises(RuntimeError):
        first[0].sum().backward()
