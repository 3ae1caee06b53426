"""Tests for rayfed.data: sources, partitioners, per-client splits, FederatedDataset, plot."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayfed.config import DataConfig, PartitionConfig, SyntheticConfig
from rayfed.data import FederatedDataset, load_source, partition_indices, plot_label_distribution
from rayfed.data.partition import assign_test_rows, split_train_test
from rayfed.errors import ConfigError

LABELS = np.random.default_rng(0).integers(0, 10, size=3000)


def _check_partition(parts: list[np.ndarray], n: int, num_clients: int, min_samples: int) -> None:
    assert len(parts) == num_clients
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))  # disjoint + complete
    assert min(len(p) for p in parts) >= min_samples


@pytest.mark.parametrize("name", ["iid", "dirichlet", "pathological", "quantity_skew"])
def test_partitioners_complete_disjoint_deterministic(name: str) -> None:
    cfg = PartitionConfig(name=name, alpha=0.3, classes_per_client=2, min_samples=12)
    parts = partition_indices(LABELS, 50, cfg, seed=1)
    _check_partition(parts, len(LABELS), 50, 12)
    again = partition_indices(LABELS, 50, cfg, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(LABELS, 50, cfg, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_by_column_partition() -> None:
    groups = np.array(["b", "a", "c", "a", "b", "c", "c", "a", "b"])
    parts = partition_indices(np.zeros(9), 3, PartitionConfig(name="by_column", min_samples=2), 0, groups)
    _check_partition(parts, 9, 3, 2)
    assert [sorted(set(groups[p])) for p in parts] == [["a"], ["b"], ["c"]]  # sorted group values
    with pytest.raises(ConfigError, match="found 3 distinct groups but data.num_clients=5; set data.num_clients to 3"):
        partition_indices(np.zeros(9), 5, PartitionConfig(name="by_column", min_samples=2), 0, groups)
    with pytest.raises(ConfigError, match="group 'a' has only 3 samples"):
        partition_indices(np.zeros(9), 3, PartitionConfig(name="by_column", min_samples=4), 0, groups)


def _max_class_fraction(parts: list[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skew = [_max_class_fraction(partition_indices(LABELS, 20, PartitionConfig(alpha=a, min_samples=2), 0), LABELS)
            for a in (0.05, 1.0, 100.0)]
    assert skew[0] > skew[1] > skew[2]
    assert skew[0] > 0.7 and skew[2] < 0.25


def test_pathological_classes_per_client() -> None:
    for k in (1, 2, 3):
        parts = partition_indices(LABELS, 30, PartitionConfig(name="pathological", classes_per_client=k,
                                                              min_samples=10), seed=0)
        _check_partition(parts, len(LABELS), 30, 10)
        assert all(len(np.unique(LABELS[p])) == k for p in parts)
    # many clients, tiny classes: still at most k classes each
    parts = partition_indices(LABELS[:300], 140, PartitionConfig(name="pathological", classes_per_client=2,
                                                                 min_samples=2), seed=0)
    _check_partition(parts, 300, 140, 2)
    assert all(len(np.unique(LABELS[:300][p])) <= 2 for p in parts)


def test_infeasible_partitions_raise_clear_errors() -> None:
    with pytest.raises(ConfigError, match=r"500 clients x data.partition.min_samples=10 needs 5000 samples "
                                          r"but the dataset has 3000"):
        partition_indices(LABELS, 500, PartitionConfig(min_samples=10), 0)
    with pytest.raises(ConfigError, match="classes_per_client': 11 but the data has only 10 classes"):
        partition_indices(LABELS, 10, PartitionConfig(name="pathological", classes_per_client=11), 0)
    with pytest.raises(ConfigError, match="needs 40 class shards but there are only 30 samples"):
        partition_indices(LABELS[:30], 10, PartitionConfig(name="pathological", classes_per_client=4,
                                                           min_samples=2), 0)
    with pytest.raises(ConfigError, match="cover only 6 of the 10 classes"):
        partition_indices(LABELS, 3, PartitionConfig(name="pathological", classes_per_client=2), 0)
    with pytest.raises(ConfigError, match="needs group values"):
        partition_indices(LABELS, 10, PartitionConfig(name="by_column"), 0)


def test_many_clients_is_fast() -> None:
    cfg = DataConfig(source="digits", num_clients=500, partition=PartitionConfig(alpha=0.3, min_samples=2))
    start = time.perf_counter()
    ds = FederatedDataset.from_config(cfg, seed=0)
    assert time.perf_counter() - start < 5
    assert min(ds.num_train(c) + ds.num_test(c) for c in ds.client_ids) >= 2
    big = np.arange(60_000) % 10
    for name in ("dirichlet", "pathological", "quantity_skew"):
        start = time.perf_counter()
        parts = partition_indices(big, 1000, PartitionConfig(name=name, alpha=0.3, min_samples=10), seed=0)
        assert time.perf_counter() - start < 1
        _check_partition(parts, 60_000, 1000, 10)


def test_client_split_follows_own_labels() -> None:
    labels = np.repeat(np.arange(4), [40, 20, 8, 1])
    idx = np.random.default_rng(0).permutation(len(labels))[:60]
    train, test = split_train_test(idx, labels, 0.25, seed=0, client_id=3)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.sort(idx)) and not set(train) & set(test)
    tr, te = np.bincount(labels[train], minlength=4), np.bincount(labels[test], minlength=4)
    for c, total in enumerate(tr + te):
        if total >= 2:
            assert tr[c] >= 1 and abs(te[c] - 0.25 * total) <= 0.5
    # tiny clients still get one train and one test sample
    for sample in ([0, 1], [0, 40], [0, 40, 60, 68]):
        tr_i, te_i = split_train_test(np.array(sample), labels, 0.9, seed=0, client_id=0)
        assert len(tr_i) >= 1 and len(te_i) >= 1
    ds = FederatedDataset.from_config(DataConfig(source="digits", num_clients=10), seed=0)
    for cid in ds.client_ids:
        cd = ds.client_data(cid)
        tr, te = np.bincount(cd.y_train, minlength=10), np.bincount(cd.y_test, minlength=10)
        assert np.all(te[tr + te >= 2] <= tr[tr + te >= 2])  # test classes come with train samples
        assert abs(cd.num_test / (cd.num_train + cd.num_test) - 0.25) < 0.1


def test_digits_and_synthetic_sources() -> None:
    table, info = load_source(DataConfig(source="digits"), 0)
    assert table.num_rows == 1797 and info.feature_shape == (1, 8, 8) and info.modality == "image"
    assert table.column("label").type == pa.int64()
    for modality, shape in (("vector", [16]), ("image", [1, 4, 4]), ("text", [12])):
        syn = SyntheticConfig(num_samples=300, num_classes=3, feature_shape=shape, modality=modality, vocab_size=50)
        ds = FederatedDataset.from_config(DataConfig(source="synthetic", synthetic=syn, num_clients=3), seed=0)
        cd = ds.client_data(0)
        assert cd.x_train.shape[1:] == tuple(shape) and ds.info.modality == modality
        assert cd.x_train.dtype == (np.int64 if modality == "text" else np.float32)
        assert cd.y_train.dtype == np.int64
        if modality == "text":
            assert cd.x_train.min() >= 0 and cd.x_train.max() < 50 and ds.info.vocab_size == 50
        else:  # learnable: nearest class mean classifies well
            means = np.stack([cd.x_train[cd.y_train == c].mean(0) for c in range(3)])
            pred = np.argmin(((cd.x_test[:, None] - means[None]) ** 2).reshape(len(cd.x_test), 3, -1).sum(-1), 1)
            assert (pred == cd.y_test).mean() > 0.8


def _png(value: int, size: int = 6, mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_list_features(tmp_path) -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(120, 16)).astype(np.float32)
    pq.write_table(pa.table({"x": feats.tolist(), "y": ["cat", "dog", "eel"] * 40, "site": np.arange(120) % 4}),
                   tmp_path / "a.parquet")
    cfg = DataConfig(source="parquet", path=str(tmp_path / "a.parquet"), feature_column="x", label_column="y",
                     num_clients=4, group_column="site", partition=PartitionConfig(name="by_column"))
    ds = FederatedDataset.from_config(cfg, seed=0)
    assert ds.info.feature_shape == (1, 4, 4) and ds.info.num_classes == 3  # 16 is a perfect square
    assert ds.label_names == ["cat", "dog", "eel"]
    cd = ds.client_data(1)
    rows = np.flatnonzero(np.arange(120) % 4 == 1)
    assert np.allclose(np.sort(np.concatenate([cd.x_train, cd.x_test]).reshape(-1, 16), 0), np.sort(feats[rows], 0))
    # a directory of files, nested lists, explicit vector via non-square length
    (tmp_path / "dir").mkdir()
    for part in ("p0", "p1"):
        pq.write_table(pa.table({"features": rng.normal(size=(30, 5)).tolist(), "label": np.arange(30) % 2}),
                       tmp_path / "dir" / f"{part}.parquet")
    table, info = load_source(DataConfig(source="parquet", path=str(tmp_path / "dir")), 0)
    assert table.num_rows == 60 and info.feature_shape == (5,) and info.modality == "vector"
    for shape, expected in (((3, 5, 5), (3, 5, 5)), ((5, 5, 3), (3, 5, 5)), ((6, 6), (1, 6, 6))):
        nested = rng.normal(size=(10, *shape)).tolist()
        pq.write_table(pa.table({"features": nested, "label": np.arange(10) % 2}), tmp_path / "n.parquet")
        _, info = load_source(DataConfig(source="parquet", path=str(tmp_path / "n.parquet")), 0)
        assert info.feature_shape == expected and info.modality == "image"
    _, info = load_source(DataConfig(source="parquet", path=str(tmp_path / "n.parquet"), image_shape=[1, 4, 9]), 0)
    assert info.feature_shape == (1, 4, 9)


def test_parquet_png_bytes(tmp_path) -> None:
    pq.write_table(pa.table({"image": [_png(v) for v in range(0, 240, 10)], "label": np.arange(24) % 3}),
                   tmp_path / "img.parquet")
    table, info = load_source(DataConfig(source="parquet", path=str(tmp_path / "img.parquet"),
                                         feature_column="image"), 0)
    assert info.feature_shape == (1, 6, 6) and info.modality == "image"
    x = np.asarray(table.column("features").combine_chunks().flatten()).reshape(24, 36)
    assert np.allclose(x[:, 0], np.arange(0, 240, 10) / 255.0)
    structs = [{"bytes": _png(v, mode="RGB"), "path": None} for v in range(24)]
    pq.write_table(pa.table({"image": structs, "label": np.arange(24) % 3}), tmp_path / "rgb.parquet")
    _, info = load_source(DataConfig(source="parquet", path=str(tmp_path / "rgb.parquet"), feature_column="image",
                                     image_shape=[3, 4, 4]), 0)
    assert info.feature_shape == (3, 4, 4)


def test_parquet_errors(tmp_path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"features": [[1.0, 2.0]] * 4, "target": [0, 1, 0, 1]}), path)
    with pytest.raises(ConfigError, match=r"'data.label_column': column 'label' not found in .*a\.parquet.*"
                                          r"columns there: features, target"):
        load_source(DataConfig(source="parquet", path=str(path)), 0)
    with pytest.raises(ConfigError, match="does not exist"):
        DataConfig(source="parquet", path="nope.parquet")
    pq.write_table(pa.table({"features": [[1.0], [1.0, 2.0]], "label": [0, 1]}), path)
    with pytest.raises(ConfigError, match="ragged"):
        load_source(DataConfig(source="parquet", path=str(path)), 0)


def test_huggingface_save_to_disk(tmp_path) -> None:
    import datasets
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c", "d"])})
    images = [{"bytes": _png(v), "path": None} for v in range(30)]
    train = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(30)]}, features=feats)
    datasets.DatasetDict({"train": train, "test": train.select(range(6))}).save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(source="huggingface", path=str(tmp_path / "hf"), feature_column="image", num_clients=3,
                     partition=PartitionConfig(min_samples=2))
    ds = FederatedDataset.from_config(cfg, seed=0)
    assert ds.info.feature_shape == (1, 6, 6) and ds.info.num_classes == 4  # from the ClassLabel feature
    # the dataset's own test split is the clients' test data (data.test_split: auto); train rows are all trained on
    assert sum(ds.num_train(c) for c in ds.client_ids) == 30 and sum(ds.num_test(c) for c in ds.client_ids) == 6
    own = FederatedDataset.from_config(dataclasses.replace(cfg, test_split=None), seed=0)
    assert sum(own.num_train(c) + own.num_test(c) for c in own.client_ids) == 30
    table, _ = load_source(DataConfig(source="huggingface", path=str(tmp_path / "hf"), split="test",
                                      feature_column="image"), 0)
    assert table.num_rows == 6
    with pytest.raises(ConfigError, match="split 'valid' not in .*splits there: train, test"):
        load_source(DataConfig(source="huggingface", path=str(tmp_path / "hf"), split="valid"), 0)


def test_own_test_split_follows_each_clients_classes_or_group(tmp_path) -> None:
    import datasets
    rng = np.random.default_rng(0)
    def split(n, k):
        y = np.arange(n) % k
        return datasets.Dataset.from_dict({"features": rng.normal(size=(n, 3)).tolist(), "label": y.tolist(),
                                           "site": [f"s{v % 3}" for v in range(n)]})
    datasets.DatasetDict({"train": split(120, 4), "test": split(80, 4)}).save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(source="huggingface", path=str(tmp_path / "hf"), num_clients=4,
                     partition=PartitionConfig(name="pathological", classes_per_client=1, min_samples=2))
    ds = FederatedDataset.from_config(cfg, seed=1)
    seen = []
    for c in ds.client_ids:
        t = ds.client_data(c).only_task()
        assert set(t.y_test) == set(t.y_train)  # tested on the classes it trains on, from the test split
        seen.append(len(t.y_test))
    assert sum(seen) == 80 and sum(ds.num_train(c) for c in ds.client_ids) == 120
    # by_column: a client's test rows are its own group's
    grouped = FederatedDataset.from_config(dataclasses.replace(cfg, num_clients=3, group_column="site",
                                                               partition=PartitionConfig(name="by_column")), seed=0)
    assert [grouped.num_test(c) for c in grouped.client_ids] == [27, 27, 26]
    with pytest.raises(ConfigError, match="data.test_split.*'valid' not in"):
        FederatedDataset.from_config(dataclasses.replace(cfg, test_split="valid"), seed=0)
    with pytest.raises(ConfigError, match="data.test_split"):
        DataConfig(source="digits", test_split="test")
    with pytest.raises(ConfigError, match=r"client\(s\) \[.*\] get no row"):
        assign_test_rows([np.array([0, 1]), np.array([2, 3])], np.array([0, 0, 1, 1, 0]), np.array([4]), seed=0)


def _tiny_tokenizer(folder) -> str:
    import transformers
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "plot", "great"]
    try:
        tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    except TypeError:  # transformers < 5 takes a vocab file
        (folder / "vocab.txt").write_text("\n".join(words))
        tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(str(folder / "tok"))
    return str(folder / "tok")


def test_text_with_local_tokenizer(tmp_path) -> None:
    tok = _tiny_tokenizer(tmp_path)
    texts = ["good movie", "bad plot", "great great movie good", "bad"] * 10
    pq.write_table(pa.table({"text": texts, "label": [1, 0, 1, 0] * 10}), tmp_path / "t.parquet")
    cfg = DataConfig(source="parquet", path=str(tmp_path / "t.parquet"), text_column="text", tokenizer=tok,
                     max_length=8, num_clients=2, partition=PartitionConfig(min_samples=4))
    ds = FederatedDataset.from_config(cfg, seed=0)
    cd = ds.client_data(0)
    assert ds.info.modality == "text" and ds.info.vocab_size == 10 and ds.info.feature_shape == (8,)
    assert cd.x_train.shape == (cd.num_train, 8) and cd.x_train.dtype == np.int64
    assert cd.x_train.max() < 10


def test_federated_dataset_deterministic_summary_and_plot(tmp_path) -> None:
    cfg = DataConfig(source="digits", num_clients=8, partition=PartitionConfig(alpha=0.5))
    a, b = FederatedDataset.from_config(cfg, seed=3), FederatedDataset.from_config(cfg, seed=3)
    for cid in a.client_ids:
        x, y = a.client_data(cid), b.client_data(cid)
        assert np.array_equal(x.x_train, y.x_train) and np.array_equal(x.y_test, y.y_test)
    code = ("from rayfed.config import *; from rayfed.data import FederatedDataset as F; import hashlib;"
            "d=F.from_config(DataConfig(source='digits',num_clients=8,partition=PartitionConfig(alpha=0.5)),3);"
            "c=d.client_data(5); print(hashlib.sha256(c.x_train.tobytes()+c.y_test.tobytes()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    c = a.client_data(5)
    assert other == hashlib.sha256(c.x_train.tobytes() + c.y_test.tobytes()).hexdigest()
    assert sum(a.client_sizes().values()) + sum(a.num_test(c) for c in a.client_ids) == 1797
    counts = a.label_counts()
    assert counts.shape == (8, 10) and counts.sum() == 1797
    summary = a.summary()
    assert summary.num_rows == 8 and summary.column("num_train").to_pylist() == list(a.client_sizes().values())
    top = summary.column("top_classes")[0].as_py()
    best = int(np.argmax(counts[0]))
    assert top.startswith(f"{best}:{counts[0, best]}")
    for n_clients in (8, 60):
        ds = a if n_clients == 8 else FederatedDataset.from_config(
            DataConfig(source="digits", num_clients=60, partition=PartitionConfig(min_samples=5)), seed=0)
        out = plot_label_distribution(ds, tmp_path / f"labels_{n_clients}.png")
        assert out.exists() and out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 1000
    with pytest.raises(KeyError, match="valid ids are 0..7"):
        a.client_data(8)
