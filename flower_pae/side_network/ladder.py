"""The additive ladder side network, with one OA-Adapter subspace per task.

For each selected backbone layer ``l`` (pivot-token hidden states ``A_l``, standardized)::

    in_1 = Â_1
    in_l = (1 − μ_l)·Â_l + μ_l·h_{l−1},   μ_l = sigmoid(α_l)
    h_l  = in_l + Σ_tasks adapter_l^task(in_l)
    out  = Σ_tasks (I − V_task·V_taskᵀ)·out^task(h_L)

``out`` lives in the devices' (masked) d-dimensional target space. No task id is used at
inference: every task's adapters are always summed. ``V_task`` (optional, per task) is an
orthonormal basis of the earlier tasks' masked label spans: a later task's output then never
reaches an earlier task's prediction (``W_j·Qᵀ`` is zero off its label span).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..oa_adapter import (
    OAAdapter,
    OAAdapterConfig,
    orthogonality_loss,
    stacked_gates,
    stacked_sparsity,
)
from .path import ladder_path

SideMethod = Literal["oa", "olora", "sequential"]
SIDE_METHODS: tuple[str, ...] = ("oa", "olora", "sequential")
OUT_SLOT = "out"


def _orthonormal_span(basis: Tensor, rtol: float | None = None) -> Tensor:
    """Orthonormal basis ``U`` of the column span of ``basis`` (numerically zero directions
    dropped). ``‖W2ᵀU‖_F²`` is then the energy ``W2`` puts into that subspace, whatever the
    scale of the old columns; it commutes with a rotation of the output space.

    ``rtol`` drops directions below ``rtol`` × the largest singular value instead of those at
    machine precision.
    """
    if basis.shape[1] == 0:
        return basis
    u, s, _ = torch.linalg.svd(basis, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return basis[:, :0]
    tol = s[0] * (rtol if rtol is not None else max(basis.shape) * torch.finfo(basis.dtype).eps)
    return u[:, s > tol].contiguous()


class TaskAdapters(nn.Module):
    """One task's subspace: an adapter per ladder layer plus the output map."""

    def __init__(
        self,
        num_layers: int,
        hidden: int,
        out_dim: int,
        adapter: OAAdapterConfig,
        out_rank: int,
        *,
        generator: torch.Generator,
        dtype: torch.dtype,
        protected_dims: int = 0,
    ) -> None:
        super().__init__()
        # Orthonormal basis (out_dim, m) of the output directions this task must not write to.
        self.register_buffer("protected", torch.zeros(out_dim, protected_dims, dtype=dtype))
        self.layers = nn.ModuleList(
            OAAdapter(hidden, hidden, adapter, generator=generator, dtype=dtype)
            for _ in range(num_layers)
        )
        out_cfg = dataclasses.replace(adapter, r_max=out_rank)
        # Zero W2 on the output side: required for masked exactness (see DESIGN "Server").
        self.out = OAAdapter(hidden, out_dim, out_cfg, generator=generator, dtype=dtype)

    def output(self, h: Tensor) -> Tensor:
        """The task's output map, projected off its protected directions."""
        o = self.out(h)
        if self.protected.shape[1]:
            o = o - (o @ self.protected) @ self.protected.T
        return o

    def slots(self) -> list[tuple[int | str, OAAdapter]]:
        """``(layer index or "out", adapter)`` pairs, in ladder order."""
        return [(i, a) for i, a in enumerate(self.layers)] + [(OUT_SLOT, self.out)]

    @property
    def frozen(self) -> bool:
        return all(a.frozen for _, a in self.slots())

    def freeze(self) -> None:
        for _, a in self.slots():
            a.freeze()


