"""Task and example containers shared by every data source.

A :class:`Task` is a text-classification problem phrased as a prompt: the model reads
``Task.prompt(text)`` and the label word (``Task.labels[example.label]``, tokenized with a
leading space) is predicted right after ``"Answer:"``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataError", "Example", "Task"]


class DataError(ValueError):
    """Bad data, path or data setting; the message names the offending thing and says what to do."""


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` indexes :attr:`Task.labels`."""

    text: str
    label: int


@dataclass
class Task:
    """A named classification task with natural-language label words."""

    name: str
    labels: list[str]
    train: list[Example]
    test: list[Example]
    instruction: str

    def __post_init__(self) -> None:
        name = self.name
        labels = list(self.labels)
        if len(labels) < 2:
            raise DataError(
                f"task {name!r}: needs at least 2 labels, got {len(labels)} ({labels!r}); "
                "give every class a label word"
            )
        for i, lab in enumerate(labels):
            if not isinstance(lab, str) or not lab.strip():
                raise DataError(
                    f"task {name!r}: label {i} is empty ({lab!r}); every label needs a "
                    "non-empty label word"
                )
        seen: set[str] = set()
        for lab in labels:
            if lab in seen:
                raise DataError(
                    f"task {name!r}: duplicate label {lab!r} in {labels!r}; label words must "
                    "be unique"
                )
            seen.add(lab)
        if not self.train and not self.test:
            raise DataError(
                f"task {name!r}: train and test are both empty; give it at least one example"
            )
        n = len(labels)
        for split, examples in (("train", self.train), ("test", self.test)):
            for i, ex in enumerate(examples):
                lab = ex.label
                if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < n:
                    raise DataError(
                        f"task {name!r}: {split} example {i} has label {lab!r}, outside "
                        f"0..{n - 1} (labels {labels!r})"
                    )

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def question(self, text: str) -> str:
        """The instruction, the options and the text: what a user would ask about ``text``."""
        return f"{self.instruction}\nOptions: {', '.join(self.labels)}.\nText: {text}"

    def prompt(self, text: str) -> str:
        """A plain-text model input for ``text``; the label word follows ``"Answer:"``."""
        return f"{self.question(text)}\nAnswer:"
