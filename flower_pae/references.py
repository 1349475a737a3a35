"""Reference baselines for PAE side-tuning: zero-shot, centralized LoRA, and device step cost.

All three score a sample the way the device does: the prompt is
``build_prompt(backbone, task, text)`` with the text cut to ``max_tokens`` tokens, the pivot
is the last prompt position, and the label logits
are ``z = h·W_tᵀ`` with ``h`` the final (normed) hidden state at the pivot and ``W_t`` the frozen
LM-head rows of the label words (:func:`flower_pae.device.shortcut.label_rows`). So the LoRA
baseline is trained with cross-entropy on exactly the logits the PAE side network corrects,
and the comparison is about the training method, not about the head.

- :func:`zero_shot_accuracy`: ``argmax z`` of the frozen backbone on a task's test rows.
- :func:`train_lora`: centralized LoRA (peft) on a fresh copy of the backbone, cross-entropy
  on ``z`` over the union of the tasks' training rows, a seeded validation split carved from
  those rows (nothing is selected on test), then test accuracy.
- :func:`device_step_cost`: what one device pays per sample for PAE's step (one inference-mode
  forward that keeps the pivot states) versus a LoRA training step (forward + backward +
  optimizer step). Each phase runs in its own child process so that each has its own peak
  memory; a third child only loads the model, giving the baseline both steps add to.

Run ``python -m flower_pae.references --child CONFIG.json`` only through
:func:`device_step_cost`; it is the child entry point.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flower_pae.backbone import Backbone, load_backbone, resolve_model_path
from flower_pae.data import Task
from flower_pae.device.shortcut import build_prompt, label_rows, pivot_features

__all__ = [
    "DeviceStepCost",
    "LoRAResult",
    "device_step_cost",
    "peak_rss_mb",
    "train_lora",
    "zero_shot_accuracy",
]


# ----------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (``ru_maxrss``; KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _proc_status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` memory line (``VmHWM``, ``VmRSS``) in MiB, None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _child_peak_mb() -> float:
    """Peak RSS of this (child) process's own address space.

    ``VmHWM`` is the high-water mark of the current address space, which starts fresh at
    ``exec``. ``ru_maxrss`` is not: Linux carries the pre-exec peak of the forked copy of the
    parent into it, so a child started from a big parent would report the parent's size.
    """
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else peak_rss_mb()


# ----------------------------------------------------------------------------- scoring


def _prompts(backbone: Backbone, task: Task, texts: Sequence[str], max_tokens: int) -> list[str]:
    """The device's prompts: text cut to ``max_tokens`` tokens, then the task's template."""
    return [build_prompt(backbone, task, t, max_tokens) for t in texts]


def _decoder(causal_lm: torch.nn.Module) -> torch.nn.Module:
    """The transformer body whose ``last_hidden_state`` is the final normed hidden state."""
    get = getattr(causal_lm, "get_decoder", None)
    if get is not None:
        try:
            return get()
        except (AttributeError, ValueError, NotImplementedError):
            pass
    return getattr(causal_lm, causal_lm.base_model_prefix)


def _pivot_states(decoder: torch.nn.Module, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Final hidden state at the pivot (last position; left padding) for one batch, (B, d).

    Calls the body directly, so no vocabulary-sized logits are computed. Gradients flow if
    the caller is not in inference mode.
    """
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as pivot_features: real tokens from 0
    out = decoder(
        input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions, use_cache=False
    )
    return out.last_hidden_state[:, -1, :].float()


def zero_shot_accuracy(
    backbone: Backbone,
    task: Task,
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    split: str = "test",
) -> float:
    """Accuracy of ``argmax z`` of the frozen backbone on ``task``'s ``split`` rows.

    Uses :func:`pivot_features` and :func:`label_rows`, i.e. exactly the device's forward.
    """
    examples = task.test if split == "test" else task.train
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} rows")
    prompts = _prompts(backbone, task, [ex.text for ex in examples], max_tokens)
    feats = pivot_features(backbone, prompts, [backbone.num_layers], batch_size=batch_size)
    w = label_rows(backbone, task.labels)
    pred = (feats.final @ w.T).argmax(dim=-1)
    gold = torch.tensor([ex.label for ex in examples])
    return float((pred == gold).float().mean())


# ----------------------------------------------------------------------------- LoRA


