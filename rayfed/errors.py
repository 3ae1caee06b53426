"""Exceptions raised by rayfed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["ActorError", "ClientError", "ConfigError", "RunInterrupted", "RunStopped", "ServerLost", "did_you_mean"]


def did_you_mean(value: object, choices: Iterable[object]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``value``, or an empty string.

    The one place the hint of every "unknown name" error is made.

    Example:
        >>> did_you_mean("fedpr", ["fedavg", "fedper"])
        " (did you mean 'fedper'?)"
    """
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ConfigError(ValueError):
    """A configuration value is invalid.

    The message names the key, the value received and how to fix it. Raised before any actor
    starts, so a bad config never costs cluster time.
    """


class ClientError(RuntimeError):
    """A client failed during a round.

    Attributes:
        client_id: the failing client.
        round: the round in which it failed, numbered as in the metrics table (from 1; the
            post-training stage is round ``rounds``); -1 for set-up.
        stage: what the client was doing: ``"setup"``, ``"train"``, ``"evaluate"``, ``"finalize"``
            or ``"timeout"``.
        detail: the formatted cause (traceback text when it came from a remote actor).
    """

    def __init__(self, client_id: int, round: int, stage: str, detail: str = "") -> None:
        self.client_id = client_id
        self.round = round
        self.stage = stage
        self.detail = detail
        first = detail.strip().splitlines()[-1] if detail.strip() else "no detail"
        super().__init__(f"client {client_id} failed in round {round} during {stage}: {first}")

    def __reduce__(self):  # picklable across Ray processes
        return (type(self), (self.client_id, self.round, self.stage, self.detail))


class ActorError(RuntimeError):
    """A client actor died or stopped responding (recorded once per actor and round).

    Attributes:
        actor: the actor's index.
        clients: the clients it was running in that round.
        round: the round (1-based, as in the metrics).
        stage: what it was doing (``train``, ``evaluate``, ...).
        cause: a one-line cause (Ray's message shortened).
        recovered: whether the round was rerun on the restarted actor (``runtime.recovery: exact``),
            so that nothing of it was lost.
    """

    def __init__(self, actor: int, clients: list[int], round: int, stage: str, cause: str,
                 recovered: bool = False) -> None:
        self.actor, self.clients, self.round, self.stage = actor, list(clients), round, stage
        self.cause, self.recovered = cause, recovered
        what = "rerun on the restarted actor" if recovered else "its clients dropped from the round"
        super().__init__(f"client actor {actor} ({len(self.clients)} clients) was lost in round {round} during "
                         f"{stage}: {cause}; {what}")

    def __reduce__(self):
        return (type(self), (self.actor, self.clients, self.round, self.stage, self.cause, self.recovered))


class ServerLost(RuntimeError):
    """The server actor died: the run cannot go on (resume it from its last checkpoint)."""


class RunStopped(RuntimeError):
    """A run could not go on (e.g. its server actor died); the message says what was kept and how to resume."""


class RunInterrupted(RunStopped):
    """The run was stopped on request (Ctrl-C) after a round, with a checkpoint of it."""
