"""Checkpoints: their layout, their manifest, and the checks that guard a resume.

A checkpoint folder (``<run dir>/checkpoints/round_<N>``) holds::

    server.safetensors          server state, step counter, privacy record (rayfed.safe_io)
    clients/<actor>.safetensors every client's state, one file per actor (rayfed.runtime.state_store)
    driver.safetensors          the driver's own bookkeeping (asynchronous scheduling state)
    rayfed_checkpoint.json      the manifest, written last: round, config fingerprint, every file's sha256

A checkpoint counts only once its manifest is written, and a resume refuses one whose files are
missing or differ from their recorded hashes, or whose config differs from the run's in anything
that changes results (naming the keys and both values). Nothing here imports Ray.

Example:
    >>> from rayfed.config import load_config
    >>> a, b = load_config(None, ["train.lr=0.1"]), load_config(None, ["train.lr=0.2", "rounds=50"])
    >>> config_differences(fingerprint(a), fingerprint(b))
    [('train.lr', 0.1, 0.2)]
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from rayfed.config import FederationConfig, to_dict
from rayfed.errors import ConfigError
from rayfed.safe_io import ensure_private_dir, write_atomic

__all__ = ["CLIENTS_DIR", "DRIVER_FILE", "MANIFEST", "SERVER_FILE", "check_checkpoint", "config_differences",
           "fingerprint", "latest_checkpoint", "write_manifest"]

SERVER_FILE = "server.safetensors"
CLIENTS_DIR = "clients"
DRIVER_FILE = "driver.safetensors"
MANIFEST = "rayfed_checkpoint.json"

#: config keys that change where or how fast a run goes, not its results (a resume may change them);
#: ``rounds`` may grow so that a resumed run trains longer
_FREE = ("output", "rounds", "compare", "runtime.executor", "runtime.address", "runtime.num_actors",
         "runtime.num_cpus_per_actor", "runtime.num_gpus_per_actor", "runtime.resources_per_actor",
         "runtime.server_num_cpus", "runtime.server_num_gpus",
         "runtime.server_device", "runtime.round_timeout_s", "runtime.sites", "runtime.actors_per_site",
         "runtime.on_client_failure", "runtime.min_quorum", "runtime.recovery", "runtime.device",
         "runtime.min_timeout_s", "runtime.placement_timeout_s", "runtime.state_dir")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def fingerprint(cfg: FederationConfig) -> dict[str, Any]:
    """The config keys that change a run's results, flattened (``{"train.lr": 0.1, ...}``)."""
    flat = _flat(json.loads(json.dumps(to_dict(cfg), default=str)))
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in _FREE)}


def config_differences(saved: dict[str, Any], mine: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, this run's value)`` for every result-changing key that differs."""
    keys = sorted(set(saved) | set(mine))
    return [(k, saved.get(k), mine.get(k)) for k in keys if saved.get(k) != mine.get(k)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, round: int, cfg: FederationConfig,
                   extra: Optional[dict[str, Any]] = None) -> Path:
    """Seal a checkpoint folder: record its round, config fingerprint and every file's hash."""
    d = ensure_private_dir(directory)
    files = {str(p.relative_to(d)): _sha256(p) for p in sorted(d.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    body = {"round": int(round), "algorithm": cfg.algorithm.name, "num_clients": cfg.data.num_clients,
            "config": fingerprint(cfg), "files": files, **(extra or {})}
    path = d / MANIFEST
    write_atomic(path, json.dumps(body, indent=1, default=str).encode())
    return path


def check_checkpoint(directory: str | os.PathLike, cfg: FederationConfig) -> dict[str, Any]:
    """The manifest of a complete checkpoint written with this config; a :class:`ConfigError`
    naming what is wrong otherwise (missing folder or manifest, missing or corrupt files, config keys
    that differ), with the fix.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"resume: checkpoint folder {str(d)!r} does not exist; pass a run directory or one of its "
                          "checkpoints/round_N folders")
    m = d / MANIFEST
    if not m.exists():
        raise ConfigError(f"resume: {str(d)!r} has no {MANIFEST}, so it is not a complete checkpoint (the run may "
                          "have stopped while writing it); resume from an earlier checkpoint")
    try:
        meta = json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"resume: {str(m)!r} is not valid JSON ({e}); the checkpoint is corrupt") from e
    bad = []
    for rel, digest in meta.get("files", {}).items():
        p = d / rel
        if not p.exists():
            bad.append(f"{rel} (missing)")
        elif _sha256(p) != digest:
            bad.append(f"{rel} (changed or corrupt)")
    if bad:
        raise ConfigError(f"resume: checkpoint {str(d)!r} is incomplete: {', '.join(bad)}; resume from another "
                          "checkpoint")
    diff = config_differences(meta.get("config", {}), fingerprint(cfg))
    if diff:
        listed = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise ConfigError(f"resume: checkpoint {str(d)!r} was written with a config that differs in what changes "
                          f"results: {listed}{more}; resume with the run's own config.yaml")
    return meta


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """The newest complete checkpoint of a run directory (or ``path`` itself when it is one).

    Raises:
        ConfigError: ``path`` does not exist or holds no complete checkpoint.
    """
    p = Path(path)
    if (p / MANIFEST).exists():
        return p
    if not p.exists():
        raise ConfigError(f"resume: {str(p)!r} does not exist; pass the run directory of an interrupted run")
    found = []
    for c in (p / "checkpoints").glob("*") if (p / "checkpoints").is_dir() else []:
        if (c / MANIFEST).exists():
            try:
                found.append((int(json.loads((c / MANIFEST).read_text())["round"]), c.name != "final", c))
            except (ValueError, KeyError, json.JSONDecodeError):
                continue
    if not found:
        raise ConfigError(f"resume: {str(p)!r} holds no complete checkpoint (checkpoints/*/{MANIFEST}); set "
                          "output.checkpoint_every to write them")
    return max(found)[2]
