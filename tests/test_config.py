"""Settings: defaults, TOML and overrides, and errors that name the bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from flower_pae.config import ConfigError, RunConfig
from simulations.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('stream = "cl:agnews"\nnum_devices = 3\nlr = 0.01\n')
    cfg = RunConfig.load(path, ["num_devices=5", "record_wire=true", "layers=last:4"])
    assert (cfg.stream, cfg.num_devices, cfg.lr) == ("cl:agnews", 5, 0.01)
    assert cfg.record_wire is True and cfg.layers == "last:4"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["num_devcies=3"], "num_devcies"),
        (["num_devices=0"], "num_devices"),
        (["num_devices=many"], "num_devices"),
        (["precision=fp8"], "precision"),
        (["shortcut=max"], "shortcut"),
        (["download_precision=int4"], "download_precision"),
        (["method=magic"], "method"),
        (["fraction_evaluate=1.5"], "fraction_evaluate"),
        (["devices_per_round=20"], "devices_per_round"),
        (["noequals"], "key=value"),
    ],
)
def test_bad_settings_are_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.load(None, overrides)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("stream = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.load(bad)


def test_cli_reports_bad_settings_without_a_traceback(capsys):
    assert main(["run", "--set", "num_devices=-1"]) == 2
    err = capsys.readouterr().err
    assert "num_devices" in err and "Traceback" not in err


def test_cli_reports_data_errors(capsys, tmp_path):
    code = main(
        [
            "run",
            "--set",
            "stream=cl:agnews",
            "--set",
            f"data_dir={tmp_path}",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 1
    assert "agnews" in capsys.readouterr().err


def test_shipped_configs_load():
    for path in (ROOT / "simulations" / "configs").glob("*.toml"):
        RunConfig.load(path)


def test_flwr_app_defaults_match_the_settings():
    """`flwr run .` reads [tool.flwr.app.config]: it must list every setting, same defaults."""
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert RunConfig.from_dict(app_config["config"]).to_dict() == RunConfig().to_dict()
    assert set(app_config["config"]) == set(RunConfig().to_dict())