class LadderSideNetwork(nn.Module):
    """Gated ladder of OA-Adapters on pivot-token activations (PAE MobiLLM + OA-Adapter).

    Parameters
    ----------
    num_layers : int
        ``L``, the number of backbone layers whose pivot hidden states are fed in.
    hidden : int
        ``d``, the backbone's hidden width.
    adapter : OAAdapterConfig, optional
        Settings of the per-layer adapters; the output map uses the same with ``r_max=out_rank``.
    out_rank : int
        Rank budget of each task's output map.
    method : {"oa", "olora", "sequential"}
        ``"oa"``: adaptive gates (mode forced to ``"adaptive"``), orthogonal to earlier tasks'
        *active* columns. ``"olora"``: fixed gates (mode forced to ``"fixed"``), orthogonal to
        all earlier columns. ``"sequential"``: one adapter set shared by every task, never
        frozen, no orthogonality (naive sequential fine-tuning).
    out_dim : int, optional
        Width of the target space; defaults to ``hidden`` (targets are lifted into hidden space).
    seed : int
        Seeds the initial weights of each task's adapters (task ``i`` from ``(seed, i)``), so a
        network re-created from its meta is identical and the global RNG is left alone.
    normalize_history : bool
        Penalise against an orthonormal basis of each earlier task's active columns (default)
        rather than the raw columns ``W2[:, γ≠0]·γ`` of the paper's formula. Raw columns make
        the penalty's curvature ``2λ‖H‖²`` grow with how large earlier tasks' weights became,
        and under SGD on the output map (lr 0.05) that diverged on our data at λ = 1; with an
        orthonormal basis the curvature is at most ``2λ`` and λ means the same for every task.
        The subspace, hence the constraint's direction, is the same.
    dtype : torch.dtype, optional
        Parameter dtype (default: torch's default, float32).

    Notes
    -----
    Every task set runs its own ladder path over the same standardized inputs and the outputs
    are summed: inference still sums all tasks (no router, no task head), but a later task's
    layer adapters cannot shift the hidden path of an earlier task's output map. Interference
    is left only where the outputs add up, and there the orthogonality penalty on the output
    maps' ``W2`` acts: a task's targets lie in the row space of its label rows, so an output
    orthogonal to the earlier tasks' active output columns is (nearly) invisible through
    their label rows. Measured on the standard CL orders, one shared path collapsed the first
    task from 64% to 17% after the second one (BWT −15 points) although its adapters were frozen.

    Ladder gates are initialised at ``α = 0`` (``μ = 0.5``): each ladder input starts as an even
    mix of its own layer and the path below, so the last layer sees an exponentially weighted
    average of the recent layers (as LST's gates) and every layer gets gradient from the start.
    The gates are trained only while the first task trains, then frozen: they sit on every
    task's path, so training them later would silently change earlier tasks' outputs.

    Inputs are standardized per layer and dimension by statistics fitted once
    (:meth:`fit_standardizer`, on the first task's data) and then frozen, for the same reason.
    """

    def __init__(
        self,
        num_layers: int,
        hidden: int,
        adapter: OAAdapterConfig | None = None,
        out_rank: int = 16,
        *,
        method: SideMethod = "oa",
        out_dim: int | None = None,
        seed: int = 0,
        normalize_history: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if out_rank < 1:
            raise ValueError(f"out_rank must be >= 1, got {out_rank}")
        if method not in SIDE_METHODS:
            raise ValueError(f"method must be one of {SIDE_METHODS}, got {method!r}")
        adapter = adapter if adapter is not None else OAAdapterConfig()
        if method == "oa":
            adapter = dataclasses.replace(adapter, mode="adaptive")
        elif method == "olora":
            adapter = dataclasses.replace(adapter, mode="fixed")
        self.num_layers = int(num_layers)
        self.hidden = int(hidden)
        self.out_dim = int(out_dim) if out_dim is not None else self.hidden
        self.out_rank = int(out_rank)
        self.adapter_config = adapter
        self.method: SideMethod = method
        self.seed = int(seed)
        self.normalize_history = bool(normalize_history)
        dtype = dtype if dtype is not None else torch.get_default_dtype()

        self.register_buffer("input_mean", torch.zeros(num_layers, hidden, dtype=dtype))
        self.register_buffer("input_std", torch.ones(num_layers, hidden, dtype=dtype))
        self.register_buffer("standardizer_fitted", torch.tensor(False))
        # α_l for l = 2..L (the first layer has no h_{l-1}).
        self.alpha = nn.Parameter(torch.zeros(num_layers - 1, dtype=dtype))

        self.task_sets = nn.ModuleList()
        self._task_keys: list[str] = []
        self._set_of: dict[str, int] = {}
        self.current_task: str | None = None
        # The oracle upper bound only: when set, the forward uses this task's adapters alone
        # (a task router). PAE and OA-Adapter never set it: inference sums all tasks.
        self.route: str | None = None
        self._basis_cache: dict[int, dict[int | str, Tensor]] = {}
        self._history_cache: dict[int, Tensor | None] = {}

    # ------------------------------------------------------------------ tasks
    @property
    def task_keys(self) -> list[str]:
        """Task keys in the order they were added."""
        return list(self._task_keys)

    def is_frozen(self, key: str) -> bool:
        """Whether ``key``'s adapters are frozen (never, for ``"sequential"``)."""
        return self.task_sets[self._index(key)].frozen

    def _index(self, key: str) -> int:
        if key not in self._set_of:
            raise KeyError(f"unknown task {key!r}; known: {self._task_keys}")
        return self._set_of[key]

    def add_task(self, key: str, protected: Tensor | None = None) -> bool:
        """Start task ``key``; allocate a new subspace if it is new.

        For ``"oa"``/``"olora"`` a new key ends the current task (its adapters are frozen, so
        calling :meth:`freeze_task` first is optional) and gets fresh adapters, orthogonal to the
        earlier ones. For ``"sequential"`` every key shares the first key's adapters.

        ``protected`` (out_dim, m): directions the new task's output must never write to —
        the strategy passes the earlier tasks' masked label bases, so that a later task cannot
        change an earlier task's predictions. Not for ``"sequential"``, whose tasks share one
        output map.

        Returns
        -------
        bool
            True if parameters were added. A key seen before changes nothing (a frozen task is
            not re-opened) and returns False.
        """
        if not isinstance(key, str) or not key:
            raise ValueError(f"task key must be a non-empty string, got {key!r}")
        if key in self._set_of:
            return False
        if protected is not None and self.method == "sequential":
            raise ValueError("'sequential' tasks share one output map: nothing can be protected")
        if protected is not None and (protected.ndim != 2 or protected.shape[0] != self.out_dim):
            raise ValueError(f"protected must be ({self.out_dim}, m), got {tuple(protected.shape)}")
        added = False
        if self.method == "sequential" and len(self.task_sets) > 0:
            index = 0
        else:
            for ts in self.task_sets:
                if not ts.frozen:
                    self._freeze_set(ts)
            index = len(self.task_sets)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            span = None
            if protected is not None:
                # rtol: spans given twice up to float32 noise (tasks with the same label words)
                # count once
                span = _orthonormal_span(protected.to(torch.float64), rtol=1e-6)
                span = span.to(self.alpha.dtype)
            ts = TaskAdapters(
                self.num_layers,
                self.hidden,
                self.out_dim,
                self.adapter_config,
                self.out_rank,
                generator=gen,
                dtype=self.alpha.dtype,
                protected_dims=0 if span is None else span.shape[1],
            ).to(self.alpha.device)
            if span is not None:
                ts.protected.copy_(span)
            self.task_sets.append(ts)
            self._history_cache.clear()  # only the current task's history is used
            added = True
        self._task_keys.append(key)
        self._set_of[key] = index
        self.current_task = key
        self._refresh_alpha()
        return added

    def freeze_task(self, key: str) -> None:
        """End task ``key``: freeze its adapters; their active bases become historical.

        A no-op for ``"sequential"`` (nothing is ever frozen there) and for a frozen task.
        """
        index = self._index(key)
        if self.method != "sequential":
            self._freeze_set(self.task_sets[index])
        self._refresh_alpha()

    def _freeze_set(self, ts: TaskAdapters) -> None:
        ts.freeze()
        self.alpha.requires_grad_(False)
        self.alpha.grad = None

    def _refresh_alpha(self) -> None:
        """α trains only while the first (and only) task is being trained."""
        first_open = len(self._task_keys) == 1 and not self.task_sets[0].frozen
        self.alpha.requires_grad_(first_open)

    def _current_set(self) -> TaskAdapters | None:
        if self.current_task is None:
            return None
        return self.task_sets[self._set_of[self.current_task]]

    # ------------------------------------------------------------ standardizer
    @torch.no_grad()
    def fit_standardizer(self, acts: Tensor, *, force: bool = False, eps: float = 1e-6) -> bool:
        """Set the per-layer mean/std from ``acts`` (N, L, d), once.

        Later calls are no-ops (returning False) unless ``force``: the statistics are on every
        task's path, so refitting them would shift earlier tasks. Dimensions with std < eps are
        only centred.
        """
        if bool(self.standardizer_fitted) and not force:
            return False
        self._check_acts(acts)
        a = acts.to(self.input_mean.dtype)
        mean = a.mean(0)
        std = a.std(0, unbiased=False) if a.shape[0] > 1 else torch.ones_like(mean)
        std = torch.where(std < eps, torch.ones_like(std), std)
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)
        self.standardizer_fitted.fill_(True)
        return True

    # ----------------------------------------------------------------- forward
    def _check_acts(self, acts: Tensor) -> None:
        if acts.ndim != 3 or tuple(acts.shape[1:]) != (self.num_layers, self.hidden):
            raise ValueError(
                f"expected activations of shape (N, {self.num_layers}, {self.hidden}), "
                f"got {tuple(acts.shape)}"
            )

    def forward(self, acts: Tensor) -> Tensor:
        """Side output ``(N, out_dim)`` from pivot activations ``(N, L, d)``."""
        return self.side_output(self.standardize(acts))

    def standardize(self, acts: Tensor) -> Tensor:
        """``Â``: activations ``(N, L, d)`` standardized by the frozen per-layer statistics.

        The trainer standardizes its data once per fit and feeds :meth:`side_output`.
        """
        self._check_acts(acts)
        return (acts.to(self.input_mean.dtype) - self.input_mean) / self.input_std

    def side_output(self, x: Tensor, *, skip_constant: bool = False) -> Tensor:
        """Side output from standardized activations ``x`` (:meth:`standardize`).

        ``skip_constant`` leaves out the task sets that no training can change any more
        (:meth:`constant_sets`); the trainer adds their :meth:`constant_output`, computed
        once per fit instead of once per step.
        """
        sets = list(range(len(self.task_sets)))
        if self.route is not None:
            sets = [self._index(self.route)]
        elif skip_constant:
            constant = set(self.constant_sets())
            sets = [i for i in sets if i not in constant]
        return self._output(x, sets)

    def _output(self, x: Tensor, sets: list[int]) -> Tensor:
        """The summed outputs of the task sets ``sets`` (indices, summed in order) on
        standardized inputs ``x``."""
        out = x.new_zeros(x.shape[0], self.out_dim)
        if not sets:
            return out
        mu = torch.sigmoid(self.alpha)
        for n, index in enumerate(sets):
            ts = self.task_sets[index]
            # Each task's adapters run their own ladder over the shared (frozen) inputs, so a
            # later task never changes the hidden path an earlier task's output map reads;
            # tasks then meet only in the summed outputs, where orthogonality keeps them apart.
            layers = list(ts.layers)
            gates = stacked_gates(layers)
            h = ladder_path(x, mu, gates, [a.W1 for a in layers], [a.W2 for a in layers])
            o = ts.output(h)
            out = o if n == 0 else out + o
        return out

    def constant_sets(self) -> list[int]:
        """Indices of the task sets whose output no training can change: frozen, while the
        ladder gates and the standardizer are frozen too. Frozen sets come first, so summing
        them before the rest keeps the order of the sum."""
        if self.alpha.requires_grad or not bool(self.standardizer_fitted):
            return []
        return [i for i, ts in enumerate(self.task_sets) if ts.frozen]

    @torch.no_grad()
    def constant_output(self, x: Tensor) -> Tensor | None:
        """The summed output of :meth:`constant_sets` on standardized inputs ``x`` (``None``
        if there are none)."""
        constant = self.constant_sets()
        return self._output(x, constant) if constant else None

    # ------------------------------------------------------------ penalties
    def _bases(self, index: int) -> dict[int | str, Tensor]:
        """Historical bases of a frozen task set, cached (they cannot change while frozen)."""
        if index not in self._basis_cache:
            ts = self.task_sets[index]
            bases = {slot: a.active_basis() for slot, a in ts.slots()}
            if self.normalize_history:
                bases = {slot: _orthonormal_span(b) for slot, b in bases.items()}
            self._basis_cache[index] = bases
        return self._basis_cache[index]

    def historical_bases(self, slot: int | str) -> list[Tensor]:
        """Bases of every earlier (frozen) task for ``slot`` (layer index or ``"out"``).

        Orthonormalised when ``normalize_history`` (the default), else the raw active columns.
        """
        if self.method == "sequential" or self.current_task is None:
            return []
        cur = self._set_of[self.current_task]
        return [self._bases(j)[slot] for j in range(cur) if self.task_sets[j].frozen]

    def orthogonality_penalty(self) -> Tensor:
        """Σ over slots of ‖W2_currentᵀ · H_s‖_F² against all earlier tasks' bases for that slot.

        Zero for ``"sequential"``, for the first task and once the current task is frozen.
        A task whose output is projected off protected directions (:meth:`add_task`) has no
        penalty on its output map: the projection keeps it off what earlier tasks read,
        exactly, and the penalty would also forbid cancelling earlier outputs in its own span.
        """
        zero = self.alpha.new_zeros(())
        ts = self._current_set()
        if self.method == "sequential" or ts is None or ts.frozen:
            return zero
        total = zero
        history = self._layer_history()
        if history is not None:
            # every layer's ‖W2ᵀ·H‖² in one product; the zero padding adds nothing
            w2 = torch.stack([a.W2 for a in ts.layers])
            total = (w2.transpose(1, 2) @ history).pow(2).sum()
        hist = self.historical_bases(OUT_SLOT)
        if hist and not ts.protected.shape[1]:
            total = total + orthogonality_loss(ts.out.W2, hist)
        return total

    def _layer_history(self) -> Tensor | None:
        """The layers' historical bases for the current task, stacked ``(L, d, K)``: each
        layer's earlier bases side by side, zero-padded to the widest (``None`` if all are
        empty). Cached: the earlier tasks are frozen."""
        cur = self._set_of[self.current_task]
        if cur not in self._history_cache:
            per_layer = [self.historical_bases(layer) for layer in range(self.num_layers)]
            widths = [sum(b.shape[1] for b in bases) for bases in per_layer]
            stacked = None
            if max(widths):
                stacked = self.alpha.new_zeros(self.num_layers, self.hidden, max(widths))
                for layer, bases in enumerate(per_layer):
                    if widths[layer]:
                        stacked[layer, :, : widths[layer]] = torch.cat(bases, dim=1)
            self._history_cache[cur] = stacked
        return self._history_cache[cur]

    def sparsity_penalty(self) -> Tensor:
        """L1 pruning pressure on the current task's gates (weights from the adapter config)."""
        total = self.alpha.new_zeros(())
        ts = self._current_set()
        if ts is None or ts.frozen:
            return total
        return stacked_sparsity(list(ts.layers)) + ts.out.sparsity_penalty()

    # ------------------------------------------------------------ parameters
    def trainable_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(output-map W2, everything else)`` that the current task may train.

        The first group writes into the masked space and must get a rotation-commuting
        optimizer (SGD); the second may use any.
        """
        ts = self._current_set()
        out_w2: list[nn.Parameter] = []
        other: list[nn.Parameter] = []
        if ts is not None and not ts.frozen:
            for _, a in ts.slots():
                for p in a.trainable_parameters():
                    (out_w2 if p is ts.out.W2 else other).append(p)
        if self.alpha.requires_grad and self.alpha.numel() > 0:
            other.append(self.alpha)
        return out_w2, other

    def active_params(self) -> int:
        """Active adapter parameters of all tasks, plus the ladder gates α."""
        return sum(a.active_params() for ts in self.task_sets for _, a in ts.slots()) + int(
            self.alpha.numel()
        )

    def rank_report(self) -> list[dict[str, Any]]:
        """Per task and slot: ``{task, layer, active_rank, active_params}``.

        ``layer`` is the 0-based index among the selected layers, or ``"out"``. For
        ``"sequential"`` the one shared set is reported under the current task's key.
        """
        rows: list[dict[str, Any]] = []
        for index, ts in enumerate(self.task_sets):
            if self.method == "sequential":
                task = self.current_task
            else:
                task = next(k for k in self._task_keys if self._set_of[k] == index)
            for slot, a in ts.slots():
                rows.append(
                    {
                        "task": task,
                        "layer": slot,
                        "active_rank": a.active_rank(),
                        "active_params": a.active_params(),
                    }
                )
        return rows

    # ------------------------------------------------------------ state
    def meta(self) -> dict[str, Any]:
        """JSON-able constructor arguments and task bookkeeping, for :meth:`from_state`."""
        return {
            "num_layers": self.num_layers,
            "hidden": self.hidden,
            "adapter": self.adapter_config.to_dict(),
            "out_rank": self.out_rank,
            "method": self.method,
            "out_dim": self.out_dim,
            "seed": self.seed,
            "normalize_history": self.normalize_history,
            "dtype": str(self.alpha.dtype).removeprefix("torch."),
            "task_keys": list(self._task_keys),
            "frozen": [self.is_frozen(k) for k in self._task_keys],
            "protected_dims": [int(ts.protected.shape[1]) for ts in self.task_sets],
            "current_task": self.current_task,
        }

    @classmethod
    def from_state(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> LadderSideNetwork:
        """Re-create a network (tasks included) from :meth:`meta` and :meth:`state_dict`."""
        net = cls(
            meta["num_layers"],
            meta["hidden"],
            OAAdapterConfig.from_dict(meta["adapter"]),
            meta["out_rank"],
            method=meta["method"],
            out_dim=meta.get("out_dim"),
            seed=meta.get("seed", 0),
            normalize_history=meta.get("normalize_history", True),
            dtype=getattr(torch, meta.get("dtype", "float32")),
        )
        dims = meta.get("protected_dims", [])
        for key in meta["task_keys"]:
            m = dims[len(net.task_sets)] if len(net.task_sets) < len(dims) else 0
            # placeholders of the saved shape; load_state_dict fills in the directions
            net.add_task(key, torch.eye(net.out_dim, m, dtype=torch.float64) if m else None)
        for key, frozen in zip(meta["task_keys"], meta["frozen"], strict=True):
            if frozen:
                net.freeze_task(key)
        net.load_state_dict(state)
        if meta.get("current_task") is not None:
            net.current_task = meta["current_task"]
        net._refresh_alpha()
        return net

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """As :meth:`torch.nn.Module.load_state_dict`; also drops cached historical bases."""
        self._basis_cache.clear()
        self._history_cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to()/.double() change the parameters the cached bases were taken from.
        self._basis_cache.clear()
        self._history_cache.clear()
        return super()._apply(fn, recurse)
