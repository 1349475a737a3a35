"""Text-classification tasks, data sources, device partitions and task streams."""

from .partition import SCHEMES, partition
from .sources import PYPI_CORPORA, load_task
from .streams import STREAMS, resolve_stream
from .task import DataError, Example, Task

__all__ = [
    "PYPI_CORPORA",
    "SCHEMES",
    "STREAMS",
    "DataError",
    "Example",
    "Task",
    "load_task",
    "partition",
    "resolve_stream",
]
