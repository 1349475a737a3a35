"""What the baselines' devices share: PAE's shards and schedule, and the forward-only flow.

Every baseline device sits on the PAE device's shards and task schedule
(:class:`flower_pae.device.device.Device`, never its forward), so that all methods see the
same rows: :class:`BaselineDevice`. The devices that only forward (split learning, MobiLLM)
also share their flow, :class:`StatesDevice`: a frozen forward of a shard into a
:class:`StatesUpload`, the training labels in clear, and the counts of the label logits the
server sends back. Subclasses give the forward (:meth:`StatesDevice._prompts`,
:meth:`StatesDevice._states`, :attr:`StatesDevice.params`).
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np

from flower_pae.config import RunConfig
from flower_pae.data import Example, Task
from flower_pae.device.cost import PeakMemory, forward_flops
from flower_pae.device.device import Device, TaskEval
from flower_pae.device.secret import CohortSecret

__all__ = ["BaselineDevice", "StatesDevice", "StatesUpload"]


class BaselineDevice:
    """One device of a baseline, on PAE's shards and task schedule.

    Parameters
    ----------
    cfg : RunConfig
        The run's settings.
    partition_id : int
        The device's partition (Flower's ``partition-id``).
    secret : CohortSecret, optional
        Only for the opaque task keys, as PAE's devices report them.
    """

    def __init__(
        self, cfg: RunConfig, partition_id: int, secret: CohortSecret | None = None
    ) -> None:
        self.cfg = cfg
        self.data = Device(cfg, partition_id, secret)  # shards and schedule; never its forward
        self.partition_id = partition_id

    def _rows(self, index: int, split: str) -> tuple[Task, list[Example]]:
        return self.data.task(index), self.data._shard(index, split)

    def _labels(self, index: int, split: str) -> np.ndarray:
        return np.asarray([ex.label for ex in self.data._shard(index, split)], dtype=np.int64)


@dataclass
class StatesUpload:
    """What a forward-only device sends: its shard's states (and its labels, to train).

    ``arrays``: ``states`` ``(Σ T, ...)`` (every real token), ``lengths`` ``(N,)``, what the
    baseline adds (MobiLLM: ``final`` ``(N, d)``, ``scales``), ``labels`` ``(N,)`` to train.
    """

    task_key: str
    label_words: list[str]
    arrays: dict[str, np.ndarray]
    seconds: float = 0.0  # the device's forward
    peak_rss_mb: float = float("nan")
    tokens: int = 0
    flops: float = 0.0

    @property
    def num_samples(self) -> int:
        return int(len(self.arrays["lengths"]))


class StatesDevice(BaselineDevice):
    """A device that only forwards: the server trains, on the states and labels it uploads.

    Every round it forwards its whole shard again (no cache). Subclasses give the prompts
    (:meth:`_prompts`), the forward (:meth:`_states`), its matmul weights (:attr:`params`)
    and its log line (:meth:`describe`).
    """

    @property
    def params(self) -> int:
        """``P`` of the device's forward (its matmul weights), for its FLOPs."""
        raise NotImplementedError

    def _prompts(self, task: Task, examples: Sequence[Example]) -> list[str]:
        """The PAE device's prompts for ``examples``."""
        raise NotImplementedError

    def _states(self, prompts: Sequence[str]) -> tuple[dict[str, np.ndarray], int]:
        """The forward of ``prompts``: the arrays to upload and the prompt tokens processed."""
        raise NotImplementedError

    def describe(self, upload: StatesUpload) -> str:
        """What a training forward did, for the ClientApp's log line."""
        raise NotImplementedError

    def _forward(self, index: int, split: str) -> StatesUpload:
        task, examples = self._rows(index, split)
        prompts = self._prompts(task, examples)
        with PeakMemory() as memory:
            start = time.perf_counter()
            arrays, tokens = self._states(prompts)
            seconds = time.perf_counter() - start
        return StatesUpload(
            task_key=self.data.task_key(index),
            label_words=list(task.labels),
            arrays=arrays,
            seconds=seconds,
            peak_rss_mb=memory.peak_mb,
            tokens=tokens,
            flops=forward_flops(self.params, tokens),
        )

    def train_upload(self, server_round: int) -> StatesUpload:
        """The current task's training shard, forwarded, with its labels in clear (these
        baselines' servers train on them)."""
        index = self.data.task_index(server_round)
        upload = self._forward(index, "train")
        upload.arrays["labels"] = self._labels(index, "train")
        return upload

    def eval_upload(
        self, server_round: int, zero_shot: MutableMapping[str, int] | None = None
    ) -> StatesUpload:
        """The current task's test shard, forwarded (no labels).

        ``zero_shot`` (the device's persistent state) is for a device that counts the frozen
        backbone's correct answers itself (MobiLLM); here the server sends them (split).
        """
        return self._forward(self.data.task_index(server_round), "test")

    def evaluate(
        self,
        server_round: int,
        logits: np.ndarray,
        zero_shot_logits: np.ndarray | None = None,
        zero_shot: MutableMapping[str, int] | None = None,
    ) -> list[TaskEval]:
        """Accuracy counts of the server's ``logits`` for this device's test shard.

        ``zero_shot`` (the device's persistent state) keeps the frozen backbone's correct
        count per task: from the first ``zero_shot_logits`` the server sends for it, or from
        :meth:`eval_upload`.
        """
        index = self.data.task_index(server_round)
        task, labels = self.data.task(index), self._labels(index, "test")
        if logits.shape != (len(labels), len(task.labels)):
            raise ValueError(
                f"the server's logits have shape {logits.shape}, expected "
                f"{(len(labels), len(task.labels))}"
            )
        zero_shot = {} if zero_shot is None else zero_shot
        if zero_shot_logits is not None:
            zero_shot[task.name] = int((zero_shot_logits.argmax(-1) == labels).sum())
        if task.name not in zero_shot:
            raise ValueError(f"no zero-shot count for task {task.name!r} yet")
        return [
            TaskEval(
                task_key=self.data.task_key(index),
                correct=int((logits.argmax(-1) == labels).sum()),
                zero_shot_correct=int(zero_shot[task.name]),
                total=len(labels),
            )
        ]
