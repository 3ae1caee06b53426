"""Safe files for state: tensors in safetensors, everything else in JSON; no pickle anywhere.

A state (a client's private tensors, masks and extras, the server's weights and algorithm state) is
a *tree* of dicts, lists, tuples, numbers, strings, ``None``, numpy arrays, torch tensors and
``torch.nn.Module`` objects. :func:`dump_tree` splits it into a JSON skeleton and a flat mapping of
arrays (written together by :func:`write_state`: one ``.safetensors`` file whose metadata holds the
skeleton); :func:`load_tree` rebuilds it. Reading a file can never run code: safetensors holds only
raw buffers, and the skeleton is JSON. An ``nn.Module`` is stored as its state dict and loaded back
*into* the module found at the same place of a template (a freshly initialised state of the same
config), so no class is ever constructed from a file.

Files are written atomically (a temporary file in the same folder, fsync, then rename), so a crash
mid-write leaves the previous file intact, and created owner-only (0600; folders 0700): client state
is private.

Example:
    >>> import tempfile, numpy as np, torch
    >>> tree = {"w": torch.ones(2), "step": 3, "names": ["a", "b"], "m": {1: np.zeros(2)}}
    >>> path = tempfile.mkdtemp() + "/state.safetensors"
    >>> write_state(path, tree)
    >>> back = read_state(path)
    >>> back["step"], back["names"], back["m"][1].tolist(), back["w"].tolist()
    (3, ['a', 'b'], [0.0, 0.0], [1.0, 1.0])
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["UnsafeStateError", "dump_tree", "ensure_private_dir", "load_tree", "read_meta", "read_state",
           "write_atomic", "write_state"]

_META_KEY = "rayfed.tree"


class UnsafeStateError(ValueError):
    """A state holds a value that cannot be stored safely, or a file is not a rayfed state file."""


def ensure_private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) if needed, owner-only (0700)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(p, 0o700)
    return p


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and owner-only (0600)."""
    p = Path(path)
    ensure_private_dir(p.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return True


def dump_tree(tree: Any, *, where: str = "state") -> tuple[Any, dict[str, torch.Tensor]]:
    """``(skeleton, tensors)``: a JSON-able skeleton of ``tree`` and its arrays by generated key.

    Raises:
        UnsafeStateError: a value of another type, naming its place in the tree (``where``).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, at: str) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            if isinstance(x, float) and not np.isfinite(x):
                return {"__float__": repr(x)}
            return x
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return walk(x.item(), at)
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().to("cpu").clone()  # own storage: safetensors refuses shared buffers
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            if x.dtype == object:
                raise UnsafeStateError(f"{at} is a numpy array of Python objects; store numbers only")
            key = f"t{len(tensors)}"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x).copy())
            return {"__ndarray__": key}
        if isinstance(x, torch.nn.Module):
            return {"__module__": walk(dict(x.state_dict()), f"{at}.state_dict()")}
        if isinstance(x, Mapping):
            items = list(x.items())
            if all(isinstance(k, str) and not k.startswith("__") for k, _ in items):
                return {k: walk(v, f"{at}[{k!r}]") for k, v in items}
            return {"__items__": [[walk(k, f"{at} key"), walk(v, f"{at}[{k!r}]")] for k, v in items]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{at}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, (list, set, frozenset)):
            kind = "__set__" if isinstance(x, (set, frozenset)) else None
            vals = sorted(x, key=repr) if kind else x
            out = [walk(v, f"{at}[{i}]") for i, v in enumerate(vals)]
            return {kind: out} if kind else out
        raise UnsafeStateError(f"{at} holds a {type(x).__module__}.{type(x).__qualname__}, which cannot be stored "
                               "safely; keep tensors, numpy arrays, numbers, strings, lists, tuples and dicts "
                               "(or nn.Modules) in state")

    return walk(tree, where), tensors


def load_tree(skeleton: Any, tensors: Mapping[str, torch.Tensor], template: Any = None) -> Any:
    """The tree of :func:`dump_tree`; modules are loaded into the module at the same place of ``template``.

    Raises:
        UnsafeStateError: a module without a template module at its place, or a missing tensor.
    """
    def walk(s: Any, tpl: Any, at: str) -> Any:
        if isinstance(s, list):
            return [walk(v, _at(tpl, i), f"{at}[{i}]") for i, v in enumerate(s)]
        if not isinstance(s, dict):
            return s
        if "__tensor__" in s or "__ndarray__" in s:
            key = s.get("__tensor__", s.get("__ndarray__"))
            if key not in tensors:
                raise UnsafeStateError(f"{at}: tensor {key!r} is missing from the state file")
            t = tensors[key]
            return t.clone() if "__tensor__" in s else t.numpy().copy()
        if "__float__" in s:
            return float(s["__float__"])
        if "__module__" in s:
            if not isinstance(tpl, torch.nn.Module):
                raise UnsafeStateError(f"{at} was a module, but the fresh state has {type(tpl).__name__} there; "
                                       "resume with the same config")
            tpl.load_state_dict(walk(s["__module__"], None, at))
            return tpl
        if "__tuple__" in s:
            return tuple(walk(v, _at(tpl, i), f"{at}[{i}]") for i, v in enumerate(s["__tuple__"]))
        if "__set__" in s:
            return {_freeze(walk(v, None, at)) for v in s["__set__"]}
        if "__items__" in s:
            out = {}
            for k, v in s["__items__"]:
                key = _freeze(walk(k, None, at))
                out[key] = walk(v, _at(tpl, key), f"{at}[{key!r}]")
            return out
        return {k: walk(v, _at(tpl, k), f"{at}[{k!r}]") for k, v in s.items()}

    return walk(skeleton, template, "state")


def _at(tpl: Any, key: Any) -> Any:
    try:
        return tpl[key] if tpl is not None else None
    except (KeyError, IndexError, TypeError):
        return None


def _freeze(x: Any) -> Any:
    return tuple(_freeze(v) for v in x) if isinstance(x, list) else x


def write_state(path: str | os.PathLike, tree: Any, *, meta: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tree`` to one safetensors file (atomically, owner-only); ``meta`` adds string metadata."""
    from safetensors.torch import save

    skeleton, tensors = dump_tree(tree)
    info = {_META_KEY: json.dumps(skeleton), **dict(meta or {})}
    write_atomic(path, save(tensors, metadata=info))


def read_state(path: str | os.PathLike, template: Any = None) -> Any:
    """Read a file of :func:`write_state` (see :func:`load_tree` for ``template``).

    Raises:
        UnsafeStateError: the file is not a rayfed state file (e.g. a pickle), naming it.
        FileNotFoundError: there is no file at ``path``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    p = Path(path)
    data = p.read_bytes()
    try:
        tensors = load(data)
        meta = _metadata(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise UnsafeStateError(f"{str(p)!r} is not a rayfed state file (safetensors with a JSON tree): {e}; files "
                               "from other programs (e.g. a pickle) are never loaded") from e
    if _META_KEY not in meta:
        raise UnsafeStateError(f"{str(p)!r} is a safetensors file without a rayfed state tree")
    return load_tree(json.loads(meta[_META_KEY]), tensors, template)


def read_meta(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a :func:`write_state` file (without reading its tensors).

    Raises:
        UnsafeStateError: the file is not a safetensors file.
    """
    try:
        meta = _metadata(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise UnsafeStateError(f"{str(path)!r} is not a rayfed state file (safetensors with a JSON tree): {e}; "
                               "files from other programs (e.g. a pickle) are never loaded") from e
    return {k: v for k, v in meta.items() if k != _META_KEY}


def _metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("file too short for safetensors")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("bad safetensors header length")
    header = json.loads(data[8:8 + n])
    return dict(header.get("__metadata__", {}) or {})
