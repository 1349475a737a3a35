"""Shared fixtures: a tiny random model of the SmolLM2 family, small runs of it (PAE's and the
baselines'), the shared benchmark data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from flower_pae.config import RunConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the cache (skips without it)."""
    from flower_pae.backbone import BackboneError, converted_default_model

    try:
        return converted_default_model()
    except BackboneError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer (fast, same family)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-smollm2")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, tiny_model_dir):
    """Run a small simulation of the tiny model: ``small_run(name, **settings)`` -> run dir."""
    from flower_pae.config import RunConfig
    from simulations.cli import simulate

    def run(name: str, **settings) -> Path:
        out = tmp_path_factory.mktemp(name)
        simulate(RunConfig(model=str(tiny_model_dir), **settings), out)
        return out

    return run


def _baseline_settings(request: pytest.FixtureRequest) -> dict:
    from tests.run_contract import BASELINE_SETTINGS, SMALL_RUN

    method = request.module.METHOD
    return {"method": method, **SMALL_RUN, **BASELINE_SETTINGS[method]}


@pytest.fixture(scope="module")
def baseline_cfg(request, tiny_model_dir) -> RunConfig:
    """The settings of the baselines' small run (``tests.run_contract.SMALL_RUN``) for the
    method the requesting module names in ``METHOD``."""
    from flower_pae.config import RunConfig

    return RunConfig(model=str(tiny_model_dir), **_baseline_settings(request))


@pytest.fixture(scope="module")
def baseline_run(request, small_run) -> Path:
    """The run directory of :func:`baseline_cfg`'s settings, simulated once per module."""
    settings = _baseline_settings(request)
    return small_run(settings["method"].replace("_", "-"), **settings)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/cl_benchmark not present (it is on CI and dev machines)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _cache_env(tmp_path_factory):
    """Keep the converted model in the user's cache, but secrets in a throwaway dir."""
    os.environ.setdefault("FLOWER_PAE_COHORT_SECRET", "ab" * 32)
    yield
