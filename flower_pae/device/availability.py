"""Device availability: which sampled devices drop out of a round.

A simulated device is unavailable in a round with probability ``dropout``. The draw depends
only on (seed, round, partition id), so every process (each Ray actor, the test that checks
a run) reaches the same decision and a run can be repeated exactly. An unavailable device
either fails at once (``"error"``: Flower sends the server an error reply) or stays silent
past the server's timeout (``"silent"``); either way it does no work in that round, and the
server, which lists the ids it holds in every training request, gets its samples the next
time the device is sampled and available.
"""

from __future__ import annotations

import random
import time

DROPOUT_MODES = ("error", "silent")


class DeviceUnavailable(RuntimeError):
    """Raised by a device that drops out of a round (the simulated failure)."""


def is_available(seed: int, server_round: int, partition_id: int, dropout: float) -> bool:
    """Whether device ``partition_id`` takes part in ``server_round``.

    Parameters
    ----------
    seed : int
        The run's seed.
    server_round : int
        The round (1-based).
    partition_id : int
        The device's partition id (0-based).
    dropout : float
        Probability in [0, 1) that a device is unavailable in a round.

    Returns
    -------
    bool
        ``False`` when the device drops out of this round.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout == 0.0:
        return True
    # A str seed is hashed with SHA-512 by random.Random: stable across processes and runs.
    draw = random.Random(f"{seed}:availability:{server_round}:{partition_id}").random()
    return draw >= dropout


def drop_out(
    seed: int,
    server_round: int,
    partition_id: int,
    dropout: float,
    mode: str = "error",
    timeout: float = 0.0,
) -> None:
    """Simulate the device's failure if it is unavailable in this round; else return.

    Parameters
    ----------
    seed, server_round, partition_id, dropout
        As in :func:`is_available`.
    mode : str
        ``"error"``: raise at once. ``"silent"``: first sleep past ``timeout`` (the server
        gives up waiting and the round goes on), then raise, so that the late reply carries
        nothing.
    timeout : float
        The server's reply timeout in seconds (used by ``"silent"``).

    Raises
    ------
    DeviceUnavailable
        When the device drops out of this round.
    """
    if mode not in DROPOUT_MODES:
        raise ValueError(f"dropout mode must be one of {DROPOUT_MODES}, got {mode!r}")
    if is_available(seed, server_round, partition_id, dropout):
        return
    if mode == "silent":
        time.sleep(timeout + 1.0)
    raise DeviceUnavailable(
        f"device {partition_id} unavailable in round {server_round} (simulated dropout {dropout})"
    )
