"""Server-side additive ladder side network (PAE MobiLLM) and its trainer.

Server-only: nothing here imports the device side (secret, masking), the privacy boundary.
"""

from .ladder import OUT_SLOT, SIDE_METHODS, LadderSideNetwork, SideMethod, TaskAdapters
from .trainer import SideNetworkTrainer, TrainerConfig

__all__ = [
    "OUT_SLOT",
    "SIDE_METHODS",
    "LadderSideNetwork",
    "SideMethod",
    "SideNetworkTrainer",
    "TaskAdapters",
    "TrainerConfig",
]
