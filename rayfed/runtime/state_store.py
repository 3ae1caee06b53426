"""The client state store: every client's state of one cohort, in memory and in safe files.

A cohort (the clients one actor hosts) keeps each client's :class:`~rayfed.algorithms.ClientState`
(private tensors, masks, whatever the method keeps in ``extra``: adapters, a personal model, loss
history) here. :meth:`ClientStateStore.save` writes all of them as ONE file per actor
(``<directory>/<owner>.safetensors``: tensors in safetensors, the rest as a JSON tree; see
:mod:`rayfed.safe_io`), atomically and owner-only, so a crash mid-write leaves the previous file
readable and no other user can read a client's private state. Files hold no pickle, so loading a
file a user hands in cannot run code. :func:`read_client_states` reads a directory of such files
without Ray (for ``rayfed report``, export and tests).

Example:
    >>> import tempfile, torch
    >>> from rayfed.algorithms.base import ClientState
    >>> store = ClientStateStore()
    >>> store[3] = ClientState(3, {"head.weight": torch.ones(2)}, {"losses": [0.5]})
    >>> d = tempfile.mkdtemp()
    >>> _ = store.save(d, "actor_0", round=1)
    >>> back = read_client_states(d)
    >>> back[3].private["head.weight"].tolist(), back[3].extra
    ([1.0, 1.0], {'losses': [0.5]})
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rayfed.algorithms.base import ClientState
from rayfed.safe_io import UnsafeStateError, ensure_private_dir, read_meta, read_state, write_state

__all__ = ["STATE_SUFFIX", "ClientStateStore", "read_client_states", "saved_round", "state_nbytes"]

#: suffix of a cohort's state file
STATE_SUFFIX = ".safetensors"


def _tree(st: ClientState) -> dict:
    return {"client_id": st.client_id, "private": dict(st.private), "masks": dict(st.masks), "extra": st.extra,
            "rounds_trained": st.rounds_trained}


def _state(cid: int, tree: Mapping, device: Optional[torch.device]) -> ClientState:
    def move(d: Mapping) -> dict:
        return {k: (v.to(device) if device is not None else v) for k, v in d.items()}

    if int(tree["client_id"]) != cid:
        raise UnsafeStateError(f"state of client {cid} claims to be client {tree['client_id']}")
    return ClientState(cid, move(tree["private"]), tree["extra"], int(tree["rounds_trained"]), move(tree["masks"]))


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, np.ndarray):
        return int(x.nbytes)
    if isinstance(x, Mapping):
        return sum(_nbytes(v) for v in x.values()) + 64
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x) + 64
    return 64


def state_nbytes(st: ClientState) -> int:
    """Approximate memory of a client state (its tensors and arrays, plus a little per entry)."""
    return _nbytes(st.private) + _nbytes(st.masks) + _nbytes(st.extra) + 256


class ClientStateStore:
    """Client states by id (a mutable mapping), kept in memory up to a budget, savable to safe files.

    With ``budget_bytes``, the least recently used states beyond it are written to ``spill_dir``
    (one owner-only safe file per client) and read back when needed, so the number of clients a
    cohort holds is bounded by disk, not memory. Algorithms change states in place, so the cohort
    calls :meth:`touch` after changing one (it is then measured again, and saved by the next
    :meth:`persist`).

    Args:
        budget_bytes: memory for states (None: no limit).
        spill_dir: where states beyond the budget go (required with a budget).
        template: ``template(cid)`` gives a fresh state whose modules saved ones load into.
    """

    def __init__(self, *, budget_bytes: Optional[int] = None, spill_dir: Optional[str | os.PathLike] = None,
                 template: Optional[Callable[[int], ClientState]] = None) -> None:
        if budget_bytes is not None and spill_dir is None:
            raise ValueError("a state memory budget needs a spill folder")
        self.budget = budget_bytes
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.template = template
        self._mem: OrderedDict[int, ClientState] = OrderedDict()
        self._size: dict[int, int] = {}
        self._spilled: set[int] = set()
        self._dirty: set[int] = set()
        self.spills = 0  # states written out so far (for metrics and tests)

    # -- mapping ------------------------------------------------------------------------------------
    def __contains__(self, cid: object) -> bool:
        return cid in self._mem or cid in self._spilled

    def __getitem__(self, cid: int) -> ClientState:
        if cid in self._mem:
            self._mem.move_to_end(cid)
            return self._mem[cid]
        if cid not in self._spilled:
            raise KeyError(cid)
        path = self._spill_path(cid)
        tree = read_state(path, {str(cid): _tree(self.template(cid))} if self.template is not None else None)
        st = _state(cid, tree[str(cid)], None)
        self._spilled.discard(cid)
        path.unlink(missing_ok=True)
        self._put(cid, st)
        return st

    def __setitem__(self, cid: int, state: ClientState) -> None:
        self._spilled.discard(cid)
        self._dirty.add(cid)
        self._put(cid, state)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids())

    def __len__(self) -> int:
        return len(self._mem) + len(self._spilled)

    def ids(self) -> list[int]:
        """Every client with a state, in memory or spilled."""
        return sorted(set(self._mem) | self._spilled)

    def touch(self, cid: int) -> None:
        """Client ``cid``'s state was changed in place: measure it again and save it with the next persist."""
        if cid in self._mem:
            self._dirty.add(cid)
            self._size[cid] = state_nbytes(self._mem[cid])
            self._evict(keep=cid)

    def memory_bytes(self) -> int:
        """Approximate memory held by the states in memory."""
        return sum(self._size.values())

    def _put(self, cid: int, st: ClientState) -> None:
        self._mem[cid] = st
        self._mem.move_to_end(cid)
        self._size[cid] = state_nbytes(st)
        self._evict(keep=cid)

    def _spill_path(self, cid: int) -> Path:
        return self.spill_dir / f"client_{cid}{STATE_SUFFIX}"

    def _evict(self, keep: int) -> None:
        if self.budget is None:
            return
        while sum(self._size.values()) > self.budget and len(self._mem) > 1:
            cid = next(iter(self._mem))
            if cid == keep:
                self._mem.move_to_end(cid)
                cid = next(iter(self._mem))
            st = self._mem.pop(cid)
            self._size.pop(cid)
            ensure_private_dir(self.spill_dir)
            write_state(self._spill_path(cid), {str(cid): _tree(st)})
            self._spilled.add(cid)
            self.spills += 1

    def _all(self, ids: Iterable[int]) -> Iterator[tuple[int, ClientState]]:
        """States of ``ids`` without loading spilled ones into memory."""
        for cid in ids:
            if cid in self._mem:
                yield cid, self._mem[cid]
            else:
                tpl = {str(cid): _tree(self.template(cid))} if self.template is not None else None
                yield cid, _state(cid, read_state(self._spill_path(cid), tpl)[str(cid)], None)

    # -- files --------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, owner: str, *, round: int) -> list[Path]:
        """Write every state to ``directory/<owner>.safetensors`` (atomic, 0600; folder 0700), in files
        of at most :data:`CHUNK_CLIENTS` clients (``<owner>.<k>.safetensors`` after the first).

        Raises:
            UnsafeStateError: a state holds a value that cannot be stored safely (naming the client
                and where in its state).
        """
        ids = self.ids()
        paths = []
        for k in range(0, max(len(ids), 1), CHUNK_CLIENTS):
            part = ids[k:k + CHUNK_CLIENTS]
            name = f"{owner}{STATE_SUFFIX}" if k == 0 else f"{owner}.{k // CHUNK_CLIENTS}{STATE_SUFFIX}"
            paths.append(self._write(Path(directory) / name, part, owner, round))
        return paths

    def persist(self, directory: str | os.PathLike, owner: str, *, round: int) -> list[Path]:
        """Save what changed since the last persist (``<owner>.r<round>.safetensors``), for recovery;
        every :data:`COMPACT_EVERY` of them are merged into full files (:meth:`save`).
        """
        d = Path(directory)
        increments = sorted(d.glob(f"{owner}.r*{STATE_SUFFIX}")) if d.is_dir() else []
        if len(increments) >= COMPACT_EVERY:
            paths = self.save(d, owner, round=round)
            for p in increments:
                p.unlink(missing_ok=True)
        else:
            paths = [self._write(d / f"{owner}.r{round:06d}{STATE_SUFFIX}", sorted(self._dirty), owner, round)]
        self._dirty.clear()
        return paths

    def _write(self, path: Path, ids: list[int], owner: str, round: int) -> Path:
        tree = {str(cid): _tree(st) for cid, st in self._all(ids)}
        try:
            write_state(path, tree, meta={"round": str(round), "clients": json.dumps(list(ids))})
        except UnsafeStateError as e:
            raise UnsafeStateError(f"cannot save the client states of {owner}: {e}") from e
        return path

    def load(self, directory: str | os.PathLike, client_ids: Optional[list[int]] = None, *,
             device: Optional[torch.device] = None,
             template: Optional[Callable[[int], ClientState]] = None) -> list[int]:
        """Replace the states of ``client_ids`` (default: every client found) with those saved in
        ``directory``'s state files; returns the ids loaded. Clients of ``client_ids`` without a
        saved state (or all of them, when ``directory`` does not exist yet) are forgotten: a
        rolled-back client that had no state yet starts fresh again. ``template(cid)`` gives a fresh
        state whose modules saved ones load into.
        """
        template = template or self.template
        found = (read_client_states(directory, device=device, template=template, client_ids=client_ids)
                 if Path(directory).is_dir() else {})
        wanted = list(found) if client_ids is None else list(client_ids)
        for cid in wanted:
            self._mem.pop(cid, None)
            self._size.pop(cid, None)
            if cid in self._spilled:
                self._spilled.discard(cid)
                self._spill_path(cid).unlink(missing_ok=True)
            self._dirty.discard(cid)
            if cid in found:
                self._put(cid, found[cid])
        return sorted(c for c in wanted if c in found)


