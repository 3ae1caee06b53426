"""FedRep: Collins, Hassani, Mokhtari, Shakkottai. *Exploiting Shared Representations for
Personalized Federated Learning.* ICML 2021, arXiv 2102.07078 (official code: lgcollins/FedRep).

The head is private; each round a client first trains the head with the body frozen, then the
body with the head frozen, and uploads the body. Never both at once.

**How the local epochs split** (as the official code, ``models/Update.py``): ``train.local_epochs``
is the client's whole local budget ``E`` (the code's ``--local_ep``), of which the body gets
``body_epochs`` (``--local_rep_ep``, default 1) and the head the rest, ``E - body_epochs``: the
official scripts run ``--local_ep 11 --local_rep_ep 1``, 10 head epochs then 1 body epoch, so most
of the local work goes to the head. When ``E`` leaves the head less than one epoch (e.g. rayfed's
default ``E = 1``), the head still gets one epoch (``min_head_epochs``), so a client then trains
``1 + body_epochs`` epochs. ``head_epochs`` set explicitly overrides the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rayfed.algorithms.base import ClientContext
from rayfed.algorithms.fedavg import FedPer, FedPerConfig
from rayfed.config import TrainConfig, require
from rayfed.roles import Role

__all__ = ["FedRep", "FedRepConfig"]


@dataclass
class FedRepConfig(FedPerConfig):
    """FedRep options: how a client's local epochs split between the head (first) and the body."""

    name: str = "fedrep"
    head_epochs: Optional[float] = field(default=None, metadata={
        "help": "epochs training the private head first (body frozen); null = train.local_epochs - body_epochs, "
                "at least min_head_epochs (the official split: 11 local epochs = 10 head + 1 body)"})
    body_epochs: float = field(default=1.0, metadata={
        "help": "epochs training the shared body after the head (head frozen); the official --local_rep_ep"})
    min_head_epochs: float = field(default=1.0, metadata={
        "help": "the head's epochs when train.local_epochs - body_epochs is smaller (head_epochs null)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_epochs is not None:
            require(self.head_epochs > 0, "algorithm.head_epochs", self.head_epochs, "a number > 0 or null")
        require(self.body_epochs > 0, "algorithm.body_epochs", self.body_epochs, "a number > 0")
        require(self.min_head_epochs > 0, "algorithm.min_head_epochs", self.min_head_epochs, "a number > 0")

    def epochs(self, train: TrainConfig) -> tuple[float, float]:
        """``(head epochs, body epochs)`` of one round with this local training config.

        Example:
            >>> from rayfed.config import TrainConfig
            >>> FedRepConfig().epochs(TrainConfig(local_epochs=11)), FedRepConfig().epochs(TrainConfig(local_epochs=1))
            ((10.0, 1.0), (1.0, 1.0))
        """
        head = self.head_epochs if self.head_epochs is not None else \
            max(float(train.local_epochs) - self.body_epochs, self.min_head_epochs)
        return float(head), float(self.body_epochs)


class FedRep(FedPer):
    """Head first (body frozen), then body (head frozen); see the module docstring for the split."""

    supports_multitask = False  # trains on x_train/y_train of a single task
    name = "fedrep"
    config_class = FedRepConfig
    config: FedRepConfig

    def local_update(self, ctx: ClientContext):
        from rayfed.training import train_epochs

        d = ctx.data
        head_epochs, body_epochs = self.config.epochs(ctx.train)
        head = train_epochs(ctx.model, ctx.roles.names(Role.PRIVATE), d.x_train, d.y_train, ctx.train,
                            generator=ctx.generator, device=ctx.device, epochs=head_epochs)
        body = train_epochs(ctx.model, ctx.roles.names(Role.SHARED), d.x_train, d.y_train, ctx.train,
                            generator=ctx.generator, device=ctx.device, epochs=body_epochs)
        return self.upload(ctx), {"train_loss": body["train_loss"], "head_loss": head["train_loss"],
                                  "head_steps": head["steps"], "body_steps": body["steps"],
                                  "steps": head["steps"] + body["steps"]}


ALGORITHMS = (FedRep,)
