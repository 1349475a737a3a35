"""Run the privacy audit on run directories and write its report (markdown, PNG, JSON).

For each task key the server cached, the label-inference attacks are run on the server's
view (:mod:`~flower_pae.privacy.server_view`) with the attacker's public knowledge
(:mod:`~flower_pae.privacy.public_model`) and scored against the evaluator's ground truth
(:mod:`~flower_pae.privacy.evaluator`). Several run directories that differ in
``target_noise`` give the privacy/accuracy trade-off.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flower_pae.privacy import attacks as A
from flower_pae.privacy.evaluator import TaskTruth, ground_truth
from flower_pae.privacy.public_model import PublicModel, guess_tasks
from flower_pae.privacy.server_view import AuditError, ServerView, TaskView, load_server_view

KNOWN_DRAWS = 20  # random draws of "one known sample per class"


# ---- label inference and partition leakage -------------------------------------------------
def label_attacks(
    tv: TaskView,
    labels: np.ndarray,
    rows: np.ndarray | None,
    final_index: int | None,
    q: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Every label-inference and partition attack on one task's cached samples.

    Parameters
    ----------
    tv : TaskView
        The server's rows of the task.
    labels : np.ndarray
        Ground truth (evaluator's side), used only for scoring.
    rows : np.ndarray, optional
        LM-head rows of the label words, if the attacker knows them (else those attacks are
        skipped).
    final_index : int, optional
        Which uploaded layer is the backbone's last (normed) one, if any.
    q : np.ndarray, optional
        The secret rotation (evaluator's side), to measure how much of it an attack recovered.
    seed : int
        Seed of the k-means starts and of the known-sample draws.

    Returns
    -------
    dict
        Figures of the task (accuracies in [0, 1], ARI, purity, ...).
    """
    n = tv.num_samples
    classes = int(labels.max()) + 1 if n else 0
    counts = np.bincount(labels, minlength=classes) if n else np.zeros(0)
    out: dict[str, Any] = {
        "samples": n,
        "classes": classes,
        "chance_majority": float(counts.max() / n) if n else math.nan,
        "chance_uniform": 1.0 / classes if classes else math.nan,
    }
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    draws = [A.one_known_per_class(labels, rng) for _ in range(KNOWN_DRAWS)]

    def clusters(features: np.ndarray, k: int, prefix: str) -> np.ndarray:
        found = A.kmeans(features, k, seed=seed)
        out[f"{prefix}_best_permutation"] = A.best_permutation_accuracy(found, labels)
        out[f"{prefix}_ari"] = A.adjusted_rand_index(found, labels)
        out[f"{prefix}_purity"] = A.purity(found, labels)
        named = [A.name_clusters_with_known(found, features, i, labels[i]) for i in draws]
        out[f"{prefix}_one_known"] = float(np.mean([(p == labels).mean() for p in named]))
        return found

    # masked targets alone (no side knowledge): the spectrum gives C, k-means the groups
    targets = tv.targets.astype(np.float64)
    rank, spectrum = A.signal_rank(targets)
    out["targets_rank_estimate"] = rank
    out["classes_estimate"] = rank + 1
    out["targets_spectrum"] = [float(v) for v in spectrum[: min(len(spectrum), 12)]]
    found_clusters = {
        "targets_kmeans": clusters(A.project(targets, rank), rank + 1, "targets_kmeans")
    }

    # activations alone: k-means (told the true C, which favours the attacker), the last layer
    # and all layers, and a nearest-centroid guess from one known sample per class
    acts = tv.acts.astype(np.float64)
    last = acts[:, -1 if final_index is None else final_index]
    feats_last = A.standardize_pca(last)
    found_clusters["acts_last_kmeans"] = clusters(feats_last, classes, "acts_last_kmeans")
    clusters(A.standardize_pca(acts.reshape(n, -1)), classes, "acts_all_kmeans")
    guesses = [A.nearest_centroid(feats_last, i, labels[i]) for i in draws]
    out["acts_last_one_known"] = float(np.mean([(g == labels).mean() for g in guesses]))

    if rows is not None and final_index is not None:
        final = tv.acts[:, final_index].astype(np.float64)
        # activations + label words: the backbone's own zero-shot answer
        zero_shot = (final @ rows.T).argmax(1)
        out["acts_zero_shot"] = float((zero_shot == labels).mean())
        # the clusters named by the zero-shot answers: no labelled sample needed
        for prefix, found in found_clusters.items():
            named = A.name_clusters_by_votes(found, zero_shot)
            out[f"{prefix}_zero_shot_named"] = float((named == labels).mean())
        # masked targets + activations + label words: norm matching, then Procrustes
        cand = A.candidate_targets(final, rows)
        log_prior = np.log(A.softmax(final @ rows.T) + 1e-12)
        best = A.best_label_attack(targets, cand, log_prior, seed=seed)
        attack = best.informed
        out["best_attack"] = float((best.labels == labels).mean())
        out["best_attack_source"] = best.source
        out["halves_rotation_cosine"] = best.halves_cosine
        out["targets_informed"] = float((attack.labels == labels).mean())
        out["targets_norm_only"] = float((attack.norm_only == labels).mean())
        out["informed_fit_residual"] = attack.residual
        out["informed_predictions"] = best.labels
        if q is not None:
            # how well the estimated rotation matches the secret Q on the task's subspace
            basis = A.target_subspace(rows)  # where the task's lifted targets live
            err = np.linalg.norm(attack.rotation @ basis - q @ basis) / np.linalg.norm(q @ basis)
            out["rotation_error_on_task_subspace"] = float(err)
    return out