#: clients per state file of one actor (a checkpoint of many clients is a few files, not one per client)
CHUNK_CLIENTS = 4096
#: incremental state files of an actor merged into full ones after this many
COMPACT_EVERY = 16


def read_client_states(directory: str | os.PathLike, *, device: Optional[torch.device] = None,
                       template: Optional[Callable[[int], ClientState]] = None,
                       client_ids: Optional[list[int]] = None) -> dict[int, ClientState]:
    """Every client state saved in ``directory`` (all its ``*.safetensors`` files), without Ray.

    ``template(cid)``, when given, is a fresh state of that client: ``nn.Module`` objects it keeps
    (e.g. a personal model) receive the saved weights (no module is ever built from a file).
    ``client_ids`` restricts the result to those clients (files without any of them are skipped).

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        UnsafeStateError: a file is not a rayfed state file (e.g. a pickle), or two files hold the same client.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"no client state folder {str(d)!r}")
    out: dict[int, ClientState] = {}
    wanted = None if client_ids is None else {int(c) for c in client_ids}

    def order(f: Path) -> tuple:  # full files first, then increments in round order (later ones win)
        stem = f.name[:-len(STATE_SUFFIX)]
        inc = stem.rsplit(".", 1)[-1] if "." in stem else ""
        return (1, int(inc[1:]), f.name) if inc.startswith("r") and inc[1:].isdigit() else (0, 0, f.name)

    for f in sorted(d.glob(f"*{STATE_SUFFIX}"), key=order):
        increment = order(f)[0] == 1
        clients = json.loads(read_meta(f).get("clients", "[]"))
        mine = [c for c in clients if wanted is None or c in wanted]
        if not mine:
            continue
        tpl = {str(c): _tree(template(c)) for c in mine} if template is not None else None
        tree = read_state(f, tpl)
        if not isinstance(tree, dict):
            raise UnsafeStateError(f"{str(f)!r} is not a file of client states")
        for key, st in tree.items():
            cid = int(key)
            if wanted is not None and cid not in wanted:
                continue
            if cid in out and not increment:
                raise UnsafeStateError(f"client {cid} has a state in two files of {str(d)!r}")
            out[cid] = _state(cid, st, device)
    return out


def saved_round(path: str | os.PathLike) -> int:
    """The round a state file was saved after."""
    return int(read_meta(path).get("round", -1))
