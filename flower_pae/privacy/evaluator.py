"""The evaluator's side of the audit: ground truth that the attacker never has.

To *score* the attacks, the experimenter who ran the federation maps each opaque sample id
back to its text and label. That needs the cohort secret (ids are keyed hashes) and the task
data, reloaded from the data source with the run's settings. This module is the only part of
the audit that imports the devices' secret; the attacks never see what it returns except
through the scores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from flower_pae.backbone import cache_dir
from flower_pae.data import Task, load_task, resolve_stream
from flower_pae.device.secret import SECRET_ENV, CohortSecret
from flower_pae.privacy.server_view import AuditError, ServerView


@dataclass
class TaskTruth:
    """The truth about one task key, aligned with the server's rows."""

    key: str
    task: Task
    labels: np.ndarray  # (N,) label index of each cached sample
    texts: list[str]  # text of each cached sample
    others: list[str]  # the task's other texts (not cached): distractors for content attacks


def load_secret() -> CohortSecret:
    """The cohort secret of the run: ``$FLOWER_PAE_COHORT_SECRET``, else the cache's file.

    Raises
    ------
    AuditError
        When neither exists (the secret of a run without either is lost).
    """
    if os.environ.get(SECRET_ENV):
        return CohortSecret.from_hex(os.environ[SECRET_ENV])
    path = cache_dir() / "cohort_secret"
    if path.is_file():
        return CohortSecret.from_hex(path.read_text())
    raise AuditError(
        f"scoring the attacks needs the run's cohort secret: export {SECRET_ENV} with the "
        "value the run used (set it before `flower-pae run`, which otherwise draws a "
        "throwaway one)"
    )


def ground_truth(
    view: ServerView, secret: CohortSecret | None = None
) -> tuple[dict[str, TaskTruth], CohortSecret]:
    """Map every cached id of every task key back to its label and text.

    Parameters
    ----------
    view : ServerView
        The server's view of the run.
    secret : CohortSecret, optional
        The run's cohort secret (default: :func:`load_secret`).

    Returns
    -------
    tuple
        The truth per task key, and the secret (the evaluator also uses its rotation to say
        how much of it an attack recovered).
    """
    secret = secret or load_secret()
    s = view.settings
    data_dir = str(s.get("data_dir", "")) or None
    kwargs: dict[str, Any] = dict(
        data_dir=data_dir,
        seed=int(s.get("seed", 0)),
        max_train=int(s.get("max_train", 200)),
        max_test=int(s.get("max_test", 100)),
    )
    by_key: dict[str, Task] = {}
    for spec in resolve_stream(str(s.get("stream", "pypi"))):
        task = load_task(spec, **kwargs)
        by_key[secret.task_key(task.name)] = task
    out = {}
    for key, tv in view.tasks.items():
        task = by_key.get(key)
        if task is None:
            raise AuditError(
                f"task key {key} is none of the stream's tasks under this secret: export the "
                f"{SECRET_ENV} that the run used"
            )
        index = {secret.sample_id(task.name, ex.text): ex for ex in task.train}
        rows = [index.get(i) for i in tv.id_bytes()]
        missing = sum(r is None for r in rows)
        if missing:
            raise AuditError(
                f"{missing} of {len(rows)} cached ids of task {task.name} match no training "
                f"row: wrong secret ({SECRET_ENV}) or different data settings"
            )
        cached = {r.text for r in rows}
        others = [ex.text for ex in task.train + task.test if ex.text not in cached]
        out[key] = TaskTruth(
            key,
            task,
            np.array([r.label for r in rows], dtype=np.int64),
            [r.text for r in rows],
            list(dict.fromkeys(others)),
        )
    return out, secret
