"""The device as a Flower ClientApp: backbone forwards, masked differences, local evaluation.

It only routes messages to :class:`flower_pae.device.device.Device`; everything it knows comes
from its run config, its node config (partition id) and the messages it receives.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from logging import INFO

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from flower_pae.config import RunConfig
from flower_pae.device.availability import drop_out
from flower_pae.device.device import Device, peak_rss_mb
from flower_pae.side_network import LadderSideNetwork
from flower_pae.wire import (
    BASIS,
    CONFIG,
    HELD,
    METRICS,
    REFRESH,
    SIDE_META,
    UPLOAD,
    array_record,
    array_to_ids,
    record_arrays,
    side_network_digest,
    side_network_from_records,
)

_DEVICES: dict[tuple[str, int], Device] = {}
# The last side networks this process rebuilt, by digest of their download, with their meta
# JSON: the devices an actor serves in one round receive the same network, and rebuilding it
# is most of their evaluation's work with a warm store. Each download still crosses the wire
# and is counted.
_SIDE_NETWORKS: OrderedDict[str, tuple[str, LadderSideNetwork]] = OrderedDict()
_SIDE_NETWORKS_KEPT = 2


def _device(cfg: RunConfig, context: Context) -> Device:
    """One Device per (settings, partition) per process: the backbone loads once per actor."""
    pid = int(context.node_config["partition-id"])
    key = (json.dumps(cfg.to_dict(), sort_keys=True), pid)
    if key not in _DEVICES:
        _DEVICES[key] = Device(cfg, pid)
    return _DEVICES[key]


def _availability(cfg: RunConfig, context: Context, server_round: int) -> None:
    """Simulated dropout of a training round: an unavailable device raises (error reply).

    Evaluation is the experimenter's measurement, not subject to dropout, so that every
    round's accuracy is measured on the same test rows.
    """
    pid = int(context.node_config["partition-id"])
    drop_out(cfg.seed, server_round, pid, cfg.dropout, cfg.dropout_mode, cfg.timeout)


def _side_network(content: RecordDict) -> LadderSideNetwork:
    """The downloaded side network, rebuilt once per process for each distinct download.

    The network this would evict is reused when its meta is the same (same tasks, frozen
    flags and shapes: most rounds): loading the new weights into it takes a third of the
    time of building one.
    """
    digest = side_network_digest(content)
    if digest in _SIDE_NETWORKS:
        _SIDE_NETWORKS.move_to_end(digest)
        return _SIDE_NETWORKS[digest][1]
    meta_json = str(content[SIDE_META]["json"])
    meta, state = side_network_from_records(content)
    oldest = next(iter(_SIDE_NETWORKS.values()), None)
    if len(_SIDE_NETWORKS) >= _SIDE_NETWORKS_KEPT and oldest[0] == meta_json:
        net = _SIDE_NETWORKS.popitem(last=False)[1][1]
        net.load_state_dict(state)
    else:
        net = LadderSideNetwork.from_state(meta, state)
    _SIDE_NETWORKS[digest] = (meta_json, net)
    while len(_SIDE_NETWORKS) > _SIDE_NETWORKS_KEPT:
        _SIDE_NETWORKS.popitem(last=False)
    return net


class _TestFeatureStore:
    """Keeps a device's test-set backbone outputs in its Flower ``Context.state``.

    Only a cache: with overlapping rounds one device may handle its upload and its
    evaluation at once, in two actors, and Flower keeps the context of whichever ends last;
    a lost entry is computed again.
    """

    def __init__(self, state: RecordDict) -> None:
        self.state = state

    def __contains__(self, name: str) -> bool:
        return f"test:{name}" in self.state

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        arrays = record_arrays(self.state[f"test:{name}"])
        return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}

    def __setitem__(self, name: str, value: dict[str, torch.Tensor]) -> None:
        self.state[f"test:{name}"] = array_record({k: v.numpy() for k, v in value.items()})


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp with fixed settings, or (``None``) settings from Flower's run config."""
    app = ClientApp()

    def settings(context: Context) -> RunConfig:
        return cfg if cfg is not None else RunConfig.from_dict(dict(context.run_config))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        device = _device(settings(context), context)
        server_round = int(msg.content[CONFIG]["round"])
        _availability(settings(context), context, server_round)
        held = msg.content[HELD]
        held_ids = array_to_ids(held["ids"].numpy())
        held_side = None
        if "side" in held:  # refresh phase: the server's outputs for its current task's samples
            side_ids = array_to_ids(held["side_ids"].numpy())
            held_side = dict(zip(side_ids, held["side"].numpy(), strict=True))
        upload = device.upload(server_round, set(held_ids), held_side)
        log(
            INFO,
            "device %d, round %d: %d new samples of task %s forwarded in %.1fs",
            device.partition_id,
            server_round,
            upload.num_samples,
            upload.task_key,
            upload.forward_seconds,
        )
        metrics = MetricRecord(
            {
                "num-examples": upload.num_samples,
                "forward_seconds": upload.forward_seconds,
                "peak_rss_mb": peak_rss_mb(),
                "flops": upload.flops,
            }
        )
        content = RecordDict(
            {
                UPLOAD: array_record(upload.arrays),
                CONFIG: ConfigRecord({"task_key": upload.task_key}),
                METRICS: metrics,
            }
        )
        if upload.refresh is not None:
            content[REFRESH] = array_record(upload.refresh)
        if upload.basis is not None:
            content[BASIS] = array_record({"basis": upload.basis})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        device = _device(settings(context), context)
        server_round = int(msg.content[CONFIG]["round"])
        net = _side_network(msg.content)
        results = device.evaluate(server_round, net, _TestFeatureStore(context.state))
        seen = [r for r in results if not r.upcoming]
        metrics: dict[str, int | float] = {"num-examples": sum(r.total for r in seen)}
        for r in results:
            prefix = f"{r.task_key}/upcoming_" if r.upcoming else f"{r.task_key}/"
            metrics[f"{prefix}correct"] = r.correct
            metrics[f"{prefix}zero_shot_correct"] = r.zero_shot_correct
            metrics[f"{prefix}total"] = r.total
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


app = make_client_app()
