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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Optional

import torch

from rayfed.algorithms.base import ClientState
from rayfed.safe_io import UnsafeStateError, read_meta, read_state, write_state

__all__ = ["STATE_SUFFIX", "ClientStateStore", "read_client_states", "saved_round"]

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


class ClientStateStore:
    """Client states by id (a mutable mapping), savable to and loadable from safe files."""

    def __init__(self) -> None:
        self._states: dict[int, ClientState] = {}

    def __contains__(self, cid: object) -> bool:
        return cid in self._states

    def __getitem__(self, cid: int) -> ClientState:
        return self._states[cid]

    def __setitem__(self, cid: int, state: ClientState) -> None:
        self._states[cid] = state

    def __iter__(self) -> Iterator[int]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def items(self):
        return self._states.items()

    def save(self, directory: str | os.PathLike, owner: str, *, round: int) -> Path:
        """Write every state to ``directory/<owner>.safetensors`` (atomic, 0600; folder 0700).

        Raises:
            UnsafeStateError: a state holds a value that cannot be stored safely (naming the client
                and where in its state).
        """
        path = Path(directory) / f"{owner}{STATE_SUFFIX}"
        tree = {}
        for cid, st in sorted(self._states.items()):
            tree[str(cid)] = _tree(st)
        try:
            write_state(path, tree, meta={"round": str(round), "clients": json.dumps(sorted(self._states))})
        except UnsafeStateError as e:
            raise UnsafeStateError(f"cannot save the client states of {owner}: {e}") from e
        return path

    def load(self, directory: str | os.PathLike, client_ids: Optional[list[int]] = None, *,
             device: Optional[torch.device] = None,
             template: Optional[Callable[[int], ClientState]] = None) -> list[int]:
        """Replace the states of ``client_ids`` (default: every client found) with those saved in
        ``directory``'s state files; returns the ids loaded. Clients of ``client_ids`` without a
        saved state (or all of them, when ``directory`` does not exist yet) are forgotten from memory:
        a rolled-back client that had no state yet starts fresh again. ``template(cid)`` gives a fresh
        state whose modules saved ones load into.
        """
        found = (read_client_states(directory, device=device, template=template, client_ids=client_ids)
                 if Path(directory).is_dir() else {})
        wanted = list(found) if client_ids is None else list(client_ids)
        for cid in wanted:
            if cid in found:
                self._states[cid] = found[cid]
            else:
                self._states.pop(cid, None)
        return sorted(c for c in wanted if c in found)


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
    for f in sorted(d.glob(f"*{STATE_SUFFIX}")):
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
            if cid in out:
                raise UnsafeStateError(f"client {cid} has a state in two files of {str(d)!r}")
            out[cid] = _state(cid, st, device)
    return out


def saved_round(path: str | os.PathLike) -> int:
    """The round a state file was saved after."""
    return int(read_meta(path).get("round", -1))