@dataclass
class LoRAResult:
    """What a centralized LoRA run gives; accuracies in [0, 1], memory in MiB."""

    test_accuracy: float  # over the pooled test rows of all tasks
    task_test_accuracy: dict[str, float]  # per task
    val_accuracy: list[float]  # after each epoch, on the held-out training rows
    val_accuracy_initial: float | None  # before training (the zero-shot model on val)
    train_loss: list[float]  # mean cross-entropy per epoch
    seconds_per_sample: float  # training only (forward+backward+step), per sample per epoch
    train_seconds: float
    peak_rss_mb: float  # ru_maxrss of this process after the run (monotonic: process peak)
    trainable_params: int
    total_params: int
    train_samples: int
    val_samples: int
    test_samples: int
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _load_fresh(backbone_name: str) -> tuple[torch.nn.Module, object]:
    """A new float32 copy of the backbone and its tokenizer (left padding), not the cached one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(backbone_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def _lora_model(
    backbone_name: str,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str],
    seed: int,
) -> tuple[torch.nn.Module, Backbone]:
    """Fresh backbone with LoRA adapters; returns the peft model and a Backbone view of it."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _load_fresh(backbone_name)
    torch.manual_seed(seed)  # LoRA A matrices are random (B starts at zero)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    view = Backbone(name=backbone_name, model=peft_model.get_base_model(), tokenizer=tokenizer)
    return peft_model, view


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


@dataclass(frozen=True)
class _Row:
    prompt: str
    task: int  # index into the task list (selects W_t)
    label: int


