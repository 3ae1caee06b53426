"""FedAvg, FedAvg with local fine-tuning, and FedPer.

- FedAvg: McMahan, Moore, Ramage, Hampson, Agüera y Arcas. *Communication-Efficient Learning of
  Deep Networks from Decentralized Data.* AISTATS 2017, arXiv 1602.05629.
- FedAvg-FT: FedAvg, then each client fine-tunes the final global model on its own data
  (a post-training stage; evaluation during training is of the global model).
- FedPer: Arivazhagan, Aggarwal, Singh, Choudhary. *Federated Learning with Personalization
  Layers.* arXiv 1912.00818. The classifier head is private, the body shared; both train together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rayfed.algorithms.base import Algorithm, ClientContext
from rayfed.config import AlgorithmConfig, require

__all__ = ["FedAvg", "FedAvgConfig", "FedAvgFT", "FedAvgFTConfig", "FedPer", "FedPerConfig"]


@dataclass
class FedAvgConfig(AlgorithmConfig):
    """FedAvg options."""

    name: str = "fedavg"
    server_lr: float = field(default=1.0, metadata={"help": "server step on the averaged update (1 = plain FedAvg)"})
    server_momentum: float = field(default=0.0, metadata={"help": "server momentum (FedAvgM); 0 = off"})
    private: list[str] = field(default_factory=list, metadata={
        "help": "selectors of tensors kept private: 'preset:head', 'preset:input', 'type:Linear' or a regex"})

    def __post_init__(self) -> None:
        require(self.server_lr > 0, "algorithm.server_lr", self.server_lr, "a number > 0")
        require(0 <= self.server_momentum < 1, "algorithm.server_momentum", self.server_momentum,
               "a number in [0, 1)")


class FedAvg(Algorithm):
    """One global model: sample-weighted mean of the clients' trained weights."""

    name = "fedavg"
    config_class = FedAvgConfig


@dataclass
class FedAvgFTConfig(FedAvgConfig):
    """FedAvg-FT options."""

    name: str = "fedavg_ft"
    finetune_epochs: float = field(default=1.0, metadata={"help": "local fine-tuning epochs after FL"})
    finetune_lr: Optional[float] = field(default=None, metadata={"help": "fine-tuning lr (default train.lr)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.finetune_epochs > 0, "algorithm.finetune_epochs", self.finetune_epochs, "a number > 0")


class FedAvgFT(FedAvg):
    """FedAvg, then each client fine-tunes the global model locally (post-training stage)."""

    name = "fedavg_ft"
    config_class = FedAvgFTConfig
    has_finalize = True

    def finalize_client(self, ctx: ClientContext) -> dict[str, float]:
        from rayfed.training import train_client

        names = self.trained_names(ctx.roles)  # shared, tiered (clients of several structures), private...
        m = train_client(ctx.model, names, ctx.data, ctx.train, infos=ctx.tasks, generator=ctx.generator,
                         device=ctx.device, epochs=self.config.finetune_epochs, lr=self.config.finetune_lr)
        sd = ctx.model.state_dict()
        # the fine-tuned model becomes the client's personal model (overrides the broadcast)
        ctx.state.private = {k: sd[k].detach().clone() for k in names}
        return {"finetune_loss": m["train_loss"]}


@dataclass
class FedPerConfig(FedAvgConfig):
    """FedPer options: which tensors are private (default: the classifier head)."""

    name: str = "fedper"
    private: list[str] = field(default_factory=lambda: ["preset:head"], metadata={
        "help": "selectors of private tensors (default the classifier head)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.private:
            from rayfed.errors import ConfigError
            raise ConfigError("config key 'algorithm.private': fedper needs at least one private selector, "
                              "got []; e.g. ['preset:head'] (or use algorithm.name=fedavg)")


class FedPer(FedAvg):
    """Private head, shared body, trained together."""

    name = "fedper"
    config_class = FedPerConfig


ALGORITHMS = (FedAvg, FedAvgFT, FedPer)
