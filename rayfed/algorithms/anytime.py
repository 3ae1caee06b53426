r"""Anytime adapters: early exits on a frozen pre-trained transformer, for clients of different depth.

Liu, Li, Fernandez-Marques, Laskaridis, Gao, Dudziak, S. Z. Li, Hu, Hospedales. *Federated Learning
for Inference at Anytime and Anywhere.* arXiv 2212.04084 (2022). No public code.

The pre-trained backbone (any Hugging Face encoder of the BERT or ViT families: ``model.name:
pretrained`` with a local folder, e.g. all-MiniLM-L6-v2; or a randomly initialised ``bert``/``vit``)
stays frozen and never crosses the wire. After each block ``l`` an exit adapter
(:class:`rayfed.models.exits.ExitAdapter`) reads the [CLS] states of blocks ``1..l`` and a
learnable client token through a small attention module, predicts through its own head (exit
``l``) and writes a modulated [CLS] back before block ``l + 1``. Only the adapters (with their
heads) and the token are trained; the backbone runs once per batch, block by block
(:class:`rayfed.models.exits.AnytimeTransformer`).

Roles: the exit adapters and heads are ``tiered`` (a client holds, trains, downloads and uploads
only the exits of its depth; the server averages each over the clients that hold it, weighted by
samples), the client token is ``private``, the backbone ``frozen``. ``personal`` moves the heads
or the adapters into the private part too.

Depth tiers: ``tiers`` (or ``data.tiers``) gives the fraction of clients per budget of blocks,
e.g. ``{2: 0.34, 4: 0.33, 6: 0.33}``, assigned with the run's seed
(:func:`rayfed.clients.assign_tiers`). A client of tier ``k`` runs blocks and exits ``1..k`` only,
so its bytes and FLOPs (``flops`` in its train metrics, counted by torch's flop counter) follow
its depth. Every client is evaluated at every exit it has (the ``exit`` column of the metrics; the
headline is its deepest exit).

What the paper leaves open, and the choices made here (each an option):

- the adapter: one pre-norm block (``adapter_depth``) in which this block's [CLS] (projected to
  ``adapter_width``) attends over the projected [CLS] states of blocks ``1..l`` and the client
  token, with learned position embeddings, then an MLP (``adapter_mlp_ratio``); ``adapter_heads``
  heads. The write-back projection starts at zero, so training starts from the pre-trained
  forward pass. The client token is one ``hidden_size`` vector shared by the client's exits.
- the loss: the sum of cross-entropies over the exits the client runs (``exit_loss: sum``),
  optionally weighted per exit (``exit_weights``); ``exit_loss: last`` trains only the client's
  deepest exit (the depth-heterogeneous *inclusive* baseline: every client trains its depth,
  last exit only).
- participation: ``all`` (every sampled client trains its depth) or ``exclusive`` (the baseline
  where only clients of the deepest tier take part: sampled shallower clients train and upload
  nothing; they are still evaluated with the exits the deep clients trained).
- personalization: ``personal`` lists what stays private (``client_token``, ``heads``,
  ``adapters``); ``finetune_epochs > 0`` adds a short local fine-tuning of the private part after
  the last round (the finalize stage; its accuracies are the ``final`` rows).
- the backbone runs in eval mode (no dropout) unless ``backbone_dropout``.

Example:
    >>> from rayfed.config import load_config
    >>> cfg = load_config(None, ["algorithm.name=anytime", "algorithm.tiers={2: 0.5, 4: 0.5}"])
    >>> cfg.algorithm.personal, cfg.algorithm.exit_loss
    (['client_token'], 'sum')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from rayfed.algorithms.base import Algorithm, ClientContext
from rayfed.clients import ClientSpec, Structure, assign_tiers
from rayfed.config import AlgorithmConfig, PeftConfig, require
from rayfed.data.info import DatasetInfo
from rayfed.errors import ConfigError
from rayfed.models.exits import AnytimeTransformer, anytime_model, encoder_of, training_flops
from rayfed.models.prepare import num_blocks
from rayfed.roles import Role, RoleMap

__all__ = ["Anytime", "AnytimeConfig", "exit_weights"]

#: role selectors of the parts ``personal`` can keep private
PERSONAL_SELECTORS = {
    "client_token": r"^client_token$",
    "heads": r"^exits\.\d+\.head\.",
    "adapters": r"^exits\.\d+\.(?!head\.)",
}


@dataclass
class AnytimeConfig(AlgorithmConfig):
    """Anytime adapters options (local training uses the ``train`` section)."""

    name: str = "anytime"
    tiers: dict[int, float] = field(default_factory=dict, metadata={
        "help": "fraction of clients per depth budget (blocks run), e.g. {2: 0.34, 4: 0.33, 6: 0.33}, assigned with "
                "the run's seed; {} = data.tiers (or every client at full depth)"})
    adapter_width: int = field(default=64, metadata={"help": "width of each exit adapter's attention module"})
    adapter_heads: int = field(default=4, metadata={"help": "attention heads of each exit adapter"})
    adapter_depth: int = field(default=1, metadata={"help": "attention+MLP blocks of each exit adapter"})
    adapter_mlp_ratio: float = field(default=2.0, metadata={"help": "adapter MLP size as a multiple of its width"})
    token_std: float = field(default=0.02, metadata={"help": "standard deviation of the client token's initial value"})
    personal: list[Literal["client_token", "heads", "adapters"]] = field(
        default_factory=lambda: ["client_token"], metadata={
            "help": "what stays private to each client: client_token, heads (the exits' classifiers), adapters "
                    "(the rest of the exits); the rest is averaged over the clients that hold it"})
    exit_loss: Literal["sum", "last"] = field(default="sum", metadata={
        "help": "sum: cross-entropy summed over every exit the client runs (weighted by exit_weights); last: only "
                "the client's deepest exit (the 'inclusive' baseline)"})
    exit_weights: list[float] = field(default_factory=list, metadata={
        "help": "weight of exit l's cross-entropy at position l-1, one per block of the deepest model; [] = 1 each"})
    participation: Literal["all", "exclusive"] = field(default="all", metadata={
        "help": "all: every sampled client trains its depth; exclusive: only clients of the deepest of "
                "algorithm.tiers train (the 'exclusive' baseline; shallower ones are still evaluated)"})
    finetune_epochs: float = field(default=0.0, metadata={
        "help": "epochs of local fine-tuning of the private part after the last round; 0 = none"})
    finetune_lr: Optional[float] = field(default=None, metadata={"help": "fine-tuning lr (default train.lr)"})
    backbone_dropout: bool = field(default=False, metadata={
        "help": "keep the frozen backbone's dropout on in training (default: the backbone always runs in eval mode)"})

    def __post_init__(self) -> None:
        for depth, frac in self.tiers.items():
            require(depth >= 1, "algorithm.tiers", self.tiers, "depths (keys) >= 1, e.g. {2: 0.5, 6: 0.5}")
            require(0 < frac <= 1, f"algorithm.tiers.{depth}", frac, "a fraction in (0, 1]")
        if self.tiers:
            total = sum(self.tiers.values())
            require(abs(total - 1.0) < 1e-6, "algorithm.tiers", self.tiers, f"fractions that sum to 1 (they sum to "
                                                                             f"{total:g})")
        for k in ("adapter_width", "adapter_heads", "adapter_depth"):
            require(getattr(self, k) >= 1, f"algorithm.{k}", getattr(self, k), "an integer >= 1")
        require(self.adapter_width % self.adapter_heads == 0, "algorithm.adapter_width", self.adapter_width,
                f"a multiple of algorithm.adapter_heads={self.adapter_heads}")
        require(self.adapter_mlp_ratio > 0, "algorithm.adapter_mlp_ratio", self.adapter_mlp_ratio, "a number > 0")
        require(self.token_std >= 0, "algorithm.token_std", self.token_std, "a number >= 0")
        require(len(set(self.personal)) == len(self.personal), "algorithm.personal", self.personal,
                "a list without repeats")
        require(all(w >= 0 for w in self.exit_weights) and (not self.exit_weights or any(self.exit_weights)),
                "algorithm.exit_weights", self.exit_weights, "weights >= 0, not all zero (or [] for 1 each)")
        if self.participation == "exclusive" and not self.tiers:
            raise ConfigError("config key 'algorithm.participation': 'exclusive' lets only the deepest tier train, so "
                              "it needs algorithm.tiers (e.g. {2: 0.34, 4: 0.33, 6: 0.33}), got {}; set "
                              "algorithm.tiers or use participation=all")
        require(self.finetune_epochs >= 0, "algorithm.finetune_epochs", self.finetune_epochs, "a number >= 0")
        if self.finetune_lr is not None:
            require(self.finetune_lr > 0, "algorithm.finetune_lr", self.finetune_lr, "a learning rate > 0 or null")

    @property
    def deepest_tier(self) -> Optional[int]:
        """The deepest budget of ``tiers`` (None when it is empty)."""
        return max(self.tiers) if self.tiers else None


def exit_weights(cfg: AnytimeConfig, depth: int) -> list[float]:
    """The loss weight of each exit ``1..depth`` of a client of that depth.

    Example:
        >>> exit_weights(AnytimeConfig(exit_loss="last", exit_weights=[1.0, 2.0, 3.0]), 2)
        [0.0, 2.0]
    """
    w = [float(v) for v in cfg.exit_weights[:depth]] if cfg.exit_weights else [1.0] * depth
    if cfg.exit_loss == "last":
        w = [0.0] * (depth - 1) + [w[-1] if w[-1] > 0 else 1.0]
    return w


class Anytime(Algorithm):
    """Frozen backbone, an exit adapter after every block, depth tiers aggregated over holders."""

    name = "anytime"
    config_class = AnytimeConfig
    supports_multitask = False  # one label set: every exit has one classifier head

    def __init__(self, config: Optional[AnytimeConfig] = None) -> None:
        super().__init__(config)
        # the post-training stage runs only when asked for (an instance value over the class default)
        self.has_finalize = self.config.finetune_epochs > 0

    # -- clients and their models ---------------------------------------------------------------
    def client_specs(self, specs: dict[int, ClientSpec], seed: int) -> dict[int, ClientSpec]:
        """Each client's depth tier from ``algorithm.tiers`` (seeded), else as given (``data.tiers``)."""
        if not self.config.tiers:
            return specs
        out = assign_tiers([specs[c] for c in sorted(specs)], self.config.tiers, seed)
        return {s.client_id: s for s in out}

    def prepare_model(self, model: torch.nn.Module, structure: Structure, peft: Optional[PeftConfig],
                      info: DatasetInfo) -> torch.nn.Module:
        """The frozen encoder of ``model`` cut to ``structure.tier`` blocks, with exit adapters ``1..tier``
        and a client token (:func:`rayfed.models.exits.anytime_model`).
        """
        cfg = self.config
        if peft is not None and peft.enabled:
            raise ConfigError(f"config key 'model.peft.type': anytime trains its own exit adapters on a frozen "
                              f"backbone, got model.peft.type={peft.type!r}; set model.peft.type=none (or compare "
                              "against PEFT with fedavg/fedper)")
        if info.task != "classification":
            raise ConfigError(f"config key 'algorithm.name': anytime exits are classifiers, but the data's task is "
                              f"{info.task!r}; use classification data")
        full = num_blocks(encoder_of(model))
        depth = structure.tier
        if depth is not None and not 1 <= depth <= full:
            key = "algorithm.tiers" if cfg.tiers else "data.tiers"
            raise ConfigError(f"config key '{key}': depth {depth} is not in 1..{full}, the backbone's {full} blocks; "
                              "use depths the model has")
        if cfg.exit_weights and len(cfg.exit_weights) < (depth or full):
            raise ConfigError(f"config key 'algorithm.exit_weights': got {len(cfg.exit_weights)} weights "
                              f"{cfg.exit_weights}, but clients run up to {depth or full} exits; give one weight per "
                              "exit of the deepest model")
        if not any(exit_weights(cfg, depth or full)):
            raise ConfigError(f"config key 'algorithm.exit_weights': clients of depth {depth or full} run exits "
                              f"1..{depth or full}, whose weights {cfg.exit_weights[:depth or full]} are all zero, so "
                              "they would train nothing; give at least one of those exits a weight > 0")
        return anytime_model(model, depth=depth, num_classes=info.num_classes, width=cfg.adapter_width,
                             heads=cfg.adapter_heads, adapter_depth=cfg.adapter_depth,
                             mlp_ratio=cfg.adapter_mlp_ratio, token_std=cfg.token_std,
                             backbone_dropout=cfg.backbone_dropout)

    # -- roles ---------------------------------------------------------------------------------
    def role_rules(self) -> list[tuple[str, Role]]:
        """Exits ``tiered``, the client token ``shared`` unless personal; then ``personal`` parts and
        ``algorithm.private`` selectors ``private``, ``algorithm.frozen`` ones ``frozen``. The
        backbone is frozen by :func:`~rayfed.models.exits.anytime_model` (``requires_grad=False``).
        """
        rules: list[tuple[str, Role]] = [(r"^exits\.", Role.TIERED), (PERSONAL_SELECTORS["client_token"], Role.SHARED)]
        rules += [(PERSONAL_SELECTORS[p], Role.PRIVATE) for p in self.config.personal]
        return rules + super().role_rules()

    # -- client --------------------------------------------------------------------------------
    def takes_part(self, model: AnytimeTransformer) -> bool:
        """Whether a client with this model trains (``participation: exclusive``: deepest tier only)."""
        deepest = self.config.deepest_tier
        return self.config.participation == "all" or deepest is None or model.depth >= deepest

    def upload_keys(self, model: torch.nn.Module, roles: RoleMap) -> list[str]:
        """The client's exits (server-held tensors); none for a client that does not take part."""
        if isinstance(model, AnytimeTransformer) and not self.takes_part(model):
            return []
        return super().upload_keys(model, roles)

    def local_update(self, ctx: ClientContext) -> tuple[Mapping[str, np.ndarray], dict]:
        """Train the client's exits (and private part) on the exit loss; upload its exits."""
        if not self.takes_part(ctx.model):
            return {}, {"train_loss": float("nan"), "steps": 0, "flops": 0.0}
        metrics = self.train_exits(ctx, self.trained_names(ctx.roles))
        return self.upload(ctx), metrics

    def train_exits(self, ctx: ClientContext, names: list[str], *, epochs: Optional[float] = None,
                    lr: Optional[float] = None) -> dict:
        """Train ``names`` on the client's training split with the exit loss.

        Returns the mean loss and steps, ``flops`` (forward and backward FLOPs of the steps taken:
        they follow the client's depth) and each exit's mean cross-entropy under ``exits``.
        """
        from rayfed.models.views import set_mode
        from rayfed.training import Stepper, batches, local_steps, only_trainable, to_tensors

        model, cfg = ctx.model, ctx.train
        task = ctx.data.only_task()
        xt, yt = to_tensors(task.x_train, task.y_train, ctx.device)
        epochs = cfg.local_epochs if epochs is None else epochs
        total = local_steps(len(yt), cfg.batch_size, epochs, cfg.max_steps)
        nan = {"train_loss": float("nan"), "steps": 0, "flops": 0.0}
        if total <= 0 or len(yt) == 0:
            return nan
        weights = exit_weights(self.config, model.depth)
        set_mode(model, True)
        sums, loss_sum, steps, seen = np.zeros(model.depth), 0.0, 0, 0
        with only_trainable(model, names) as params:
            if not params:
                return nan
            per_sample = training_flops(model, xt[:1], lambda m, xb: _exit_loss(m, xb, yt[:1], weights)[0])
            # precision, gradient accumulation and the lr schedule of the train section apply here too
            step = Stepper(params, cfg, lr=lr, batches=total, device=ctx.device)
            while steps < total:
                for xb, yb in batches(xt, yt, cfg.batch_size, generator=ctx.generator):
                    with step.forward():
                        loss, per_exit = _exit_loss(model, xb, yb, weights)
                    loss_sum += step.backward(loss)
                    sums += per_exit
                    steps += 1
                    seen += len(yb)
                    if steps >= total:
                        break
            step.finish()
        return {"train_loss": loss_sum / steps, "steps": steps, "flops": float(per_sample * seen),
                "exits": {e + 1: {"train_loss": float(s / steps)} for e, s in enumerate(sums)}}

    @torch.no_grad()
    def evaluate_client(self, ctx: ClientContext) -> dict:
        """Accuracy, loss, correct and num_test at every exit the client has (under ``exits``); the
        headline is its deepest exit. The backbone runs once per batch for all exits.
        """
        from rayfed.models.views import set_mode
        from rayfed.training import batches, to_tensors

        model = ctx.model
        task = ctx.data.only_task()
        xt, yt = to_tensors(task.x_test, task.y_test, ctx.device)
        set_mode(model, False)
        correct, loss = np.zeros(model.depth, dtype=np.int64), np.zeros(model.depth)
        for xb, yb in batches(xt, yt, 256):
            for e, out in enumerate(model.forward_exits(xb)):
                loss[e] += float(F.cross_entropy(out, yb, reduction="sum"))
                correct[e] += int((out.argmax(-1) == yb).sum())
        set_mode(model, True)
        n = len(yt)
        exits = {e + 1: {"accuracy": int(correct[e]) / max(n, 1), "loss": float(loss[e]) / max(n, 1),
                         "correct": int(correct[e]), "num_test": n} for e in range(model.depth)}
        return {**exits[model.depth], "exits": exits}

    def finalize_client(self, ctx: ClientContext) -> dict[str, float]:
        """Fine-tune the private part locally (``finetune_epochs``) and keep it as the client's own."""
        names = ctx.roles.names(Role.PRIVATE)
        if not names or not self.takes_part(ctx.model):
            return {}
        m = self.train_exits(ctx, names, epochs=self.config.finetune_epochs, lr=self.config.finetune_lr)
        self.save_client_state(ctx)
        return {"finetune_loss": m["train_loss"]}


def _exit_loss(model: AnytimeTransformer, x: torch.Tensor, y: torch.Tensor,
               weights: list[float]) -> tuple[torch.Tensor, np.ndarray]:
    """The weighted sum of the exits' cross-entropies, and each exit's value (for the metrics)."""
    losses = [F.cross_entropy(out, y) for out in model.forward_exits(x)]
    total = sum(w * loss for w, loss in zip(weights, losses) if w)
    return total, np.array([float(v.detach()) for v in losses])


ALGORITHMS = (Anytime,)
