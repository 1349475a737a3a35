"""The scalability study command (``flower-pae scale``) on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from simulations.cli import main
from simulations.scale import COLUMNS, cold_ratios, floor_ratios, parse_devices

# One Ray actor (client_cpus=2 on this 2-core machine): half the start-up imports.
TINY = ["--set", "stream=pypi:bbc", "--set", "server_epochs=1", "--set", "client_cpus=2"]


def _tiny(model: Path) -> list[str]:
    return [*TINY, "--set", f"model={model}"]


def test_scale_command_records_each_population(tmp_path, tiny_model_dir):
    out = tmp_path / "study"
    argv = ["scale", "--devices", "3,6", "--rounds", "2", "--per-round", "2"]
    assert main([*argv, *_tiny(tiny_model_dir), "--out", str(out)]) == 0
    frame = pd.read_parquet(out / "scale.parquet")
    assert list(frame.columns) == COLUMNS
    assert list(frame["mode"]) == ["pae", "pae"] and list(frame["num_devices"]) == [3, 6]
    assert (frame["rounds"] == 2).all() and (frame["per_round"] == 2).all()
    # 2 rounds × (2 training + 2 evaluation requests): per_round devices in each phase
    assert (frame["device_calls"] == 8).all() and (frame["messages"] == 16).all()
    assert (frame[["wall_seconds", "seconds_per_round", "seconds_per_call"]] > 0).all().all()
    assert (frame["server_peak_rss_mb"] > 0).all() and (frame["actors"] >= 1).all()
    assert (frame["device_forward_seconds"] > 0).all()
    for _, row in frame.iterrows():
        messages = pd.read_parquet(Path(row["run_dir"]) / "messages.parquet")
        assert row["bytes"] == messages["payload_bytes"].sum()
        assert row["bytes"] == row["bytes_up"] + row["bytes_down"]
    # max_train = 2 rows per device × N: the sampled devices' rows, each cached once
    assert (frame["cache_samples"] > 0).all()
    assert (frame["cache_samples"] <= 2 * frame["num_devices"]).all()
    assert len(pd.read_csv(out / "scale.csv")) == 2
    assert (out / "scale.png").stat().st_size > 0


def test_scale_command_measures_the_empty_floor(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "study"
    argv = ["scale", "--devices", "4", "--rounds", "1", "--per-round", "2", "--empty"]
    assert main([*argv, *_tiny(tiny_model_dir), "--out", str(out)]) == 0
    frame = pd.read_parquet(out / "scale.parquet")
    assert list(frame["mode"]) == ["pae", "empty"]
    empty = frame[frame["mode"] == "empty"].iloc[0]
    assert empty["device_calls"] == 4 and empty["messages"] == 8
    assert empty["cache_samples"] == 0 and empty["device_forward_seconds"] == 0
    # the floor's messages are trivial: far smaller than PAE's uploads
    assert empty["bytes"] < frame[frame["mode"] == "pae"].iloc[0]["bytes"]
    ratios = floor_ratios(frame)
    assert list(ratios.index) == [4] and ratios["ratio"].iloc[0] > 0
    assert "empty ClientApp" in capsys.readouterr().out


def test_cold_ratio_is_wall_time_over_forwards_and_training() -> None:
    frame = pd.DataFrame(
        {
            "mode": ["pae-warmup", "pae", "pae-warmup"],
            "num_devices": [10, 10, 100],
            "wall_seconds": [30.0, 15.0, 90.0],
            "store_new_entries": [60, 0, 300],
            "store_forward_seconds": [20.0, 0.0, 100.0],
            "server_train_seconds": [4.0, 3.0, 20.0],
        }
    )
    ratios = cold_ratios(frame)
    assert list(ratios.index) == [10, 100]  # warm runs have no cold ratio
    assert ratios["ratio"].tolist() == pytest.approx([30 / 24, 90 / 120])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--devices", "0"], "--devices"),
        (["--devices", "10,x"], "--devices"),
        (["--devices", ","], "--devices"),
        (["--devices", "2", "--per-round", "3"], "--per-round"),
        (["--devices", "4", "--rounds", "3", "--set", "stream=pypi:bbc,pypi:r8"], "--rounds"),
        (["--devices", "4", "--set", "dropout=2"], "dropout"),
    ],
)
def test_bad_scale_arguments_are_named(args, needle, capsys, tmp_path):
    argv = ["scale", "--rounds", "2", "--per-round", "1", *args, "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # nothing ran


@pytest.mark.parametrize("flag", ["--rounds", "--per-round", "--train-per-device"])
def test_non_positive_counts_are_refused_by_the_parser(flag, capsys):
    argv = ["scale", "--devices", "3", "--rounds", "2", "--per-round", "1", flag, "0"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_parse_devices():
    assert parse_devices("10, 100,1000") == [10, 100, 1000]
