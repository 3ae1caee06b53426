"""The Ray backend of asynchronous training (:mod:`rayfed.runtime.asynchronous`).

Each dispatched client is one ``train_async`` call on the client actor that owns it, fed with the
server's current broadcast and that client's payload as object references (the server actor
serves calls in order, so they reflect every update applied before the dispatch; the broadcast
object is reused until the next update is applied). Its upload goes
to the object store; the driver holds only metadata and the reference, which it hands to the
server actor's ``apply_async``. With real delays, ``ray.wait`` returns whichever client finishes
first and the driver dispatches a new client into the freed slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import RayError

from rayfed.algorithms.base import ClientUpdate
from rayfed.errors import ClientError
from rayfed.runtime.core import ClientFailure
from rayfed.runtime.ray_executor import RayExecutor, cause_text

__all__ = ["RayAsyncBackend"]


class RayAsyncBackend:
    """:class:`~rayfed.runtime.asynchronous.AsyncBackend` over a :class:`RayExecutor`'s actors."""

    def __init__(self, executor: RayExecutor) -> None:
        self.ex = executor

    def dispatch(self, round: int, client_id: int, nonce: int) -> ray.ObjectRef:
        # one broadcast object per server state (apply() forgets it), a payload call only for
        # algorithms that have payloads: server calls sit between an update and the next dispatch
        broadcast = self.ex._broadcast_ref(round)
        payloads = self.ex.server.payloads.remote(round, [[client_id]]) if self.ex._has_payloads else {}
        actor = self.ex.actors[self.ex.owner[client_id]]
        return actor.train_async.remote(round, client_id, broadcast, payloads, nonce)

    def wait_any(self, tokens: Sequence[ray.ObjectRef]) -> ray.ObjectRef:
        ready, _ = ray.wait(list(tokens), num_returns=1)
        return ready[0]

    def collect(self, token: ray.ObjectRef, client_id: int, round: int) -> tuple[ClientUpdate | ClientError, Any]:
        try:
            res = ray.get(token)
        except RayError as e:  # the actor died or the call failed outside the client's own code
            return ClientFailure(client_id, round, "train", cause_text(e)).to_error(), None
        if isinstance(res, ClientFailure):
            return res.to_error(), None
        meta, ref = res
        return meta, (meta, ref)

    def apply(self, round: int, handles: list[Any], scales: list[float]) -> dict[str, float]:
        self.ex.forget_broadcast()
        return ray.get(self.ex.server.apply_async.remote(round, handles, scales))

    def result_of(self, token: ray.ObjectRef) -> ClientUpdate | ClientFailure:
        res = ray.get(token)
        if isinstance(res, ClientFailure):
            return res
        meta, ref = res
        return ClientUpdate(meta.client_id, meta.round, meta.num_samples, ray.get(ref), meta.metrics)

    def update_of(self, handle: Any) -> ClientUpdate:
        meta, ref = handle
        return ClientUpdate(meta.client_id, meta.round, meta.num_samples, ray.get(ref), meta.metrics)

    def adopt(self, nonce: int, work: ClientUpdate | ClientFailure) -> ray.ObjectRef:
        if isinstance(work, ClientFailure):
            return ray.put(work)
        return ray.put((ClientUpdate(work.client_id, work.round, work.num_samples, {}, work.metrics),
                        ray.put(work.tensors)))

    def adopt_handle(self, update: ClientUpdate) -> Any:
        return ClientUpdate(update.client_id, update.round, update.num_samples, {}, update.metrics), \
            ray.put(update.tensors)
