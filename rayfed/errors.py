"""Exceptions raised by rayfed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["ClientError", "ConfigError", "did_you_mean"]


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
        round: the round (0-based) in which it failed; -1 for set-up, ``rounds`` for finalize.
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
