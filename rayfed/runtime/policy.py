"""The failure policy: when a round with failed clients goes on, and when it stops the run.

One object for the synchronous executors (local and Ray, where the server actor asks it before
committing a round) and the asynchronous driver, so ``runtime.on_client_failure`` and
``runtime.min_quorum`` mean the same everywhere.

Example:
    >>> from rayfed.config import RuntimeConfig
    >>> policy = FailurePolicy(RuntimeConfig(min_quorum=0.5))
    >>> policy.survives(attempted=10, failed=5), policy.survives(attempted=10, failed=6)
    (True, False)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from rayfed.config import RuntimeConfig
from rayfed.errors import ClientError

__all__ = ["FailurePolicy"]

log = logging.getLogger("rayfed")


class FailurePolicy:
    """``runtime.on_client_failure`` (drop or raise) and ``runtime.min_quorum``.

    Args:
        runtime: the ``runtime`` config section.
    """

    def __init__(self, runtime: RuntimeConfig) -> None:
        self.mode = runtime.on_client_failure
        self.min_quorum = runtime.min_quorum

    def needed(self, attempted: int) -> int:
        """Successful clients a round of ``attempted`` clients needs."""
        return math.ceil(self.min_quorum * attempted)

    def survives(self, attempted: int, failed: int) -> bool:
        """Whether a round in which ``failed`` of ``attempted`` clients failed may be aggregated."""
        if failed == 0:
            return True
        if self.mode == "raise":
            return False
        return attempted - failed >= self.needed(attempted)

    def enforce(self, attempted: int, failures: Sequence[ClientError], stage: str, *,
                complete: bool = True) -> None:
        """Log the failures, then raise per the policy: the first failure under ``raise``; a
        :class:`ClientError` naming the quorum when too few of ``attempted`` clients succeeded.

        ``complete=False`` (an asynchronous round still collecting updates) checks the quorum
        only once ``attempted`` reaches a round's worth, which the caller decides.
        """
        if not failures:
            return
        for f in failures:
            log.warning("%s", f)
        if self.mode == "raise":
            raise failures[0]
        if complete and not self.survives(attempted, len(failures)):
            first = failures[0]
            raise ClientError(first.client_id, first.round, first.stage,
                              f"{first.detail}\n{len(failures)} of {attempted} clients failed in {stage}; the quorum "
                              f"runtime.min_quorum={self.min_quorum} needs {self.needed(attempted)}") from first
