"""Attacks an honest-but-curious server can run on what it holds, and how to score them.

Pure numpy: k-means, an optimal cluster-to-label assignment, clustering scores, and the
label-inference attacks on masked prediction differences. Nothing here knows the devices'
secret; the attacks only use arrays the server received plus public knowledge (the backbone's
LM-head rows of a task's label words, when the attacker knows or guesses them).

Why the masked targets leak labels: a device uploads ``m = Q·pinv(W)·(e_y − p)`` with ``p`` the
backbone's softmax over the label words. ``Q`` is orthogonal, so norms and inner products
survive it, and every target of a task lies in the same ``C − 1``-dimensional subspace, where
the residuals ``e_y − p`` form ``C`` groups, one per class. The attacks below exploit exactly
that geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


# ---- clustering ----------------------------------------------------------------------------
def kmeans(
    x: np.ndarray, k: int, seed: int = 0, n_init: int = 20, max_iter: int = 100
) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; the best of ``n_init`` starts (lowest inertia).

    Parameters
    ----------
    x : np.ndarray
        Points, shape (N, D).
    k : int
        Number of clusters (clipped to N).
    seed : int
        Seed of the initialisations.
    n_init : int
        Independent starts.
    max_iter : int
        Lloyd iterations per start.

    Returns
    -------
    np.ndarray
        Cluster index of each point, shape (N,), int64.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = max(1, min(int(k), n))
    rng = np.random.default_rng(seed)
    sq = (x * x).sum(1)
    best, best_inertia = np.zeros(n, dtype=np.int64), np.inf
    for _ in range(n_init):
        centers = [x[rng.integers(n)]]
        for _ in range(1, k):
            dist = np.min(((x[:, None, :] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
            total = dist.sum()
            probs = dist / total if total > 0 else np.full(n, 1.0 / n)
            centers.append(x[rng.choice(n, p=probs)])
        c = np.array(centers)
        assign = np.full(n, -1, dtype=np.int64)
        for _ in range(max_iter):
            d2 = sq[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None]
            new = d2.argmin(1)
            if np.array_equal(new, assign):
                break
            assign = new
            for j in range(k):
                members = x[assign == j]
                # an empty cluster restarts at the point farthest from its centre
                c[j] = members.mean(0) if len(members) else x[d2.min(1).argmax()]
        inertia = float(((x - c[assign]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = assign.copy(), inertia
    return best


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of rows to columns (Hungarian algorithm, O(n³)).

    Parameters
    ----------
    cost : np.ndarray
        Cost matrix (R, K); rectangular matrices are padded with zeros.

    Returns
    -------
    tuple of np.ndarray
        Row indices and the column assigned to each, ``min(R, K)`` pairs, sorted by row.
    """
    cost = np.asarray(cost, dtype=np.float64)
    rows, cols = cost.shape
    n = max(rows, cols)
    a = np.zeros((n + 1, n + 1))
    a[1 : rows + 1, 1 : cols + 1] = cost
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    p, way = np.zeros(n + 1, dtype=np.int64), np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used
            free[0] = False
            cur = a[i0] - u[i0] - v
            better = free & (cur < minv)
            minv[better] = cur[better]
            way[better] = j0
            cand = np.where(free, minv, np.inf)
            j1 = int(cand.argmin())
            delta = cand[j1]
            u[p[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    pairs = [(p[j] - 1, j - 1) for j in range(1, n + 1) if p[j] - 1 < rows and j - 1 < cols]
    pairs.sort()
    return np.array([r for r, _ in pairs], dtype=np.int64), np.array(
        [c for _, c in pairs], dtype=np.int64
    )


def contingency(clusters: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Counts of (cluster, label) pairs, shape (max cluster + 1, max label + 1)."""
    clusters, labels = np.asarray(clusters, np.int64), np.asarray(labels, np.int64)
    table = np.zeros((clusters.max(initial=-1) + 1, labels.max(initial=-1) + 1), np.int64)
    np.add.at(table, (clusters, labels), 1)
    return table


def best_permutation_accuracy(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of clusters read as labels under the best one-to-one cluster → label map.

    The attacker does not know that map; this is the accuracy once it is resolved (an upper
    bound for a blind attacker, exact for one that can name the clusters).
    """
    if len(labels) == 0:
        return float("nan")
    table = contingency(clusters, labels)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(labels))


def adjusted_rand_index(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Adjusted Rand index of a clustering against the true classes (1 = identical, ~0 = random)."""
    table = contingency(clusters, labels).astype(np.float64)
    n = table.sum()
    if n < 2:
        return float("nan")

    def pairs(v: np.ndarray) -> float:
        return float((v * (v - 1) / 2).sum())

    index = pairs(table)
    a, b = pairs(table.sum(1)), pairs(table.sum(0))
    expected = a * b / (n * (n - 1) / 2)
    top = (a + b) / 2
    if top == expected:
        return 1.0
    return float((index - expected) / (top - expected))


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples in their cluster's majority class."""
    if len(labels) == 0:
        return float("nan")
    return float(contingency(clusters, labels).max(1).sum() / len(labels))


def name_clusters_with_known(
    clusters: np.ndarray,
    features: np.ndarray,
    known_index: np.ndarray,
    known_labels: np.ndarray,
) -> np.ndarray:
    """Label every cluster from a few samples whose label the attacker knows.

    A cluster takes the majority label of the known samples inside it; a cluster with none
    takes the label of the known sample nearest its centroid.

    Parameters
    ----------
    clusters : np.ndarray
        Cluster of each sample, (N,).
    features : np.ndarray
        The features the clusters were computed on, (N, D).
    known_index, known_labels : np.ndarray
        Indices of the known samples and their labels.

    Returns
    -------
    np.ndarray
        Predicted label of each sample, (N,).
    """
    features = np.asarray(features, np.float64)
    names = np.zeros(clusters.max(initial=-1) + 1, dtype=np.int64)
    for c in range(len(names)):
        inside = known_labels[clusters[known_index] == c]
        if len(inside):
            names[c] = np.bincount(inside).argmax()
        else:
            centroid = features[clusters == c].mean(0)
            nearest = ((features[known_index] - centroid) ** 2).sum(1).argmin()
            names[c] = known_labels[nearest]
    return names[clusters]


def name_clusters_by_votes(clusters: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """Name clusters one-to-one by noisy per-sample guesses (e.g. zero-shot answers).

    The cluster → label map that agrees with the most votes (Hungarian algorithm); clusters
    left over when there are more clusters than labels take their majority vote.

    Returns
    -------
    np.ndarray
        Predicted label of each sample.
    """
    table = contingency(clusters, votes)
    names = table.argmax(1)
    rows, cols = linear_sum_assignment(-table)
    names[rows] = cols
    return names[clusters]


def one_known_per_class(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of one random sample of each class (the attacker's side knowledge)."""
    return np.array([rng.choice(np.flatnonzero(labels == c)) for c in np.unique(labels)])


def nearest_centroid(features: np.ndarray, known_index: np.ndarray, known_labels: np.ndarray):
    """Label each sample by the nearest known sample (one per class: nearest centroid)."""
    features = np.asarray(features, np.float64)
    d2 = ((features[:, None, :] - features[known_index][None]) ** 2).sum(-1)
    return known_labels[d2.argmin(1)]


# ---- geometry of the masked targets --------------------------------------------------------
def signal_rank(targets: np.ndarray, max_rank: int = 64) -> tuple[int, np.ndarray]:
    """How many dimensions the targets really span, from the largest gap in their spectrum.

    Clear targets of a C-class task span ``C − 1`` dimensions (``onehot − softmax`` sums to
    zero), and a rotation does not change that, so the server reads the number of classes off
    the spectrum. With noise, the largest ratio between consecutive singular values marks
    where the signal ends.

    Returns
    -------
    tuple
        The estimated rank and the singular values (descending).
    """
    x = np.asarray(targets, np.float64)
    s = np.linalg.svd(x, compute_uv=False)
    top = s[: min(len(s), max_rank + 1)]
    if len(top) < 2 or top[0] == 0:
        return int(len(top) > 0 and top[0] > 0), s
    ratios = top[:-1] / np.maximum(top[1:], top[0] * 1e-12)
    return int(ratios.argmax() + 1), s


def project(x: np.ndarray, rank: int) -> np.ndarray:
    """Coordinates of ``x`` in its top-``rank`` right singular subspace (no centring)."""
    x = np.asarray(x, np.float64)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:rank].T


def standardize_pca(x: np.ndarray, dims: int = 50) -> np.ndarray:
    """Per-feature standardisation, then the top principal components (for clustering)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    dims = min(dims, len(s))
    return u[:, :dims] * s[:dims]


# ---- label inference with the public backbone ----------------------------------------------
def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def candidate_targets(final: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The clear target a device would send for each possible label, (N, C, d).

    Everything here is public or uploaded: ``final`` is the pivot state's last (normed) layer,
    which the shortcut uploads, and ``rows`` the LM-head rows of the task's label words.
    """
    final = np.asarray(final, np.float64)
    rows = np.asarray(rows, np.float64)
    p = softmax(final @ rows.T)  # (N, C)
    c = rows.shape[0]
    residuals = np.eye(c)[None, :, :] - p[:, None, :]  # (N, C, C): e_c − p
    return residuals @ np.linalg.pinv(rows).T  # (N, C, d)


def target_subspace(rows: np.ndarray) -> np.ndarray:
    """Orthonormal basis (d, ≤ C − 1) of where a task's clear lifted targets live.

    ``pinv(W)·(e_y − p)`` with ``Σ(e_y − p) = 0``: the image of the sum-zero vectors.
    """
    rows = np.asarray(rows, np.float64)
    c = rows.shape[0]
    span = np.linalg.pinv(rows) @ (np.eye(c) - 1.0 / c)  # (d, C), rank ≤ C − 1
    u, s, _ = np.linalg.svd(span, full_matrices=False)
    return u[:, : int((s > s[0] * 1e-9).sum())]


@dataclass
class InformedAttack:
    """Result of :func:`informed_label_attack`."""

    labels: np.ndarray  # predicted label per sample
    norm_only: np.ndarray  # the first step's prediction (norm matching alone)
    rotation: np.ndarray  # the estimated rotation on the targets' subspace (d × d)
    residual: float  # relative fit error ‖M − X·Rᵀ‖ / ‖M‖ (the attacker can see it)


def procrustes(clear: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """Orthogonal ``R`` minimising ``‖masked − clear·Rᵀ‖`` (row vectors)."""
    u, _, vt = np.linalg.svd(np.asarray(masked, np.float64).T @ np.asarray(clear, np.float64))
    return u @ vt


def informed_label_attack(
    masked: np.ndarray,
    candidates: np.ndarray,
    log_prior: np.ndarray | None = None,
    iterations: int = 20,
) -> InformedAttack:
    """Recover each sample's label from its masked target, knowing the task's label words.

    1. Norm matching: a rotation keeps norms, so the label whose candidate target has the
       norm of the observed one is a first guess (noise-aware: the observed norm is taken in
       the targets' signal subspace, and the noise energy there is added to the candidates).
    2. Procrustes, as hard EM: fit the rotation ``R`` that maps the guessed clear targets
       onto the masked ones, then relabel each sample by the most likely candidate under
       isotropic Gaussian noise of the variance read off the spectrum,
       ``log p(c) − ‖m − R·t_c‖² / 2σ²``; repeat. The prior ``p`` is the backbone's own
       zero-shot distribution (what the activations alone say), so with strong noise the
       attack falls back to the zero-shot answer instead of below it. Started from norm
       matching and from the prior's argmax; the start with the better objective wins.
       This recovers ``Q`` on the task's subspace as a by-product.

    Parameters
    ----------
    masked : np.ndarray
        Masked targets the server holds, (N, d).
    candidates : np.ndarray
        :func:`candidate_targets`, (N, C, d).
    log_prior : np.ndarray, optional
        Log-probabilities of each label before seeing the targets, (N, C) (default uniform).
    iterations : int
        Procrustes rounds per start.

    Returns
    -------
    InformedAttack
    """
    m = np.asarray(masked, np.float64)
    cand = np.asarray(candidates, np.float64)
    n, c, d = cand.shape
    if n == 0:
        empty = np.zeros(0, np.int64)
        return InformedAttack(empty, empty, np.eye(d), float("nan"))
    prior = np.zeros((n, c)) if log_prior is None else np.asarray(log_prior, np.float64)
    # The attacker knows C (it knows the label words): the signal spans C − 1 dimensions.
    rank = max(1, min(c - 1, n, d))
    s = np.linalg.svd(m, compute_uv=False)
    # noise variance per sample and dimension, from the spectrum beyond the signal subspace
    per_dim = float((s[rank:] ** 2).sum() / (n * (d - rank))) if d > rank else 0.0
    per_dim = max(per_dim, 1e-12 * float((m**2).sum()) / (n * d))
    observed = (project(m, rank) ** 2).sum(1)
    expected = (cand**2).sum(-1) + rank * per_dim  # (N, C)
    first = np.abs(expected - observed[:, None]).argmin(1)
    rows = np.arange(n)

    def refine(labels: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        rot = procrustes(cand[rows, labels], m)
        for _ in range(iterations):
            fitted = cand @ rot.T  # (N, C, d)
            score = prior - ((fitted - m[:, None, :]) ** 2).sum(-1) / (2 * per_dim)
            new = score.argmax(1)
            if np.array_equal(new, labels):
                break
            labels = new
            rot = procrustes(cand[rows, labels], m)
        fitted = cand @ rot.T
        score = prior - ((fitted - m[:, None, :]) ** 2).sum(-1) / (2 * per_dim)
        return float(score.max(1).sum()), labels, rot

    starts = [first, prior.argmax(1)] if log_prior is not None else [first]
    _, labels, rot = max((refine(start.copy()) for start in starts), key=lambda r: r[0])
    err = np.linalg.norm(m - cand[rows, labels] @ rot.T) / max(np.linalg.norm(m), 1e-30)
    return InformedAttack(labels, first, rot, float(err))


@dataclass
class BestLabelAttack:
    """Result of :func:`best_label_attack`."""

    labels: np.ndarray  # the attacker's final answer per sample
    source: str  # "targets" (the informed attack) or "zero-shot" (its fallback)
    halves_cosine: float  # agreement of the rotations fitted on two halves (0 = unrelated)
    informed: InformedAttack  # the informed attack on all samples


def best_label_attack(
    masked: np.ndarray,
    candidates: np.ndarray,
    log_prior: np.ndarray,
    seed: int = 0,
    min_cosine: float = 0.2,
) -> BestLabelAttack:
    """The informed attack, checked without labels, else the backbone's zero-shot answer.

    With strong noise the informed attack fits noise (a rotation that explains a chosen
    labelling). The attacker can tell without any label: it runs the attack on two random
    halves of the samples and compares the two fitted rotations on the task's subspace. Two
    real estimates of ``Q`` agree; two fits to noise are unrelated (cosine ≈ 0, about
    ``1/sqrt((C−1)·d)`` by chance). Below ``min_cosine`` the attacker answers with the
    zero-shot prediction, which it has anyway.

    Parameters
    ----------
    masked : np.ndarray
        Masked targets, (N, d).
    candidates : np.ndarray
        :func:`candidate_targets`, (N, C, d).
    log_prior : np.ndarray
        The backbone's zero-shot log-probabilities, (N, C).
    seed : int
        Seed of the split into halves.
    min_cosine : float
        Agreement needed to trust the targets.

    Returns
    -------
    BestLabelAttack
    """
    cand = np.asarray(candidates, np.float64)
    n = len(cand)
    full = informed_label_attack(masked, cand, log_prior)
    zero_shot = np.asarray(log_prior).argmax(1)
    if n < 4:
        return BestLabelAttack(zero_shot, "zero-shot", math.nan, full)
    half = np.random.default_rng(seed).permutation(n)
    parts = [half[: n // 2], half[n // 2 :]]
    rots = [informed_label_attack(masked[p], cand[p], log_prior[p]).rotation for p in parts]
    # the subspace the candidates span (the attacker computes it from the label rows)
    basis = np.linalg.svd(cand.reshape(-1, cand.shape[-1]), full_matrices=False)[2]
    rank = max(1, cand.shape[1] - 1)
    basis = basis[:rank].T
    cosine = float(np.trace(basis.T @ rots[0].T @ rots[1] @ basis) / rank)
    if cosine >= min_cosine:
        return BestLabelAttack(full.labels, "targets", cosine, full)
    return BestLabelAttack(zero_shot, "zero-shot", cosine, full)


# ---- content: which candidate text produced an activation ----------------------------------
def match_candidates(
    observed: np.ndarray, pool: np.ndarray, true_index: np.ndarray, pool_size: int, seed: int = 0
) -> float:
    """Top-1 accuracy of picking each sample's text out of a random pool of ``pool_size``.

    Parameters
    ----------
    observed : np.ndarray
        Uploaded pivot activations of the attacked samples, (N, F).
    pool : np.ndarray
        The attacker's activations of all candidate texts, (P, F).
    true_index : np.ndarray
        For each attacked sample, the row of ``pool`` holding its true text, (N,).
    pool_size : int
        Candidates per attacked sample (its true text plus ``pool_size − 1`` distractors drawn
        from ``pool``).
    seed : int
        Seed of the distractor draws.

    Returns
    -------
    float
        Share of samples whose nearest candidate (Euclidean) is the true text.
    """
    observed = np.asarray(observed, np.float64)
    pool = np.asarray(pool, np.float64)
    if len(observed) == 0:
        return float("nan")
    if not 1 <= pool_size <= len(pool):
        raise ValueError(f"pool_size must be in 1..{len(pool)}, got {pool_size}")
    rng = np.random.default_rng(seed)
    d2 = (
        (observed**2).sum(1)[:, None] - 2.0 * observed @ pool.T + (pool**2).sum(1)[None, :]
    )  # (N, P)
    hits = 0
    for i, true in enumerate(true_index):
        others = np.delete(np.arange(len(pool)), true)
        picked = np.concatenate([[true], rng.choice(others, pool_size - 1, replace=False)])
        hits += int(picked[d2[i, picked].argmin()] == true)
    return hits / len(observed)
