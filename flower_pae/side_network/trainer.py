"""Server-side training of the ladder side network on cached (masked) targets.

The loss is MSE in the masked target space, which an orthogonal mask ``Q`` leaves unchanged.
The output maps' ``W2`` (the only weights that live in the masked space, zero-initialised) are
trained with SGD + momentum + L2 decay, which commutes with ``Q``; everything else sees
identical gradients with or without the mask and may use Adam. So training on ``Q·t`` gives
exactly ``Q·(the model trained on t)`` (DESIGN, "Server"). Adam on those ``W2`` would rescale
each masked coordinate separately and break that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .ladder import LadderSideNetwork


@dataclass
class TrainerConfig:
    """Optimisation settings of :class:`SideNetworkTrainer`.

    Parameters
    ----------
    epochs, batch_size : int
        Passes over the given data per :meth:`SideNetworkTrainer.fit`, and mini-batch size.
    lr : float
        Adam step for everything except the output maps' ``W2`` and the OA gates.
    gate_lr : float, optional
        Adam step for the OA gates ``g`` and thresholds ``τ`` (default: ``lr``). A gate must
        travel from its initial value to the threshold within a task's few server steps to
        switch its dimension off.
    out_lr, out_momentum, weight_decay : float
        SGD on the output maps' ``W2``; it needs a larger step than Adam would.
    lambda_orth : float
        ``λ_orth``, weight of the orthogonality penalty against earlier tasks' subspaces.
    seed : int
        Seeds the trainer's own shuffling generator.
    out_optimizer : {"sgd", "adam"}
        ``"adam"`` exists only to show (in tests) that it breaks masked exactness.
    """

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    gate_lr: float | None = None
    out_lr: float = 0.05
    out_momentum: float = 0.9
    weight_decay: float = 0.0
    lambda_orth: float = 1.0
    seed: int = 0
    out_optimizer: Literal["sgd", "adam"] = "sgd"

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"TrainerConfig.epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"TrainerConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.gate_lr is not None and self.gate_lr <= 0:
            raise ValueError(f"TrainerConfig.gate_lr must be > 0, got {self.gate_lr}")
        for name in ("lr", "out_lr", "out_momentum", "weight_decay", "lambda_orth"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.out_optimizer not in ("sgd", "adam"):
            raise ValueError(
                f"TrainerConfig.out_optimizer must be 'sgd' or 'adam', got {self.out_optimizer!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SideNetworkTrainer:
    """Trains the current task of a :class:`LadderSideNetwork`.

    Optimizer state persists across :meth:`fit` calls while the task (and its trainable
    parameters) stay the same, so federated rounds continue one optimisation; it is rebuilt
    when the network's current task changes.
    """

    def __init__(self, net: LadderSideNetwork, config: TrainerConfig | None = None) -> None:
        self.net = net
        self.config = config if config is not None else TrainerConfig()
        self._generator = torch.Generator().manual_seed(self.config.seed)
        self._opt_key: tuple[Any, ...] | None = None
        self._optimizers: list[torch.optim.Optimizer] = []

    def _ensure_optimizers(self) -> list[torch.optim.Optimizer]:
        out_w2, other = self.net.trainable_groups()
        if not out_w2 and not other:
            raise RuntimeError(
                f"nothing to train: current task {self.net.current_task!r} is frozen or absent "
                "(call net.add_task(key) first)"
            )
        key = self._current_key()
        if key != self._opt_key:
            c = self.config
            opts: list[torch.optim.Optimizer] = []
            if out_w2:
                if c.out_optimizer == "sgd":
                    opts.append(
                        torch.optim.SGD(
                            out_w2,
                            lr=c.out_lr,
                            momentum=c.out_momentum,
                            weight_decay=c.weight_decay,
                            fused=True,
                        )
                    )
                else:
                    opts.append(
                        torch.optim.Adam(out_w2, lr=c.lr, weight_decay=c.weight_decay, fused=True)
                    )
            if other:
                gates = {
                    id(p) for ts in self.net.task_sets for _, a in ts.slots() for p in (a.g, a.tau)
                }
                groups = [
                    {"params": [p for p in other if id(p) not in gates], "lr": c.lr},
                    {"params": [p for p in other if id(p) in gates], "lr": c.gate_lr or c.lr},
                ]
                opts.append(torch.optim.Adam([g for g in groups if g["params"]], fused=True))
            self._optimizers = opts
            self._opt_key = key
        return self._optimizers

    def state_dict(self) -> dict[str, Any]:
        """The shuffling generator's state and, while they match the network's current
        trainable parameters, the optimizers' states (for a checkpoint)."""
        current = self._opt_key is not None and self._opt_key == self._current_key()
        return {
            "generator": self._generator.get_state(),
            "task": self.net.current_task if current else None,
            "optimizers": [opt.state_dict() for opt in self._optimizers] if current else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` onto a trainer of a network re-created from the same
        meta and weights: the next :meth:`fit` continues the same optimisation."""
        self._generator.set_state(state["generator"])
        self._opt_key, self._optimizers = None, []
        if state.get("optimizers") is None:
            return
        if state["task"] != self.net.current_task:
            raise ValueError(
                f"optimizer state of task {state['task']!r}, but the network's current task "
                f"is {self.net.current_task!r}"
            )
        optimizers = self._ensure_optimizers()
        if len(optimizers) != len(state["optimizers"]):
            raise ValueError("optimizer state does not match the network's trainable groups")
        for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)

    def _current_key(self) -> tuple[Any, ...]:
        out_w2, other = self.net.trainable_groups()
        return (self.net.current_task, tuple(id(p) for p in out_w2 + other))

    def _prepare(self, acts: Tensor) -> Tensor:
        dtype = self.net.alpha.dtype
        device = self.net.alpha.device
        return torch.as_tensor(acts).to(device=device, dtype=dtype)

    def fit(self, acts: Tensor, targets: Tensor, *, epochs: int | None = None) -> dict[str, list]:
        """Train the current task on ``acts`` (N, L, d) → ``targets`` (N, out_dim).

        Loss: ``Σ_d (net(A) − t)²`` averaged over the batch, plus ``λ_orth · orthogonality`` and
        the gates' L1 pressure. Fits the input standardizer first if it was never fitted.

        Returns
        -------
        dict
            Per-epoch means (weighted by batch size) of ``loss``, ``mse``, ``orth``,
            ``sparsity``.
        """
        acts = self._prepare(acts)
        targets = self._prepare(targets)
        self.net._check_acts(acts)
        if targets.ndim != 2 or targets.shape != (acts.shape[0], self.net.out_dim):
            raise ValueError(
                f"expected targets of shape ({acts.shape[0]}, {self.net.out_dim}), "
                f"got {tuple(targets.shape)}"
            )
        if acts.shape[0] == 0:
            raise ValueError("fit() needs at least one sample")
        if not bool(self.net.standardizer_fitted):
            self.net.fit_standardizer(acts)
        optimizers = self._ensure_optimizers()
        n = acts.shape[0]
        bs = self.config.batch_size
        lam = self.config.lambda_orth
        history: dict[str, list] = {"loss": [], "mse": [], "orth": [], "sparsity": []}
        was_training = self.net.training
        self.net.train()
        n_epochs = self.config.epochs if epochs is None else int(epochs)
        # The standardized inputs, and earlier tasks' frozen outputs, are the same at every
        # step: computed once here.
        x = self.net.standardize(acts)
        constant = None if self.net.route is not None else self.net.constant_output(x)
        for _ in range(n_epochs):
            perm = torch.randperm(n, generator=self._generator).to(acts.device)
            sums = dict.fromkeys(history, 0.0)
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                # index_select copies whole rows: several times faster than x[idx] here
                batch = x.index_select(0, idx)
                if constant is None:
                    pred = self.net.side_output(batch)
                else:
                    pred = constant.index_select(0, idx) + self.net.side_output(
                        batch, skip_constant=True
                    )
                mse = (pred - targets.index_select(0, idx)).pow(2).sum(1).mean()
                orth = self.net.orthogonality_penalty()
                sparsity = self.net.sparsity_penalty()
                loss = mse + lam * orth + sparsity
                loss.backward()
                for opt in optimizers:
                    opt.step()
                w = idx.numel()
                for k, v in (("loss", loss), ("mse", mse), ("orth", orth), ("sparsity", sparsity)):
                    sums[k] += float(v.detach()) * w
            for k in history:
                history[k].append(sums[k] / n)
        self.net.train(was_training)
        return history

    @torch.no_grad()
    def predict(self, acts: Tensor, *, batch_size: int | None = None) -> Tensor:
        """Side output for ``acts`` (N, L, d), in eval mode, in batches."""
        acts = self._prepare(acts)
        self.net._check_acts(acts)
        bs = batch_size or max(self.config.batch_size, 256)
        was_training = self.net.training
        self.net.eval()
        try:
            chunks = [self.net(acts[i : i + bs]) for i in range(0, acts.shape[0], bs)]
        finally:
            self.net.train(was_training)
        if not chunks:
            return acts.new_zeros(0, self.net.out_dim)
        return torch.cat(chunks)

    def evaluate_mse(self, acts: Tensor, targets: Tensor) -> float:
        """Mean over samples of the summed squared error, without training."""
        pred = self.predict(acts)
        t = self._prepare(targets)
        val = float((pred - t).pow(2).sum(1).mean()) if pred.shape[0] else math.nan
        return val
