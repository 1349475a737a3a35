"""Every setting of a run, with defaults, validation and TOML / ``key=value`` loading.

Settings are flat (one namespace) so they map one-to-one onto Flower's ``run_config`` and
onto ``flower-pae run --set key=value``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from flower_pae.device.availability import DROPOUT_MODES
from flower_pae.device.shortcut import SHORTCUTS
from flower_pae.wire import DOWNLOAD_PRECISIONS, PRECISIONS

# Side-network methods: OA-Adapter, the fixed-budget orthogonal baseline (O-LoRA style), one
# shared adapter (sequential), and two upper bounds: "multitask" trains one shared adapter on
# everything cached so far (full replay), "oracle" keeps a separate side network per task and
# is told the task at inference.
METHODS = (
    "oa",
    "olora",
    "sequential",
    "multitask",
    "oracle",
    "fedavg_lora",
    "split_lora",
    "mobillm",
)
# Baselines that are not PAE (their own ClientApp and Strategy): "fedavg_lora" trains LoRA
# adapters on the devices and averages them (FedAvg, as FlowerTune does); "split_lora" is
# split learning: the devices run the first split_layer layers, the server trains the rest
# with LoRA on their states and labels; "mobillm" is MobiLLM-style side tuning: the devices
# run the frozen backbone and upload every token's states of the selected layers (and the
# labels) every round, the server trains a ladder side network on them.
BASELINES = ("fedavg_lora", "split_lora", "mobillm")


class ConfigError(ValueError):
    """A bad setting; the message names it and says what is allowed."""


@dataclass
class RunConfig:
    """All settings of a flower-pae simulation (see README, "Settings")."""

    # what to learn
    model: str = "smollm2-135m-instruct"
    stream: str = "pypi"
    data_dir: str = ""
    max_train: int = 200
    max_test: int = 100
    max_tokens: int = 128
    # devices
    num_devices: int = 8
    partition: str = "iid"
    alpha: float = 0.5
    rounds_per_task: int = 2
    stagger_rounds: int = 0
    devices_per_round: int = 0
    fraction_evaluate: float = 1.0
    evaluate_every: int = 1
    samples_per_round: int = 0
    dropout: float = 0.0
    dropout_mode: str = "error"
    layers: str = "all"
    shortcut: str = "pivot"  # per layer, the pivot token's state (the paper) or the tokens' mean
    precision: str = "fp16"
    batch_size: int = 8
    activation_store: bool = True
    store_max_gb: float = 8.0
    target_noise: float = 0.0  # Gaussian noise on the differences, relative norm
    # server: side network and its training
    method: str = "oa"
    r_max: int = 16
    out_rank: int = 16
    sparsity: float = 1e-3
    lambda_orth: float = 1.0
    server_epochs: int = 10
    server_batch_size: int = 64
    lr: float = 3e-4
    gate_lr: float = 3e-4  # Adam step of the OA gates g and thresholds τ
    out_lr: float = 0.05
    out_momentum: float = 0.9
    weight_decay: float = 0.0
    refresh_step: float = 0.0  # 0: one-shot differences; > 0: refreshed every round (CE)
    cache_memory_mb: int = 512
    server_threads: int = 1
    # server: what it accepts from devices
    clip_targets: float = 0.0  # poisoning defence: clip target norms at k × the median (0: off)
    agreement_neighbours: int = 0  # poisoning defence: drop devices that disagree with k nearest
    download_precision: str = "fp16"  # side network's weight matrices to devices: fp32/fp16/int8
    keep_activations: bool = True  # False: the "no cache" ablation (uploads every round)
    # True: the "no shortcut" ablation: devices upload every prompt token's states of the
    # selected layers, and the server keeps of them what `shortcut` keeps (bytes × tokens)
    upload_sequence: bool = False
    max_upload_mb: float = 512.0  # a larger upload (or refresh) record is rejected unread
    # baseline: FedAvg + LoRA (method = "fedavg_lora"), trained on the devices
    lora_r: int = 8  # LoRA rank on q_proj, v_proj (lora_alpha = 2·r)
    lora_lr: float = 5e-4  # AdamW step of the device's local training
    local_epochs: int = 1  # local epochs over the device's shard per round
    # baseline: split learning (method = "split_lora"); lora_r, lora_lr, local_epochs as above,
    # trained on the server
    split_layer: int = 15  # the devices run decoder layers 1..split_layer, the server the rest
    # baseline: MobiLLM-style side tuning (method = "mobillm") reads layers, precision (the
    # states' upload), batch_size (device forward and server mini-batch), lr (the side
    # network's AdamW step) and local_epochs (server epochs per round); no setting of its own
    # run
    seed: int = 0
    out_dir: str = ""
    record_wire: bool = False
    timeout: float = 900.0
    # let rounds overlap where the results cannot tell (the next round's uploads and the last
    # round's evaluation run while the server trains); false: each phase after the other
    overlap_rounds: bool = True
    client_cpus: float = 1.0
    ray_address: str = ""  # "": a private local Ray; "auto" or HOST:PORT: a `ray start` cluster
    # checkpoint and resume
    checkpoint_every: int = 1  # checkpoint the server's state every N rounds (0: never)
    stop_after: int = 0  # stop (checkpointed) after this round, as if interrupted (0: never)
    resume: bool = False  # continue the run in out_dir from its last checkpoint

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _positive(self, "max_train", "max_test", "max_tokens", "num_devices", "rounds_per_task")
        _positive(self, "r_max", "out_rank", "batch_size", "server_batch_size")
        _non_negative(self, "stagger_rounds", "devices_per_round", "samples_per_round")
        _non_negative(self, "server_threads")
        _non_negative(self, "server_epochs", "sparsity", "lambda_orth", "weight_decay")
        _non_negative(self, "target_noise", "refresh_step", "clip_targets")
        _non_negative(self, "checkpoint_every", "stop_after", "agreement_neighbours")
        _positive(self, "max_upload_mb")
        _choice(self, "partition", ("iid", "dirichlet"))
        _choice(self, "precision", PRECISIONS)
        _choice(self, "shortcut", SHORTCUTS)
        _choice(self, "download_precision", DOWNLOAD_PRECISIONS)
        if not self.keep_activations and self.refresh_step:
            raise ConfigError(
                "keep_activations=false (no cache) needs one-shot differences: set refresh_step=0"
            )
        _choice(self, "method", METHODS)
        _choice(self, "dropout_mode", DROPOUT_MODES)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        _positive(self, "evaluate_every")
        if self.evaluate_every > 1 and self.stagger_rounds:
            raise ConfigError(
                "evaluate_every > 1 needs stagger_rounds = 0: with staggered devices the server "
                "cannot know when each task ends, and the accuracy matrix is read there"
            )
        if not 0.0 < self.fraction_evaluate <= 1.0:
            raise ConfigError(f"fraction_evaluate must be in (0, 1], got {self.fraction_evaluate}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha (Dirichlet concentration) must be > 0, got {self.alpha}")
        if self.lr <= 0 or self.out_lr <= 0 or not 0 <= self.out_momentum < 1:
            raise ConfigError("lr and out_lr must be > 0 and out_momentum in [0, 1)")
        _positive(self, "gate_lr")
        _positive(self, "lora_r", "lora_lr", "local_epochs", "split_layer")
        if self.method in BASELINES:
            from flower_pae.data import resolve_stream

            tasks = resolve_stream(self.stream)
            if len(tasks) != 1:
                raise ConfigError(
                    f"method {self.method!r} trains a single task; stream {self.stream!r} has "
                    f"{len(tasks)} ({', '.join(tasks)}): give one task spec, e.g. cl:agnews"
                )
        if self.method == "split_lora":
            layers = model_layers(self.model)
            if layers is not None and not self.split_layer < layers:
                raise ConfigError(
                    f"split_layer={self.split_layer}: model {self.model!r} has {layers} decoder "
                    f"layers and each side of the split needs one (1 <= split_layer <= "
                    f"{layers - 1})"
                )
        if self.method == "mobillm":
            self._check_mobillm_layers()
        if self.devices_per_round > self.num_devices:
            raise ConfigError(
                f"devices_per_round={self.devices_per_round} exceeds num_devices={self.num_devices}"
            )

    def _check_mobillm_layers(self) -> None:
        """``layers`` against the model's decoder layers, where its config is on this machine
        (the devices and the server parse it again on load)."""
        from flower_pae.backbone import select_layers

        layers = model_layers(self.model)
        try:
            select_layers(self.layers, layers if layers is not None else 10**6)
        except ValueError as err:
            model = f"model {self.model!r} ({layers} decoder layers)" if layers else "the model"
            raise ConfigError(
                f"method 'mobillm' uploads the states of the backbone layers in `layers`; "
                f"{err} for {model}, got layers={self.layers!r}"
            ) from err

    # ---- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a flat mapping; unknown keys and wrong types are errors, not ignored."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {unknown}; known settings: {', '.join(sorted(known))}"
            )
        typed = {k: _coerce(k, v, type(getattr(cls(), k))) for k, v in values.items()}
        return cls(**typed)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        overrides: list[str] | None = None,
        base: dict[str, Any] | None = None,
    ) -> RunConfig:
        """Defaults, then ``base`` (for example a run's recorded settings), then a TOML file,
        then ``key=value`` overrides (later wins)."""
        values: dict[str, Any] = dict(base or {})
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            try:
                values.update(tomllib.loads(path.read_text()))
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
            nested = [k for k, v in values.items() if isinstance(v, dict)]
            if nested:
                raise ConfigError(f"{path}: settings are flat; remove the table(s) {nested}")
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {item!r} must look like key=value")
            values[key.strip()] = _parse_value(raw.strip())
        return cls.from_dict(values)


def model_layers(model: str) -> int | None:
    """Decoder layers of ``model`` where its ``config.json`` is on this machine (the default
    model once converted, or a local directory); None where it is not (checked on load)."""
    import json

    from flower_pae.backbone import DEFAULT_MODEL, cache_dir

    path = cache_dir() / "models" / DEFAULT_MODEL if model == DEFAULT_MODEL else Path(model)
    try:
        return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif kind is str and isinstance(value, str | int | float):
        return str(value)
    elif kind is str and isinstance(value, list):
        return ",".join(str(v) for v in value)
    raise ConfigError(f"setting {key!r} must be {kind.__name__}, got {value!r}")


def _positive(cfg: RunConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")


def _non_negative(cfg: RunConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")


def _choice(cfg: RunConfig, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