def _batches(rows: Sequence[_Row], batch_size: int) -> list[list[_Row]]:
    return [list(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def _batch_logits(
    decoder: torch.nn.Module, tokenizer, batch: Sequence[_Row], rows_w: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Label logits per task present in the batch: [(z (b×C_t), gold (b,))]."""
    h = _pivot_states(decoder, tokenizer, [row.prompt for row in batch])
    out = []
    for t in sorted({row.task for row in batch}):
        sel = [i for i, row in enumerate(batch) if row.task == t]
        z = h[sel] @ rows_w[t].T
        gold = torch.tensor([batch[i].label for i in sel])
        out.append((z, gold))
    return out


@torch.inference_mode()
def _accuracy(
    decoder, tokenizer, rows: Sequence[_Row], rows_w, batch_size: int, desc: str, progress: bool
) -> tuple[float, list[bool]]:
    hits: list[bool] = []
    batches = _batches(rows, batch_size)
    for batch in _progress(batches, len(batches), desc, progress):
        for z, gold in _batch_logits(decoder, tokenizer, batch, rows_w):
            hits.extend((z.argmax(-1) == gold).tolist())
    return (sum(hits) / len(hits) if hits else float("nan")), hits


def train_lora(
    backbone_name: str,
    task_or_tasks: Task | Sequence[Task],
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    lr: float = 5e-4,
    epochs: int = 1,
    batch_size: int = 8,
    max_tokens: int = 128,
    seed: int = 0,
    val_fraction: float = 0.1,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> LoRAResult:
    """Centralized LoRA baseline: cross-entropy on the device's label logits ``z = h·W_tᵀ``.

    Loads a fresh float32 copy of ``backbone_name`` (the cached frozen backbone of
    :func:`load_backbone` is never touched), wraps it with peft LoRA on ``target_modules``
    and trains with AdamW on the union of the tasks' training rows, each row scored against
    its own task's label rows ``W_t`` (frozen LM-head rows, as on the device; LoRA on attention
    projections leaves them unchanged). A seeded ``val_fraction`` of those rows is held out
    and scored after every epoch; test rows are scored once, at the end, and select nothing.
    """
    tasks = [task_or_tasks] if isinstance(task_or_tasks, Task) else list(task_or_tasks)
    if not tasks:
        raise ValueError("train_lora needs at least one task")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    config = dict(
        backbone=backbone_name,
        tasks=[t.name for t in tasks],
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=list(target_modules),
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        max_tokens=max_tokens,
        seed=seed,
        val_fraction=val_fraction,
        weight_decay=weight_decay,
        optimizer="AdamW",
        torch_threads=torch.get_num_threads(),
    )

    peft_model, view = _lora_model(
        backbone_name, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, seed=seed
    )
    tokenizer = view.tokenizer
    decoder = _decoder(view.model)
    rows_w = [label_rows(view, t.labels) for t in tasks]  # frozen: LoRA does not touch them

    train_rows = [
        _Row(p, ti, ex.label)
        for ti, t in enumerate(tasks)
        for p, ex in zip(
            _prompts(view, t, [ex.text for ex in t.train], max_tokens), t.train, strict=True
        )
    ]
    test_rows = [
        _Row(p, ti, ex.label)
        for ti, t in enumerate(tasks)
        for p, ex in zip(
            _prompts(view, t, [ex.text for ex in t.test], max_tokens), t.test, strict=True
        )
    ]
    if not train_rows:
        raise ValueError("no training rows in " + ", ".join(t.name for t in tasks))
    rng = random.Random(seed)
    order = list(range(len(train_rows)))
    rng.shuffle(order)
    n_val = int(round(val_fraction * len(train_rows))) if val_fraction > 0 else 0
    n_val = min(n_val, len(train_rows) - 1)
    val_rows = [train_rows[i] for i in order[:n_val]]
    fit_rows = [train_rows[i] for i in order[n_val:]]

    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in peft_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    val_initial = None
    if val_rows:
        peft_model.eval()
        val_initial, _ = _accuracy(
            decoder, tokenizer, val_rows, rows_w, batch_size, "val (before)", progress
        )

    val_acc: list[float] = []
    losses: list[float] = []
    train_seconds = 0.0
    torch.manual_seed(seed)
    for epoch in range(epochs):
        peft_model.train()
        rng.shuffle(fit_rows)
        batches = _batches(fit_rows, batch_size)
        total_loss, seen = 0.0, 0
        start = time.perf_counter()
        for batch in _progress(batches, len(batches), f"LoRA epoch {epoch + 1}", progress):
            parts = _batch_logits(decoder, tokenizer, batch, rows_w)
            loss = sum(
                torch.nn.functional.cross_entropy(z, gold, reduction="sum") for z, gold in parts
            ) / len(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(batch)
            seen += len(batch)
        train_seconds += time.perf_counter() - start
        losses.append(total_loss / max(seen, 1))
        if val_rows:
            peft_model.eval()
            acc, _ = _accuracy(
                decoder, tokenizer, val_rows, rows_w, batch_size, f"val {epoch + 1}", progress
            )
            val_acc.append(acc)

    peft_model.eval()
    task_acc: dict[str, float] = {}
    test_acc = float("nan")
    if test_rows:
        test_acc, hits = _accuracy(
            decoder, tokenizer, test_rows, rows_w, batch_size, "test", progress
        )
        for ti, t in enumerate(tasks):
            mine = [h for h, row in zip(hits, test_rows, strict=True) if row.task == ti]
            task_acc[t.name] = sum(mine) / len(mine) if mine else float("nan")

    return LoRAResult(
        test_accuracy=test_acc,
        task_test_accuracy=task_acc,
        val_accuracy=val_acc,
        val_accuracy_initial=val_initial,
        train_loss=losses,
        seconds_per_sample=train_seconds / max(len(fit_rows) * epochs, 1),
        train_seconds=train_seconds,
        peak_rss_mb=peak_rss_mb(),
        trainable_params=trainable,
        total_params=total,
        train_samples=len(fit_rows),
        val_samples=len(val_rows),
        test_samples=len(test_rows),
        config=config,
    )


# ----------------------------------------------------------------------------- step cost


@dataclass
class DeviceStepCost:
    """Per-sample time and peak memory of PAE's device step versus a LoRA training step.

    Each phase ran in its own fresh process (``*_peak_rss_mb`` is that process's high-water
    RSS, model load included); ``loaded_rss_mb`` is a process that only loaded the model and
    tokenizer, so ``*_extra_mb = peak − loaded`` is what the step itself adds.
    """

    samples: int
    batch_size: int
    warmup_batches: int
    pae_seconds_per_sample: float
    lora_seconds_per_sample: float
    loaded_rss_mb: float
    pae_peak_rss_mb: float
    lora_peak_rss_mb: float
    pae_extra_mb: float
    lora_extra_mb: float
    time_ratio: float  # lora / pae seconds per sample
    memory_ratio: float  # lora / pae peak RSS
    extra_memory_ratio: float  # lora / pae memory added over the loaded model
    torch_threads: int
    children: dict = field(default_factory=dict)  # raw reports of the three processes

    def to_dict(self) -> dict:
        return asdict(self)


def _child_main(config_path: str) -> None:
    """Run one measured phase (``load``, ``pae`` or ``lora``) and print a JSON report."""
    cfg = json.loads(Path(config_path).read_text())
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg["torch_threads"]))
    phase = cfg["phase"]
    prompts: list[str] = cfg["prompts"]
    bs = int(cfg["batch_size"])
    warmup = int(cfg["warmup_batches"])
    report: dict = {
        "phase": phase,
        "samples": len(prompts),
        "torch_threads": torch.get_num_threads(),
    }

    if phase in ("load", "pae"):
        backbone = load_backbone(cfg["backbone"])
        report["loaded_rss_mb"] = _proc_status_mb("VmRSS")
        if phase == "pae":
            layers = list(range(1, backbone.num_layers + 1))  # all hidden states, as the device
            for i in range(warmup):
                pivot_features(backbone, prompts[i * bs : (i + 1) * bs], layers, batch_size=bs)
            start = time.perf_counter()
            feats = pivot_features(backbone, prompts, layers, batch_size=bs)
            seconds = time.perf_counter() - start
            report.update(seconds=seconds, tokens=feats.tokens)
    elif phase == "lora":
        peft_model, view = _lora_model(
            cfg["backbone"],
            r=int(cfg["r"]),
            alpha=int(cfg["alpha"]),
            dropout=float(cfg["dropout"]),
            target_modules=cfg["target_modules"],
            seed=int(cfg["seed"]),
        )
        report["loaded_rss_mb"] = _proc_status_mb("VmRSS")
        decoder = _decoder(view.model)
        w = label_rows(view, cfg["label_words"])
        labels = torch.tensor(cfg["labels"])
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=float(cfg["lr"]))
        peft_model.train()

        def step(lo: int, hi: int) -> None:
            h = _pivot_states(decoder, view.tokenizer, prompts[lo:hi])
            loss = torch.nn.functional.cross_entropy(h @ w.T, labels[lo:hi])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for i in range(warmup):
            step(i * bs, (i + 1) * bs)
        start = time.perf_counter()
        for lo in range(0, len(prompts), bs):
            step(lo, lo + bs)
        report["seconds"] = time.perf_counter() - start
        report["trainable_params"] = sum(p.numel() for p in params)
    else:
        raise ValueError(f"unknown phase {phase!r}")
    report["peak_rss_mb"] = _child_peak_mb()
    report["ru_maxrss_mb"] = peak_rss_mb()
    print("@@REPORT@@" + json.dumps(report), flush=True)


def _run_child(cfg: dict, timeout: float | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="pae-stepcost-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(cfg))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.run(
            [sys.executable, "-m", "flower_pae.references", "--child", str(path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@REPORT@@"):
            return json.loads(line[len("@@REPORT@@") :])
    raise RuntimeError(
        f"device_step_cost child ({cfg['phase']}) failed with exit code {proc.returncode}:\n"
        + proc.stderr[-4000:]
    )


def device_step_cost(
    backbone_name: str,
    texts_prompts: Sequence[str],
    *,
    batch_size: int = 8,
    labels: Sequence[int] | None = None,
    label_words: Sequence[str] = ("yes", "no"),
    warmup_batches: int = 1,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    lr: float = 5e-4,
    seed: int = 0,
    torch_threads: int | None = None,
    timeout: float | None = None,
) -> DeviceStepCost:
    """Measure, from one call, PAE's device step against a LoRA training step, per sample.

    ``texts_prompts`` are finished prompts (``build_prompt(...)``); every one is
    processed once per phase, in batches of ``batch_size``, after ``warmup_batches`` untimed
    batches. PAE: an inference-mode forward keeping the pivot states of all layers
    (:func:`pivot_features`). LoRA: forward + backward + AdamW step with cross-entropy on the
    label logits of ``label_words`` (``labels`` index them; default: cycled). The three child
    processes (load only, PAE, LoRA) run one after another, so they do not compete for cores.
    """
    prompts = list(texts_prompts)
    if not prompts:
        raise ValueError("device_step_cost needs at least one prompt")
    if labels is None:
        labels = [i % len(label_words) for i in range(len(prompts))]
    if len(labels) != len(prompts):
        raise ValueError("labels and prompts differ in length")
    warmup_batches = min(warmup_batches, math.ceil(len(prompts) / batch_size))
    base = dict(
        backbone=backbone_name,
        prompts=prompts,
        labels=[int(x) for x in labels],
        label_words=list(label_words),
        batch_size=batch_size,
        warmup_batches=warmup_batches,
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=list(target_modules),
        lr=lr,
        seed=seed,
        torch_threads=torch_threads,
    )
    resolve_model_path(backbone_name)  # convert the default model once, here, not in a child
    reports = {ph: _run_child({**base, "phase": ph}, timeout) for ph in ("load", "pae", "lora")}
    n = len(prompts)
    loaded = reports["load"]["peak_rss_mb"]
    pae_t = reports["pae"]["seconds"] / n
    lora_t = reports["lora"]["seconds"] / n
    pae_m, lora_m = reports["pae"]["peak_rss_mb"], reports["lora"]["peak_rss_mb"]
    pae_x, lora_x = pae_m - loaded, lora_m - loaded
    return DeviceStepCost(
        samples=n,
        batch_size=batch_size,
        warmup_batches=warmup_batches,
        pae_seconds_per_sample=pae_t,
        lora_seconds_per_sample=lora_t,
        loaded_rss_mb=loaded,
        pae_peak_rss_mb=pae_m,
        lora_peak_rss_mb=lora_m,
        pae_extra_mb=pae_x,
        lora_extra_mb=lora_x,
        time_ratio=lora_t / pae_t if pae_t > 0 else float("inf"),
        memory_ratio=lora_m / pae_m if pae_m > 0 else float("inf"),
        extra_memory_ratio=lora_x / pae_x if pae_x > 0 else float("inf"),
        torch_threads=int(reports["pae"]["torch_threads"]),
        children=reports,
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_main(sys.argv[2])
    else:
        sys.exit("usage: python -m flower_pae.references --child CONFIG.json (internal)")
