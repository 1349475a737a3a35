"""FedAvg + LoRA, the device side: local LoRA training and evaluation on the device's shards.

The device holds a trainable copy of the backbone with peft LoRA adapters (``lora_r`` on
``q_proj``/``v_proj`` by default, ``lora_alpha = 2·r``). Each training round it loads the
global adapters, trains them for ``local_epochs`` on its own training shard of the current
task with AdamW (a fresh optimizer per round, as FlowerTune does) and returns them. The loss
is exactly the one of the centralized reference (:func:`flower_pae.references.train_lora`) and
of PAE's device: cross-entropy over the label words' frozen LM-head rows at the pivot position
of the device's prompt (:func:`flower_pae.device.shortcut.build_prompt`,
:func:`~flower_pae.device.shortcut.label_rows`). Data shards and the task schedule are the
PAE device's (:class:`flower_pae.device.device.Device`), so both methods see the same rows.

Flower-agnostic: adapters cross as ``{name: numpy array}``; the ClientApp in
``simulations/baseline_apps.py`` turns them into records.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flower_pae.backbone import Backbone
from flower_pae.config import RunConfig
from flower_pae.data import Example, Task
from flower_pae.device.cost import PeakMemory, forward_flops, lora_step_flops, matmul_params
from flower_pae.device.device import TaskEval
from flower_pae.device.shortcut import build_prompt, label_rows

# The reference's own helpers, so that the federated and centralized LoRA score samples the
# same way (fresh float32 model, left padding, pivot state of the decoder body).
from flower_pae.references import _decoder, _lora_model, _pivot_states

from .base import BaselineDevice

__all__ = [
    "LORA_DROPOUT",
    "LORA_TARGETS",
    "LoRADevice",
    "LoRAModel",
    "LoRATrainResult",
    "initial_adapter",
    "lora_model",
]

LORA_TARGETS = ("q_proj", "v_proj")
LORA_DROPOUT = 0.05


@dataclass
class LoRATrainResult:
    """A device's local training: its adapters and what the step cost it."""

    task_key: str
    adapter: dict[str, np.ndarray]  # the locally trained adapters (all of it crosses the wire)
    num_examples: int  # training rows of the shard (FedAvg's weight)
    samples_processed: int  # sample-steps: num_examples × local_epochs
    seconds: float  # wall time of the local training (all epochs)
    peak_rss_mb: float  # peak resident memory of the device during the training
    tokens: int  # prompt tokens processed (all epochs)
    flops: float  # estimated FLOPs of the local training
    loss: float  # mean cross-entropy of the last local epoch

    @property
    def seconds_per_sample(self) -> float:
        """Training seconds per sample and epoch (NaN without samples)."""
        return self.seconds / self.samples_processed if self.samples_processed else float("nan")


@dataclass
class LoRAEvalResult:
    """A device's evaluation of the global adapters (only the counts cross the wire)."""

    tasks: list[TaskEval]
    seconds: float
    tokens: int
    flops: float


class LoRAModel:
    """A trainable copy of the backbone with LoRA adapters: one per process, reused.

    Parameters
    ----------
    model_name : str
        Backbone name or path (the default SmolLM2 is converted once, as for PAE).
    r : int
        LoRA rank; ``lora_alpha = 2·r``.
    targets : sequence of str
        Module names that get adapters.
    seed : int
        Seed of the adapters' random initialisation (``A``; ``B`` starts at zero).
    """

    def __init__(self, model_name: str, r: int, targets: Sequence[str], seed: int) -> None:
        self.peft_model, self.view = _lora_model(
            model_name,
            r=r,
            alpha=2 * r,
            dropout=LORA_DROPOUT,
            target_modules=targets,
            seed=seed,
        )
        self.decoder = _decoder(self.view.model)
        self.trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.lora_params = sum(p.numel() for p in self.trainable)
        self.base_params = matmul_params(self.view.model)
        self.peft_model.eval()

    @property
    def backbone(self) -> Backbone:
        """The model as a :class:`Backbone` (for prompts and label rows)."""
        return self.view

    def adapter(self) -> dict[str, np.ndarray]:
        """The adapters' weights, float32, keyed as peft saves them."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.peft_model)
        return {k: v.detach().cpu().float().numpy().copy() for k, v in state.items()}

    def load_adapter(self, adapter: dict[str, np.ndarray]) -> None:
        """Set the adapters to ``adapter`` (every key must match, none may be missing)."""
        from peft import set_peft_model_state_dict

        expected = set(self.adapter())
        if set(adapter) != expected:
            missing, extra = sorted(expected - set(adapter)), sorted(set(adapter) - expected)
            raise ValueError(
                f"adapter keys do not match the model's LoRA adapters: missing {missing[:3]}"
                f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                f"{'...' if len(extra) > 3 else ''}"
            )
        state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in adapter.items()}
        set_peft_model_state_dict(self.peft_model, state)

    def prompts(self, task: Task, examples: Sequence[Example], max_tokens: int) -> list[str]:
        """The device's prompts (the same as PAE's) for ``examples``."""
        return [build_prompt(self.view, task, ex.text, max_tokens) for ex in examples]

    def tokens(self, prompts: Sequence[str]) -> int:
        """Prompt tokens the model processes for ``prompts`` (padding excluded)."""
        if not prompts:
            return 0
        return sum(len(ids) for ids in self.view.tokenizer(list(prompts)).input_ids)

    def logits(self, prompts: Sequence[str], rows: torch.Tensor) -> torch.Tensor:
        """Label logits ``z = h·W_tᵀ`` at the pivot; gradients flow unless in inference mode."""
        return _pivot_states(self.decoder, self.view.tokenizer, prompts) @ rows.T


_MODELS: dict[tuple, LoRAModel] = {}


def lora_model(cfg: RunConfig) -> LoRAModel:
    """The process's LoRA model for ``cfg`` (loaded once per Ray actor, or server process)."""
    key = (cfg.model, cfg.lora_r, LORA_TARGETS, cfg.seed)
    if key not in _MODELS:
        _MODELS[key] = LoRAModel(cfg.model, cfg.lora_r, LORA_TARGETS, cfg.seed)
    return _MODELS[key]