def node_histograms(tv: TaskView, labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean total-variation distance between each device's true and inferred label histogram."""
    classes = int(max(labels.max(), predicted.max())) + 1
    distances = []
    for node in np.unique(tv.nodes):
        mine = tv.nodes == node
        true = np.bincount(labels[mine], minlength=classes) / mine.sum()
        guess = np.bincount(predicted[mine], minlength=classes) / mine.sum()
        distances.append(0.5 * np.abs(true - guess).sum())
    return float(np.mean(distances)) if distances else math.nan


# ---- content leakage -----------------------------------------------------------------------
def content_attack(
    tv: TaskView,
    truth: TaskTruth,
    model: PublicModel,
    samples: int,
    pool_sizes: Sequence[int],
    seed: int = 0,
) -> dict[str, Any]:
    """Pick each sample's text out of a candidate pool by its uploaded pivot activations.

    The attacker holds a pool of candidate texts (the true ones plus distractors from the same
    corpus), runs the public backbone on each with the public prompt template, and answers the
    candidate whose pivot states are nearest to the uploaded ones.
    """
    rng = np.random.default_rng(seed)
    n = min(samples, tv.num_samples)
    chosen = np.sort(rng.choice(tv.num_samples, n, replace=False))
    biggest = max(pool_sizes)
    extra = max(0, biggest - n)
    if extra > len(truth.others):
        raise AuditError(
            f"task {truth.task.name}: {len(truth.others)} distractor texts, {extra} needed for "
            f"a pool of {biggest}; use smaller --pool-sizes"
        )
    picks = rng.choice(len(truth.others), extra, replace=False) if extra else []
    texts = [truth.texts[i] for i in chosen] + [truth.others[i] for i in picks]
    start = time.perf_counter()
    pool = model.pivot_activations(truth.task, texts)
    seconds = time.perf_counter() - start
    observed = tv.acts[chosen]
    out: dict[str, Any] = {"samples": n, "pool": len(texts), "forward_seconds": seconds}
    true_index = np.arange(n)
    views = {"all_layers": (observed.reshape(n, -1), pool.reshape(len(pool), -1))}
    if model.final_index is not None:
        views["last_layer"] = (observed[:, model.final_index], pool[:, model.final_index])
    for name, (obs, cand) in views.items():
        for size in pool_sizes:
            if size <= len(texts):
                out[f"{name}_top1_pool{size}"] = A.match_candidates(
                    obs, cand, true_index, size, seed=seed
                )
        own = np.linalg.norm(obs - cand[:n], axis=1) / np.linalg.norm(obs, axis=1)
        out[f"{name}_relative_distance_true"] = float(np.median(own))
        d = np.linalg.norm(obs[:, None] - cand[None], axis=-1)
        d[true_index, true_index] = np.inf
        near = d.min(1) / np.linalg.norm(obs, axis=1)
        out[f"{name}_relative_distance_nearest_other"] = float(np.median(near))
    for size in pool_sizes:
        out[f"chance_pool{size}"] = 1.0 / size
    return out


# ---- one run -------------------------------------------------------------------------------
def audit_run(
    run_dir: str | Path,
    content_samples: int = 50,
    pool_sizes: Sequence[int] = (10, 100),
    content: bool = True,
    seed: int = 0,
) -> tuple[dict[str, Any], ServerView, dict[str, TaskTruth]]:
    """Audit one run directory; returns its figures, the server's view and the truth."""
    view = load_server_view(run_dir)
    if view.num_samples == 0:
        raise AuditError(f"{run_dir}: the server cached no sample; nothing to audit")
    truth, secret = ground_truth(view)
    model = PublicModel.from_settings(view.settings)
    guessed = guess_tasks(view.settings, list(view.tasks))
    d = next(iter(view.tasks.values())).targets.shape[1]
    q = secret.rotation(d).numpy()
    summary = _summary(Path(run_dir))
    tasks: dict[str, Any] = {}
    for key, tv in view.tasks.items():
        t = truth[key]
        task_guess = guessed.get(key)
        rows = model.label_rows(task_guess.labels) if task_guess is not None else None
        figures = label_attacks(tv, t.labels, rows, model.final_index, q=q, seed=seed)
        predicted = figures.pop("informed_predictions", None)
        if predicted is not None:
            figures["node_histogram_tv"] = node_histograms(tv, t.labels, predicted)
        figures["task"] = t.task.name
        figures["attacker_task_guess"] = task_guess.name if task_guess else None
        figures["nodes"] = int(len(np.unique(tv.nodes)))
        figures["test_accuracy"] = summary.get("final_accuracy", {}).get(key)
        figures["zero_shot_test_accuracy"] = summary.get("zero_shot_accuracy", {}).get(key)
        if content and tv.num_samples:
            figures["content"] = content_attack(tv, t, model, content_samples, pool_sizes, seed)
        tasks[key] = figures
    result = {
        "run_dir": str(Path(run_dir).resolve()),
        "settings": {
            k: view.settings.get(k)
            for k in (
                "model",
                "stream",
                "max_train",
                "max_test",
                "num_devices",
                "partition",
                "layers",
                "shortcut",
                "precision",
                "method",
                "seed",
                "target_noise",
            )
        },
        "target_noise": float(view.settings.get("target_noise", 0.0) or 0.0),
        "server_holds": _holdings(view),
        "tasks": tasks,
        "average_accuracy": summary.get("average_accuracy"),
        "overall": _overall(tasks),
    }
    return result, view, truth


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _holdings(view: ServerView) -> dict[str, Any]:
    up = [m for m in view.messages if m["direction"] == "up"]
    down = [m for m in view.messages if m["direction"] == "down"]
    first = next(iter(view.tasks.values()))
    evaluation = {}
    for key in view.tasks:
        total = view.evaluation.get(f"{key}/total")
        if total:
            evaluation[key] = {
                "test_samples": total,
                "accuracy": view.evaluation.get(f"{key}/correct", 0.0) / total,
                "zero_shot_accuracy": view.evaluation.get(f"{key}/zero_shot_correct", 0.0) / total,
            }
    return {
        "messages": len(view.messages),
        "bytes_up": int(sum(m["bytes"] for m in up)),
        "bytes_down": int(sum(m["bytes"] for m in down)),
        "rounds": int(max(m["round"] for m in view.messages)),
        "nodes": len({m["node_id"] for m in view.messages}),
        "task_keys": list(view.tasks),
        "samples": view.num_samples,
        "samples_per_task": {k: t.num_samples for k, t in view.tasks.items()},
        "activation_shape": list(first.acts.shape[1:]),
        "target_dim": int(first.targets.shape[1]),
        "rejected_uploads": len(view.rejected),
        "refreshed_differences": view.refreshed,
        "evaluation_counts_last_round": evaluation,
    }


def _overall(tasks: dict[str, Any]) -> dict[str, float]:
    """Sample-weighted means over tasks of every scalar accuracy-like figure."""
    keys = [
        "chance_majority",
        "chance_uniform",
        "acts_last_kmeans_best_permutation",
        "acts_all_kmeans_best_permutation",
        "acts_last_one_known",
        "acts_zero_shot",
        "acts_last_kmeans_zero_shot_named",
        "targets_kmeans_zero_shot_named",
        "targets_kmeans_best_permutation",
        "targets_kmeans_one_known",
        "targets_informed",
        "best_attack",
        "targets_kmeans_ari",
        "acts_last_kmeans_ari",
        "acts_all_kmeans_ari",
    ]
    out = {}
    for name in keys:
        pairs = [(t[name], t["samples"]) for t in tasks.values() if t.get(name) is not None]
        if pairs:
            total = sum(w for _, w in pairs)
            out[name] = float(sum(v * w for v, w in pairs) / total)
    return out


# ---- the report ----------------------------------------------------------------------------
LABEL_ROWS = [
    ("chance_majority", "chance (always the majority class)", "class frequencies"),
    ("acts_last_kmeans_best_permutation", "k-means on activations (last layer)", "C; †"),
    ("acts_all_kmeans_best_permutation", "k-means on activations (all layers)", "C; †"),
    ("acts_last_kmeans_one_known", "k-means on activations (last layer), named", "1 per class"),
    ("acts_last_one_known", "nearest known sample, activations", "1 labelled sample per class"),
    ("acts_zero_shot", "zero-shot: last layer through the LM head", "label words"),
    (
        "acts_last_kmeans_zero_shot_named",
        "k-means on activations, named by zero-shot",
        "label words",
    ),
    ("targets_kmeans_best_permutation", "k-means on masked targets", "none (C from rank); †"),
    ("targets_kmeans_one_known", "k-means on masked targets, clusters named", "1 per class"),
    (
        "targets_kmeans_zero_shot_named",
        "k-means on masked targets, named by zero-shot",
        "label words",
    ),
    ("targets_informed", "masked targets + activations, norm/Procrustes", "label words"),
    ("best_attack", "the above, self-checked (two halves agree), else zero-shot", "label words"),
]


def write_report(
    results: list[dict[str, Any]], view: ServerView, truth: dict[str, TaskTruth], out: Path
) -> Path:
    """Write ``report.md``, ``audit.json`` and the PNG plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    main = results[0]
    plots = {
        "label_inference": _plot_labels(main, out / "label_inference.png"),
        "geometry": _plot_geometry(view, truth, out / "geometry.png"),
    }
    if any("content" in t for t in main["tasks"].values()):
        plots["content"] = _plot_content(main, out / "content.png")
    if len(results) > 1:
        plots["tradeoff"] = _plot_tradeoff(results, out / "tradeoff.png")
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "runs": results,
        "plots": {k: p.name for k, p in plots.items()},
    }
    (out / "audit.json").write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False))
    (out / "report.md").write_text(_markdown(results, plots))
    return out / "report.md"


def run_audit(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    content_samples: int = 50,
    pool_sizes: Sequence[int] = (10, 100),
    content: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Audit run directories (the first fully, the others for the noise trade-off).

    Returns
    -------
    dict
        What ``audit.json`` holds.
    """
    if not run_dirs:
        raise AuditError("give at least one run directory")
    results = []
    main_view, main_truth = None, None
    for i, run_dir in enumerate(run_dirs):
        result, view, truth = audit_run(
            run_dir, content_samples, pool_sizes, content=content and i == 0, seed=seed
        )
        results.append(result)
        if i == 0:
            main_view, main_truth = view, truth
    write_report(results, main_view, main_truth, Path(out))
    return json.loads((Path(out) / "audit.json").read_text())


def _fmt(value: Any, pct: bool = True) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def _markdown(results: list[dict[str, Any]], plots: dict[str, Path]) -> str:
    main = results[0]
    held = main["server_holds"]
    s = main["settings"]
    shortcut = s.get("shortcut") or "pivot"  # runs from before the setting recorded none
    states = f"{shortcut} states"
    lines = [
        "# Privacy audit: what an honest-but-curious server learns",
        "",
        f"Run `{main['run_dir']}`: model `{s['model']}`, stream `{s['stream']}`, "
        f"{s['num_devices']} devices ({s['partition']}), layers `{s['layers']}`, "
        f"shortcut `{shortcut}`, "
        f"{s['precision']} activations, target_noise {main['target_noise']:g}, seed {s['seed']}.",
        f"Audited {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "Everything the attacks use is rebuilt from the run's wire dumps (`wire/*.pb`), replayed "
        "through the server's own validation and first-come caching: "
        f"{held['samples']} cached samples in {len(held['task_keys'])} task key(s), "
        f"{held['messages']} messages from {held['nodes']} nodes over {held['rounds']} rounds "
        f"({held['bytes_up']:,} B up, {held['bytes_down']:,} B down). Per sample: {states} "
        f"{held['activation_shape'][0]} × {held['activation_shape'][1]}, a masked target of "
        f"{held['target_dim']} floats, a 16-byte keyed-hash id, the uploading node and round. "
        "Ground truth (labels, texts, the secret Q) comes from the evaluator's side only, to "
        "score the attacks.",
        "",
        "## Label inference",
        "",
        "Accuracy of recovering each cached sample's label. † best one-to-one map from clusters "
        "to labels, which the attacker does not know: an upper bound for a blind attacker, "
        "reached once it can name the clusters (for example from one known sample per class, "
        "next row). 'C' = the attacker is told the number of classes.",
        "",
    ]
    names = [t["task"] for t in main["tasks"].values()]
    lines.append("| attack | side knowledge | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for key, label, knowledge in LABEL_ROWS:
        cells = [_fmt(t.get(key)) for t in main["tasks"].values()]
        bold = key == "best_attack"
        cells = [f"**{c}**" if bold and c != "–" else c for c in cells]
        lines.append(f"| {label} | {knowledge} | " + " | ".join(cells) + " |")
    lines += ["", f"![label inference]({plots['label_inference'].name})", ""]
    lines += ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    extra = [
        ("classes (true / read off the targets' spectrum)", None),
        ("norm matching alone (first step of the informed attack)", "targets_norm_only"),
        ("Procrustes fit residual ‖M − X·Rᵀ‖/‖M‖", "informed_fit_residual"),
        (
            "cosine of the rotations fitted on two halves (0 = fits to noise)",
            "halves_rotation_cosine",
        ),
        ("what the best attack answered with", "best_attack_source"),
        (
            "error of the recovered rotation on the task's subspace",
            "rotation_error_on_task_subspace",
        ),
        ("per-device label histogram, total variation (informed attack)", "node_histogram_tv"),
        ("attacker's guess of the task", "attacker_task_guess"),
    ]
    for label, key in extra:
        if key is None:
            cells = [f"{t['classes']} / {t['classes_estimate']}" for t in main["tasks"].values()]
        elif key in ("attacker_task_guess", "best_attack_source"):
            cells = [str(t.get(key)) for t in main["tasks"].values()]
        elif key == "targets_norm_only":
            cells = [_fmt(t.get(key)) for t in main["tasks"].values()]
        else:
            cells = [_fmt(t.get(key), pct=False) for t in main["tasks"].values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Partition leakage",
        "",
        "How well the server groups samples by class without knowing any label: adjusted Rand "
        "index (1 = the true partition, 0 = random) and purity of k-means clusters.",
        "",
        "| features | " + " | ".join(f"{n} ARI | {n} purity" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for prefix, label in [
        ("targets_kmeans", "masked targets (C from the spectrum)"),
        ("acts_last_kmeans", "activations, last layer (told C)"),
        ("acts_all_kmeans", "activations, all layers (told C)"),
    ]:
        cells = [
            f"{_fmt(t.get(prefix + '_ari'), pct=False)} | {_fmt(t.get(prefix + '_purity'))}"
            for t in main["tasks"].values()
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"![geometry]({plots['geometry'].name})", ""]
    if "content" in plots:
        lines += [
            f"## Content leakage from the uploaded {states}",
            "",
            "The attacker holds a pool of candidate texts (the true one plus distractors from the "
            "same corpus), runs the public backbone with the public prompt template on each, and "
            f"answers the candidate whose {states} are nearest (Euclidean) to the uploaded "
            "ones. Top-1 accuracy, against chance 1/pool:",
            "",
            "| task | features | samples | "
            + " | ".join(f"pool {p}" for p in _pool_sizes(main))
            + " | median ‖A − A'(true)‖/‖A‖ | median to nearest other |",
            "|---|---|---|" + "---|" * (len(_pool_sizes(main)) + 2),
        ]
        for t in main["tasks"].values():
            c = t.get("content")
            if not c:
                continue
            for view_name in ("all_layers", "last_layer"):
                if f"{view_name}_relative_distance_true" not in c:
                    continue
                cells = [_fmt(c.get(f"{view_name}_top1_pool{p}")) for p in _pool_sizes(main)]
                lines.append(
                    f"| {t['task']} | {view_name.replace('_', ' ')} | {c['samples']} | "
                    + " | ".join(cells)
                    + f" | {c[f'{view_name}_relative_distance_true']:.2e}"
                    f" | {c[f'{view_name}_relative_distance_nearest_other']:.3f} |"
                )
            chance = [_fmt(c.get(f"chance_pool{p}")) for p in _pool_sizes(main)]
            lines.append(f"| {t['task']} | chance | | " + " | ".join(chance) + " | | |")
        lines += ["", f"![content]({plots['content'].name})", ""]
    if held.get("refreshed_differences"):
        lines += [
            f"**Refresh phase on**: the devices also sent {held['refreshed_differences']} "
            "refreshed differences (masked gradients), which this audit counts but does not "
            "attack; the uploaded targets of this run are masked gradients too, so the informed "
            "attack's candidates (one-shot residuals) do not model them.",
            "",
        ]
    lines += ["## Metadata", ""]
    ev = held["evaluation_counts_last_round"]
    lines.append(
        "Besides the arrays, the server sees which node uploaded which sample in which round "
        "(so how many samples each device has per task), every message's size, and the "
        "devices' evaluation counts: in the last round "
        + (
            ", ".join(
                f"{main['tasks'][k]['task']}: accuracy {_fmt(v['accuracy'])}, zero-shot "
                f"{_fmt(v['zero_shot_accuracy'])} on {v['test_samples']:.0f} test rows"
                for k, v in ev.items()
            )
            or "none"
        )
        + ". It sees no test sample's content."
    )
    lines.append("")
    if len(results) > 1:
        lines += [
            "## Noise on the uploaded differences: privacy against accuracy",
            "",
            "`target_noise` σ adds Gaussian noise of norm ≈ σ × the RMS target norm of the "
            "upload to each lifted difference on the device, before masking.",
            "",
            "| target_noise | targets attack, self-checked | informed attack, no fallback | "
            "k-means on targets, 1 known per class | k-means on targets † | halves' cosine | "
            "no targets: zero-shot | no targets: k-means named by zero-shot | test accuracy |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(results, key=lambda r: r["target_noise"]):
            o = r["overall"]
            cosines = [t.get("halves_rotation_cosine") for t in r["tasks"].values()]
            cosine = ", ".join(_fmt(c, pct=False) for c in cosines)
            lines.append(
                f"| {r['target_noise']:g} | {_fmt(o.get('best_attack'))} | "
                f"{_fmt(o.get('targets_informed'))} | "
                f"{_fmt(o.get('targets_kmeans_one_known'))} | "
                f"{_fmt(o.get('targets_kmeans_best_permutation'))} | "
                f"{cosine} | {_fmt(o.get('acts_zero_shot'))} | "
                f"{_fmt(o.get('acts_last_kmeans_zero_shot_named'))} | "
                f"{_fmt(r.get('average_accuracy'))} |"
            )
        lines += ["", f"![trade-off]({plots['tradeoff'].name})", ""]
    lines += ["## What this means", "", _conclusion(main), ""]
    return "\n".join(lines)


def _pool_sizes(result: dict[str, Any]) -> list[int]:
    sizes = set()
    for t in result["tasks"].values():
        for k in t.get("content", {}):
            if k.startswith("chance_pool"):
                sizes.add(int(k.removeprefix("chance_pool")))
    return sorted(sizes)


def _conclusion(result: dict[str, Any]) -> str:
    o = result["overall"]
    parts = []
    if "best_attack" in o:
        parts.append(
            f"Knowing a task's label words (public for a public benchmark), the server labels "
            f"{_fmt(o['best_attack'])} of the cached training samples from their masked "
            f"differences, against {_fmt(o.get('acts_zero_shot'))} from the activations alone "
            f"(the backbone's zero-shot answer; "
            f"{_fmt(o.get('acts_last_kmeans_zero_shot_named'))} when it clusters the last-layer "
            f"states and names the clusters by zero-shot votes) and "
            f"{_fmt(o.get('chance_majority'))} by chance."
        )
    parts.append(
        f"Without any side knowledge it partitions the samples by class (ARI "
        f"{_fmt(o.get('targets_kmeans_ari'), pct=False)} on masked targets against "
        f"{_fmt(o.get('acts_last_kmeans_ari'), pct=False)} on activations); the groups are "
        f"unnamed until it learns one sample per class, which gives "
        f"{_fmt(o.get('targets_kmeans_one_known'))}."
    )
    content = [t["content"] for t in result["tasks"].values() if "content" in t]
    if content:
        best = content[0]
        sizes = _pool_sizes(result)
        if sizes:
            parts.append(
                f"Given a pool of candidate texts that contains the true one, it picks the right "
                f"text {_fmt(best.get(f'all_layers_top1_pool{sizes[-1]}'))} of the time from "
                f"{sizes[-1]} candidates (chance {_fmt(1 / sizes[-1])}): the uploaded states are a "
                f"deterministic fingerprint of the prompt."
            )
    informed = o.get("best_attack")
    zero_shot = max(o.get("acts_zero_shot", 0.0), o.get("acts_last_kmeans_zero_shot_named", 0.0))
    if informed is not None and informed >= 0.9:
        parts.append(
            f"At target_noise {result['target_noise']:g} the rotation Q hides the label *names* "
            "only from a server that does not know the label words; it hides neither the class "
            "structure nor, for a server that knows them, the labels themselves."
        )
    elif informed is not None and zero_shot is not None:
        relation = "within 5 points of" if informed < zero_shot + 0.05 else "above"
        parts.append(
            f"At target_noise {result['target_noise']:g} the best attack on the differences "
            f"({_fmt(informed)}) is {relation} the best that the activations alone give "
            f"({_fmt(zero_shot)})."
        )
    parts.append("The activations identify any text the server can guess.")
    return " ".join(parts)


# ---- plots ---------------------------------------------------------------------------------
def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_labels(result: dict[str, Any], path: Path) -> Path:
    tasks = list(result["tasks"].values())
    rows = [r for r in LABEL_ROWS if any(t.get(r[0]) is not None for t in tasks)]
    fig = _figure((10.0, 0.45 * len(rows) * len(tasks) + 1.5))
    ax = fig.add_subplot()
    height = 0.8 / len(tasks)
    ys = np.arange(len(rows))[::-1]
    for i, t in enumerate(tasks):
        values = [t.get(key) if t.get(key) is not None else np.nan for key, _, _ in rows]
        pos = ys + (i - (len(tasks) - 1) / 2) * height
        bars = ax.barh(pos, values, height, label=t["task"])
        ax.bar_label(bars, [f"{100 * v:.0f}%" for v in values], fontsize=7, padding=2)
    ax.set_yticks(ys, [f"{label} [{know}]" for _, label, know in rows], fontsize=7)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("accuracy on the cached training samples")
    ax.set_title("Label inference by the server (†: best cluster → label map)", fontsize=10)
    if len(tasks) > 1:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def _plot_geometry(view: ServerView, truth: dict[str, TaskTruth], path: Path) -> Path:
    key = next(iter(view.tasks))
    tv, labels = view.tasks[key], truth[key].labels
    fig = _figure((10.0, 4.2))
    panels = [
        ("masked targets (server's view)", A.project(tv.targets.astype(np.float64), 2)),
        ("activations, last layer", A.standardize_pca(tv.acts[:, -1], 2)),
    ]
    for i, (title, xy) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for c in np.unique(labels):
            pts = xy[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=8, label=truth[key].task.labels[c])
        ax.set_title(f"{truth[key].task.name}: {title}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.axes[0].legend(fontsize=7, markerscale=2)
    fig.suptitle("Top-2 principal directions, coloured by the true label (never sent)", size=9)
    fig.savefig(path, dpi=120)
    return path


def _plot_content(result: dict[str, Any], path: Path) -> Path:
    fig = _figure((5.5, 4.0))
    ax = fig.add_subplot()
    sizes = _pool_sizes(result)
    for t in result["tasks"].values():
        c = t.get("content")
        if c:
            ax.plot(
                sizes, [c.get(f"all_layers_top1_pool{p}") for p in sizes], "o-", label=t["task"]
            )
    ax.plot(sizes, [1 / p for p in sizes], "k:", label="chance")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("candidate pool size")
    ax.set_ylabel("top-1: right text picked")
    ax.set_title("Content leakage from pivot activations")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def _plot_tradeoff(results: list[dict[str, Any]], path: Path) -> Path:
    runs = sorted(results, key=lambda r: r["target_noise"])
    xs = [r["target_noise"] for r in runs]
    fig = _figure((6.5, 4.5))
    ax = fig.add_subplot()
    series = [
        ("best_attack", "masked targets + label words (self-checked)", "o-"),
        ("targets_informed", "informed attack without the fallback", "x:"),
        ("targets_kmeans_one_known", "attack: k-means on targets, 1 known/class", "s-"),
        ("acts_zero_shot", "without targets: zero-shot", "--"),
        ("acts_last_kmeans_zero_shot_named", "without targets: k-means named by zero-shot", "-."),
        ("chance_majority", "chance", ":"),
    ]
    for key, label, style in series:
        ys = [r["overall"].get(key, np.nan) for r in runs]
        ax.plot(xs, ys, style, label=label)
    ax.plot(xs, [r.get("average_accuracy") or np.nan for r in runs], "D-k", label="run test acc.")
    ax.set_xscale("symlog", linthresh=max(min([x for x in xs if x > 0], default=1.0), 1e-3))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("target_noise (noise norm / RMS target norm)")
    ax.set_ylabel("accuracy")
    ax.set_title("Noise on the differences: privacy vs accuracy")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
