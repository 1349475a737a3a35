"""Choose the server's training settings by cross-validation on the training rows only.

    python benchmarks/side_tuning_sweep.py --task cl:agnews --data-dir ../shared/data/cl_benchmark \
        --max-train 600 --max-test 600 --workers 2 --out runs/sweep-agnews.jsonl

The backbone's pivot states of every row are computed once (through the activation store, so a
second sweep is cheap). Each setting is then trained on two thirds of the training rows and
scored on the remaining third (3 folds, seeded), exactly as the protocol would train it, in
clear space (training on masked targets is identical, see tests/test_refresh.py); the test
rows are scored once per setting, for the record, and never used to choose. One JSON line per
setting: ``cv`` (mean fold accuracy, the selection criterion) and ``test``.

Two protocols are compared: one-shot differences (``refresh=1``, prediction
``softmax(z) + W·s``) and the refresh phase (``refresh=R`` rounds of one functional gradient
step of size ``eta`` on cross-entropy, prediction ``z + W·s``).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flower_pae.backbone import DEFAULT_MODEL, load_backbone, select_layers
from flower_pae.data import load_task
from flower_pae.device.shortcut import SHORTCUTS, build_prompt, label_rows, pivot_features
from flower_pae.device.store import ActivationStore
from flower_pae.oa_adapter import OAAdapterConfig
from flower_pae.side_network import LadderSideNetwork, SideNetworkTrainer, TrainerConfig
from flower_pae.wire import decode_activations, encode_activations


@dataclass(frozen=True)
class Setting:
    refresh: int = 1  # 1: one-shot; R > 1: R refresh rounds
    epochs: int = 20  # server epochs per round
    eta: float = 1.0  # refresh step
    r: int = 16
    lr: float = 3e-4
    out_lr: float = 0.05
    weight_decay: float = 0.0
    last: int = 0  # 0: every layer's state; K: only the last K layers'
    precision: str = "fp16"  # as uploaded: "fp16" or "int8" (one scale per layer)

    @property
    def space(self) -> str:
        return "prob" if self.refresh == 1 else "logit"


GRID = [
    Setting(),
    *(Setting(epochs=e) for e in (5, 10)),
    *(Setting(r=r) for r in (4, 8)),
    Setting(weight_decay=1e-2),
    Setting(out_lr=0.01),
    *(
        Setting(refresh=rr, epochs=e, eta=eta)
        for rr, e in ((10, 2), (20, 1), (30, 1))
        for eta in (1.0, 2.0, 4.0, 8.0)
    ),
    *(Setting(refresh=rr, epochs=1, eta=4.0) for rr in (40, 60)),
    *(Setting(refresh=30, epochs=1, eta=4.0, r=r) for r in (8, 32)),
    Setting(refresh=30, epochs=1, eta=4.0, lr=1e-3),
    Setting(refresh=30, epochs=1, eta=4.0, out_lr=0.1),
    Setting(refresh=30, epochs=1, eta=4.0, weight_decay=1e-3),
]

# Second grid (2026-11-26): L2 decay on the refresh phase, with larger steps and more rounds.
DECAY_GRID = [
    Setting(refresh=rr, epochs=1, eta=eta, weight_decay=wd)
    for rr in (30, 60)
    for eta in (4.0, 8.0, 16.0)
    for wd in (0.0, 0.01, 0.03, 0.1)
]
# Third grid: the decay grid's choice with fewer layers and int8 pivot states (fewer bytes).
COMPACT_GRID = [
    Setting(refresh=30, epochs=1, eta=8.0, weight_decay=0.03, last=k, precision=p)
    for k in (1, 2, 4, 8, 15, 0)
    for p in ("fp16", "int8")
]
# Fourth grid, for --shortcut mean: the decay grid's neighbourhood of its choice, with all
# layers in fp16 and with the compact grid's choice (int8, the last 8 layers).
SHORTCUT_GRID = [
    Setting(refresh=30, epochs=1, eta=eta, weight_decay=wd, last=last, precision=precision)
    for last, precision in ((0, "fp16"), (8, "int8"))
    for eta in (4.0, 8.0)
    for wd in (0.01, 0.03)
]
# Fifth grid, for --shortcut mean (issue 5's byte budget): int8 states of the last K layers,
# for the K whose run fits the budget (RESULTS.md, "A configuration chosen by a byte budget").
BUDGET_GRID = [
    Setting(refresh=30, epochs=1, eta=eta, weight_decay=wd, last=k, precision="int8")
    for k in (8, 9, 10, 11, 12, 13, 14)
    for eta in (4.0, 8.0)
    for wd in (0.01, 0.03)
]
GRIDS = {
    "main": GRID,
    "decay": DECAY_GRID,
    "compact": COMPACT_GRID,
    "shortcut": SHORTCUT_GRID,
    "budget": BUDGET_GRID,
}

_DATA: dict = {}


def _features(args: argparse.Namespace) -> dict:
    backbone = load_backbone(args.model)
    layers = select_layers("all", backbone.num_layers)
    task = load_task(
        args.task,
        data_dir=args.data_dir,
        seed=args.seed,
        max_train=args.max_train,
        max_test=args.max_test,
    )
    store = ActivationStore(args.store) if args.store else None
    rows = label_rows(backbone, task.labels)
    out = {"rows": rows}
    for split, examples in (("train", task.train), ("test", task.test)):
        prompts = [build_prompt(backbone, task, ex.text, args.max_tokens) for ex in examples]

        def compute(batch, _layers=layers):
            f = pivot_features(backbone, batch, _layers, args.batch_size, args.shortcut)
            return f.acts, f.final, f.seconds

        if store is not None:
            acts, final, _ = store.features(args.model, layers, prompts, compute, args.shortcut)
        else:
            acts, final, _ = compute(prompts)
        labels = torch.tensor([ex.label for ex in examples])
        # fp16, as the devices upload them
        out[split] = {"acts": acts.half(), "logits": final @ rows.T, "labels": labels}
        print(f"{split}: {len(examples)} rows", flush=True)
    return out


def _subset(split: dict, index: torch.Tensor) -> dict:
    return {k: v[index] for k, v in split.items()}


def _as_uploaded(split: dict, s: Setting) -> dict:
    """The states the server would hold under ``s``: its layers, its precision."""
    acts = split["acts"][:, -s.last :] if s.last else split["acts"]
    acts = decode_activations(encode_activations(acts, s.precision))
    return {**split, "acts": acts}


def fit_and_score(train: dict, evaluate: dict, rows: torch.Tensor, s: Setting) -> float:
    """Train as the server would (one-shot or refresh rounds); accuracy on ``evaluate``."""
    torch.manual_seed(0)
    acts = train["acts"]
    net = LadderSideNetwork(acts.shape[1], acts.shape[2], OAAdapterConfig(r_max=s.r), out_rank=s.r)
    net.add_task("task")
    net.fit_standardizer(acts)
    trainer = SideNetworkTrainer(
        net,
        TrainerConfig(epochs=s.epochs, lr=s.lr, out_lr=s.out_lr, weight_decay=s.weight_decay),
    )
    onehot = F.one_hot(train["labels"], rows.shape[0]).float()
    pinv = torch.linalg.pinv(rows.double()).float()
    for _ in range(s.refresh):
        if s.space == "prob":
            target = (onehot - torch.softmax(train["logits"], -1)) @ pinv.T
        else:
            with torch.no_grad():
                side = net.eval()(acts)
            grad = (onehot - torch.softmax(train["logits"] + side @ rows.T, -1)) @ rows
            target = side + s.eta * grad
        trainer.fit(acts, target)
    with torch.no_grad():
        side = net.eval()(evaluate["acts"])
    z = evaluate["logits"]
    scores = (torch.softmax(z, -1) if s.space == "prob" else z) + side @ rows.T
    return float((scores.argmax(-1) == evaluate["labels"]).float().mean())


def _job(s: Setting) -> dict:
    torch.set_num_threads(1)
    data = _DATA["data"]
    train, test = _as_uploaded(data["train"], s), _as_uploaded(data["test"], s)
    n = len(train["labels"])
    folds = torch.randperm(n, generator=torch.Generator().manual_seed(0)).chunk(3)
    start = time.perf_counter()
    cv = []
    for i, fold in enumerate(folds):
        rest = torch.cat([f for j, f in enumerate(folds) if j != i])
        cv.append(fit_and_score(_subset(train, rest), _subset(train, fold), data["rows"], s))
    test = fit_and_score(train, test, data["rows"], s)
    return {
        **s.__dict__,
        "cv": round(sum(cv) / len(cv), 4),
        "test": round(test, 4),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _init(data: dict) -> None:
    _DATA["data"] = data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-train", type=int, default=600)
    p.add_argument("--max-test", type=int, default=600)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", default=None, help="activation store directory (reuse forwards)")
    p.add_argument(
        "--features", default=None, help="features file: loaded if it exists, else written"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shortcut", choices=SHORTCUTS, default="pivot", help="what the devices keep")
    p.add_argument("--grid", choices=sorted(GRIDS), default="main", help="which settings to try")
    p.add_argument("--out", required=True, help="JSON-lines file, one setting per line")
    args = p.parse_args(argv)
    if args.features and Path(args.features).is_file():
        data = torch.load(args.features)
    else:
        data = _features(args)
        if args.features:
            torch.save(data, args.features)
    for split in ("train", "test"):
        data[split]["acts"] = data[split]["acts"].float()
    results = []
    with ProcessPoolExecutor(args.workers, initializer=_init, initargs=(data,)) as pool:
        for res in pool.map(_job, GRIDS[args.grid]):
            print(json.dumps(res), flush=True)
            results.append(res)
    with open(args.out, "w") as f:
        for res in results:
            f.write(json.dumps(res) + "\n")
    best = max(results, key=lambda r: r["cv"])
    print("chosen by cross-validation:", json.dumps(best))


if __name__ == "__main__":
    main()