def initial_adapter(cfg: RunConfig) -> dict[str, np.ndarray]:
    """The global adapters of round 1: peft's seeded initialisation (``B = 0``)."""
    model = LoRAModel(cfg.model, cfg.lora_r, LORA_TARGETS, cfg.seed)
    return model.adapter()


class LoRADevice(BaselineDevice):
    """One device of the FedAvg + LoRA baseline (settings: ``lora_r``, ``lora_lr``,
    ``local_epochs``, ``batch_size``, ...), on PAE's shards and task schedule."""

    @functools.cached_property
    def model(self) -> LoRAModel:
        return lora_model(self.cfg)

    # ---- training ------------------------------------------------------------------------
    def train(self, server_round: int, adapter: dict[str, np.ndarray]) -> LoRATrainResult:
        """Train the global ``adapter`` for ``local_epochs`` on this device's current shard."""
        cfg, model = self.cfg, self.model
        index = self.data.task_index(server_round)
        task, examples = self._rows(index, "train")
        model.load_adapter(adapter)
        key = self.data.task_key(index)
        if not examples:
            return LoRATrainResult(key, model.adapter(), 0, 0, 0.0, float("nan"), 0, 0.0, 0.0)
        prompts = model.prompts(task, examples, cfg.max_tokens)
        labels = torch.tensor([ex.label for ex in examples])
        rows = label_rows(model.backbone, task.labels)  # frozen: LoRA on q/v leaves them
        rng = random.Random(f"{cfg.seed}:lora:{server_round}:{self.partition_id}")
        torch.manual_seed(rng.randrange(2**31))  # LoRA dropout
        optimizer = torch.optim.AdamW(model.trainable, lr=cfg.lora_lr)
        order = list(range(len(examples)))
        model.peft_model.train()
        loss_sum = 0.0
        with PeakMemory() as memory:
            start = time.perf_counter()
            for _ in range(cfg.local_epochs):
                rng.shuffle(order)
                loss_sum = 0.0
                for lo in range(0, len(order), cfg.batch_size):
                    batch = order[lo : lo + cfg.batch_size]
                    z = model.logits([prompts[i] for i in batch], rows)
                    loss = torch.nn.functional.cross_entropy(z, labels[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum += float(loss.detach()) * len(batch)
            seconds = time.perf_counter() - start
        model.peft_model.eval()
        tokens = model.tokens(prompts) * cfg.local_epochs
        return LoRATrainResult(
            task_key=key,
            adapter=model.adapter(),
            num_examples=len(examples),
            samples_processed=len(examples) * cfg.local_epochs,
            seconds=seconds,
            peak_rss_mb=memory.peak_mb,
            tokens=tokens,
            flops=lora_step_flops(model.base_params, model.lora_params, tokens),
            loss=loss_sum / len(examples),
        )

    # ---- evaluation ----------------------------------------------------------------------
    @torch.inference_mode()
    def _correct(self, prompts: list[str], labels: torch.Tensor, rows: torch.Tensor) -> int:
        bs = self.cfg.batch_size
        pred = torch.cat(
            [self.model.logits(prompts[i : i + bs], rows) for i in range(0, len(prompts), bs)]
        ).argmax(-1)
        return int((pred == labels).sum())

    def evaluate(
        self,
        server_round: int,
        adapter: dict[str, np.ndarray],
        zero_shot: MutableMapping[str, int] | None = None,
    ) -> LoRAEvalResult:
        """Accuracy counts of the global ``adapter`` on this device's test shards.

        Every task met so far is evaluated. ``zero_shot`` (the device's persistent state)
        keeps the frozen backbone's correct count per task, computed once (adapters off).
        """
        model = self.model
        model.load_adapter(adapter)
        zero_shot = {} if zero_shot is None else zero_shot
        results, seconds, tokens = [], 0.0, 0
        for index in range(self.data.task_index(server_round) + 1):
            task, examples = self._rows(index, "test")
            if not examples:
                continue
            prompts = model.prompts(task, examples, self.cfg.max_tokens)
            labels = torch.tensor([ex.label for ex in examples])
            rows = label_rows(model.backbone, task.labels)
            start = time.perf_counter()
            correct = self._correct(prompts, labels, rows)
            seconds += time.perf_counter() - start
            tokens += model.tokens(prompts)
            if task.name not in zero_shot:
                with model.peft_model.disable_adapter():
                    zero_shot[task.name] = self._correct(prompts, labels, rows)
            results.append(
                TaskEval(
                    task_key=self.data.task_key(index),
                    correct=correct,
                    zero_shot_correct=int(zero_shot[task.name]),
                    total=len(examples),
                )
            )
        flops = forward_flops(model.base_params + model.lora_params, tokens)
        return LoRAEvalResult(results, seconds, tokens, flops)
