"""Poisoning devices against the server's side-network training, with and without defences.

    python benchmarks/poisoning.py --task pypi:bbc --max-train 200 --max-test 100 \
        --devices 8 --poisoned 0,1,2 --attacks scale,flip --clip 0,1.5,3 --agree 0,10 \
        --out runs/poisoning.jsonl

The backbone's pivot states of every row are computed once (through the machine's activation
store, as the devices do, so a second run is cheap). The training rows are split over
``--devices`` devices as a simulation would (``--partition``, seeded); the first ``k`` devices
of the split are poisoning: they upload their prediction differences multiplied by
``--factor`` (``scale``, ×100 by default) or negated (``flip``), masked by the cohort's
rotation like every other device's. The server is the real one: ``PAEStrategy`` from
``build_strategy`` with the run's default settings, ``clip_targets = c`` (each target's norm
clipped at ``c ×`` the median norm of the task's targets before training; 0 = off) and
``agreement_neighbours = n`` (devices whose differences disagree with those of their ``n``
nearest samples of other devices are left out; 0 = off). It receives one training reply per
device, caches them and trains for ``--rounds`` rounds (``rounds_per_task``); the devices'
side of the prediction (decode ``s = Qᵀ·s̃``, ``argmax(softmax(z) + W·s)``) is then scored on
the test rows.

With ``--refresh-step η`` (the refresh phase, as in the ``agnews`` config: one server epoch per
round) the first differences are the cross-entropy gradients against ``s = 0``, and in every
later round each device sends, for its samples, the gradient against the server's current
output (``held_outputs``, what its training message carries), the poisoning devices' gradients
scaled or flipped; devices predict ``argmax(z + W·s)``.

One JSON line per (attack, k, c, n): test accuracy of ``argmax(softmax(z) + W·s)`` (mean over
``--repeats`` partitions, rotations and server seeds, and each), the backbone's zero-shot
accuracy, the fraction of training samples that were poisoned, how many targets the
clipping touched and how many devices the agreement check left out (means).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

from flower_pae.backbone import DEFAULT_MODEL, cache_dir, load_backbone, select_layers
from flower_pae.config import RunConfig
from flower_pae.data import load_task, partition
from flower_pae.device.difference import gradient_difference, lift, mask, residual, unmask
from flower_pae.device.shortcut import build_prompt, label_rows, pivot_features
from flower_pae.device.store import ActivationStore
from flower_pae.wire import (
    BASIS,
    CONFIG,
    REFRESH,
    UPLOAD,
    array_record,
    encode_activations,
    ids_to_array,
)
from simulations.server_app import build_strategy


def random_rotation(d: int, seed: int) -> torch.Tensor:
    """The devices' secret rotation ``Q`` (a seeded one: the benchmark plays every device)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


def features(args: argparse.Namespace) -> dict:
    """Pivot activations (fp16, as uploaded), label logits and labels of both splits."""
    backbone = load_backbone(args.model)
    layers = select_layers("all", backbone.num_layers)
    task = load_task(args.task, seed=args.seed, max_train=args.max_train, max_test=args.max_test)
    store = ActivationStore(cache_dir() / "activations")
    rows = label_rows(backbone, task.labels)
    out: dict = {"rows": rows, "task": task.name}
    for split, examples in (("train", task.train), ("test", task.test)):
        prompts = [build_prompt(backbone, task, ex.text, args.max_tokens) for ex in examples]

        def compute(batch, _layers=layers):
            f = pivot_features(backbone, batch, _layers, args.batch_size)
            return f.acts, f.final, f.seconds

        acts, final, _ = store.features(args.model, layers, prompts, compute)
        out[split] = {
            "acts": acts.half().float(),
            "logits": final @ rows.T,
            "labels": torch.tensor([ex.label for ex in examples]),
        }
        print(f"{split}: {len(examples)} rows", flush=True)
    return out


def poison(
    targets: torch.Tensor, shards: list[list[int]], k: int, attack: str, factor: float
) -> torch.Tensor:
    """The uploaded targets when the first ``k`` devices' differences are scaled or flipped."""
    out = targets.clone()
    rows = [i for shard in shards[:k] for i in shard]
    if attack == "scale":
        out[rows] *= factor
    elif attack == "flip":
        out[rows] *= -1.0
    else:
        raise ValueError(f"attack must be 'scale' or 'flip', got {attack!r}")
    return out


