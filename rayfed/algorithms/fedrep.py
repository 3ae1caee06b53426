"""FedRep: Collins, Hassani, Mokhtari, Shakkottai. *Exploiting Shared Representations for
Personalized Federated Learning.* ICML 2021, arXiv 2102.07078.

The head is private and trained first with the body frozen (``head_epochs``); then the body is
trained with the head frozen (``train.local_epochs``) and uploaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rayfed.algorithms.base import ClientContext
from rayfed.algorithms.fedavg import FedPer, FedPerConfig
from rayfed.config import require
from rayfed.roles import Role

__all__ = ["FedRep", "FedRepConfig"]


@dataclass
class FedRepConfig(FedPerConfig):
    """FedRep options."""

    name: str = "fedrep"
    head_epochs: float = field(default=1.0, metadata={"help": "epochs training the private head first"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.head_epochs > 0, "algorithm.head_epochs", self.head_epochs, "a number > 0")


class FedRep(FedPer):
    """Head first (body frozen), then body (head frozen)."""

    supports_multitask = False  # trains on x_train/y_train of a single task
    name = "fedrep"
    config_class = FedRepConfig

    def local_update(self, ctx: ClientContext):
        from rayfed.training import train_epochs

        d = ctx.data
        head = train_epochs(ctx.model, ctx.roles.names(Role.PRIVATE), d.x_train, d.y_train, ctx.train,
                            generator=ctx.generator, device=ctx.device, epochs=self.config.head_epochs)
        body = train_epochs(ctx.model, ctx.roles.names(Role.SHARED), d.x_train, d.y_train, ctx.train,
                            generator=ctx.generator, device=ctx.device)
        return self.upload(ctx), {"train_loss": body["train_loss"], "head_loss": head["train_loss"],
                                  "steps": head["steps"] + body["steps"]}


ALGORITHMS = (FedRep,)