def training_reply(node: int, upload: dict, **records: ArrayRecord) -> Message:
    """A training reply of device ``node`` as the server's grid hands it over: its upload, the
    benchmark's one task key and any further ``records`` (basis, refresh)."""
    content = RecordDict(
        {UPLOAD: array_record(upload), CONFIG: ConfigRecord({"task_key": "0" * 16}), **records}
    )
    meta = Metadata(1, f"m{node}", node, 0, "q", "", 0.0, 60.0, "train")
    return Message(content, metadata=meta)


def device_replies(
    data: dict, targets: torch.Tensor, shards: list[list[int]], q: torch.Tensor
) -> list[Message]:
    """One training reply per device, as the ClientApp builds it: fp16 pivot activations,
    masked (rotated) differences and opaque ids."""
    acts = data["train"]["acts"]
    replies = []
    for node, shard in enumerate(shards, start=1):
        ids = sample_ids(node, shard)
        arrays = {
            "ids": ids_to_array(ids),
            "acts": acts[shard].half().numpy(),
            "targets": mask(targets[shard], q).numpy(),
        }
        # the targets as their d coordinates: the identity basis (C = d)
        basis = array_record({"basis": np.eye(arrays["targets"].shape[1], dtype=np.float32)})
        replies.append(training_reply(node, arrays, **{BASIS: basis}))
    return replies


def sample_ids(node: int, shard: list[int]) -> list[bytes]:
    return [f"{node:04d}-{i:011d}".encode() for i in shard]


def refresh_replies(
    strategy,
    data: dict,
    shards: list[list[int]],
    q: torch.Tensor,
    k: int,
    attack: str,
    factor: float,
) -> list[Message]:
    """A refresh round's replies: no new samples; for each device's samples the masked
    cross-entropy gradient against the server's current output, poisoned for the first k."""
    train = data["train"]
    _, layers, d = train["acts"].shape
    replies = []
    for node, shard in enumerate(shards, start=1):
        ids = sample_ids(node, shard)
        side = unmask(torch.from_numpy(strategy.held_outputs(ids)), q)
        labels = train["labels"][shard]
        grads = gradient_difference(train["logits"][shard], data["rows"], labels, side).float()
        if node <= k:
            grads = poison(grads, [list(range(len(shard)))], 1, attack, factor)
        empty = encode_activations(torch.zeros(0, layers, d), "fp16")
        empty.update(ids=ids_to_array([]), targets=np.zeros((0, d), np.float32))
        refresh = {"ids": ids_to_array(ids), "targets": mask(grads, q).numpy()}
        replies.append(training_reply(node, empty, **{REFRESH: array_record(refresh)}))
    return replies


def train_and_score(
    data: dict,
    replies: list[Message],
    q: torch.Tensor,
    cfg: RunConfig,
    rounds: int,
    refresh=None,
) -> tuple[float, int, int]:
    """The server's own code path: :class:`PAEStrategy` caches the replies and trains for
    ``rounds`` rounds (``refresh(strategy)``: the replies of each later round); devices decode
    the side output. Test accuracy, targets clipped and devices left out in the last round."""
    with tempfile.TemporaryDirectory() as out:
        strategy = build_strategy(cfg, Path(out))
        for server_round in range(1, rounds + 1):
            if server_round == 1:
                sent = replies
            else:
                sent = refresh(strategy) if refresh is not None else []
            _, metrics = strategy.aggregate_train(server_round, sent)
        side = unmask(strategy.trainer.predict(data["test"]["acts"]), q)
    test, rows = data["test"], data["rows"]
    if cfg.refresh_step:
        scores = test["logits"] + side @ rows.T
    else:
        scores = torch.softmax(test["logits"], -1) + side @ rows.T
    accuracy = float((scores.argmax(-1) == test["labels"]).float().mean())
    return accuracy, int(metrics.get("clipped_targets", 0)), int(metrics.get("excluded_devices", 0))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", default="pypi:bbc")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-train", type=int, default=200)
    p.add_argument("--max-test", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--poisoned", default="0,1,2", help="numbers of poisoning devices")
    p.add_argument("--attacks", default="scale,flip")
    p.add_argument("--factor", type=float, default=100.0, help="the scale attack's factor")
    p.add_argument("--clip", default="0,1.5,3", help="clip_targets values (0 = no defence)")
    p.add_argument("--agree", default="0,10", help="agreement_neighbours values (0 = off)")
    p.add_argument("--partition", default="iid", choices=("iid", "dirichlet"))
    p.add_argument(
        "--refresh-step", type=float, default=0.0, help="η of the refresh phase (0: one-shot)"
    )
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--rounds", type=int, default=2, help="server fits (rounds_per_task)")
    p.add_argument("--seed", type=int, default=0, help="data subsample; first repeat's seed")
    p.add_argument(
        "--repeats", type=int, default=3, help="partitions, rotations and server seeds per cell"
    )
    p.add_argument("--out", required=True, help="JSON-lines file, one line per configuration")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = features(args)
    train = data["train"]
    if args.refresh_step:
        side = torch.zeros(len(train["labels"]), train["acts"].shape[2])
        targets = gradient_difference(train["logits"], data["rows"], train["labels"], side)
        targets = targets.float()
    else:
        targets = lift(data["rows"], residual(train["logits"], train["labels"])).float()
    z = data["test"]["logits"]
    zero_shot = float((z.argmax(-1) == data["test"]["labels"]).float().mean())
    attacks = args.attacks.split(",")
    results = []
    for attack in attacks:
        for k in (int(v) for v in args.poisoned.split(",")):
            if k == 0 and attack != attacks[0]:
                continue  # k = 0 is the same clean run for every attack
            cells = [
                (float(c), int(a)) for c in args.clip.split(",") for a in args.agree.split(",")
            ]
            for clip, agree in cells:
                t0 = time.perf_counter()
                accuracies, counts, fractions, excluded = [], [], [], []
                for repeat in range(args.repeats):
                    # each repeat: another partition, secret rotation and server seed
                    seed = args.seed + repeat
                    q = random_rotation(train["acts"].shape[2], seed)
                    shards = partition(
                        train["labels"].tolist(),
                        args.devices,
                        scheme=args.partition,
                        alpha=args.alpha,
                        seed=seed,
                    )
                    uploaded = poison(targets, shards, k, attack, args.factor)
                    replies = device_replies(data, uploaded, shards, q)
                    cfg = RunConfig(
                        seed=seed,
                        clip_targets=clip,
                        agreement_neighbours=agree,
                        refresh_step=args.refresh_step,
                        server_epochs=1 if args.refresh_step else RunConfig.server_epochs,
                        checkpoint_every=0,
                    )
                    later = None
                    if args.refresh_step:

                        def later(strategy, shards=shards, q=q, k=k, attack=attack):
                            return refresh_replies(
                                strategy, data, shards, q, k, attack, args.factor
                            )

                    acc, count, left_out = train_and_score(
                        data, replies, q, cfg, args.rounds, later
                    )
                    accuracies.append(round(acc, 4))
                    counts.append(count)
                    excluded.append(left_out)
                    fractions.append(sum(len(s) for s in shards[:k]) / len(targets))
                row = {
                    "task": data["task"],
                    "attack": attack if k else "none",
                    "factor": args.factor if attack == "scale" and k else None,
                    "poisoned_devices": k,
                    "devices": args.devices,
                    "poisoned_fraction": round(sum(fractions) / len(fractions), 4),
                    "partition": args.partition,
                    "refresh_step": args.refresh_step,
                    "rounds": args.rounds,
                    "clip_targets": clip,
                    "clipped_targets": round(sum(counts) / len(counts), 1),
                    "agreement_neighbours": agree,
                    "excluded_devices": excluded,
                    "accuracy": round(sum(accuracies) / len(accuracies), 4),
                    "accuracies": accuracies,
                    "zero_shot": round(zero_shot, 4),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                print(json.dumps(row), flush=True)
                results.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for row in results:
            f.write(json.dumps(row) + "\n")
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s); "
        f"total {time.perf_counter() - start:.0f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
