"""TAP: two-stage adaptive personalization of multi-task, multi-modal models.

Lee, Fang, Han, Hosseinalipour, Brinton. *TAP: Two-Stage Adaptive Personalization of Multi-task and
Multi-Modal Foundation Models in Federated Learning.* arXiv 2509.26524 (2025). Official code:
github.com/lee3296/TAP.

Clients differ in modalities and tasks; each client's model holds only the parts of its own
(modality, task) pairs (:class:`~rayfed.clients.Structure`, e.g. the
:mod:`rayfed.models.experts` family), the server's model is their union, and every tensor is
averaged over the clients that hold it, weighted by their training samples (tensors only some
structures hold are ``tiered``). Only trainable tensors cross the wire (frozen towers never do).

**Stage 1 (every round).** A sampled client trains the *regular* model it received, exactly as
FedAvg does, and uploads it. It also keeps a *personal* model that never leaves its actor (in
``ClientState.extra["personal"]``, see :class:`PersonalModel`). For every task ``t`` it holds, if
the regular model's training loss beats the personal model's by the task's margin
(``regular + margin_t < personal``), the components ``t`` uses (:func:`rayfed.models.experts.task_modules`:
the towers of its modalities, its fusion experts, its head) are replaced in the personal model by
the regular model's; then the personal model trains on the client's data. Replacements are
counted per task (``replaced`` in the train metrics, one row per client and task).

**Stage 2 (after the last round, :meth:`TAP.finalize_client`).** The final global model,
fine-tuned briefly on the client's data, is the teacher; the personal model trains with each task's
loss plus ``w_kd * T^2 * KL(teacher || student)`` (:func:`distillation_loss`). Evaluation reports
the personal model (the global one for a client that has not trained yet).

Open details, and the choice made for each (all configurable unless noted):

- *Which losses are compared*: each model's mean training loss during its own latest local
  training, as in the official code: the regular model's of this round, the personal model's of its
  previous round. A task the personal model has no loss for yet (first participation) counts as
  infinitely bad, so the first round replaces every task's components (not configurable).
- *Margins*: ``margin`` (0.01) for every task, ``margins`` per task; the paper uses 0.005 for image
  generation and text classification.
- *Components shared by several tasks* (e.g. the image tower of a client doing digit
  classification and image generation) are replaced whenever one of those tasks triggers, as in
  the official code.
- *The personal model starts* as a copy of the first model the client receives (the official code
  starts it from the same seeded initialisation as the global model).
- *Personal training*: the ``train`` section's epochs and steps, at ``personal_lr`` (default
  ``train.lr``).
- *Stage 2*: the teacher trains ``finetune_epochs`` at ``finetune_lr``; its outputs on the client's
  training samples are computed once (eval mode) before the student trains ``distill_epochs`` at
  ``distill_lr``. Class targets distil with ``T^2 KL(softmax(t/T) || softmax(s/T))`` per sample;
  image targets (generation) with the MSE between the two images (``kd_image: mse``), or with the
  official code's KL over the softmax of the images' last axis (``kd_image: kl``).
- *Distillation weight*: ``w_kd`` (2e-3, the official training script's) and ``w_kd_tasks`` per
  task (the official code multiplies it by 500 for text classification).
- *Ablations*: ``replacement: false`` (the personal model only trains locally) and
  ``distillation: false`` (stage 2 trains the personal model with the task loss alone, for the same
  epochs, as the official ablation does).

**A bug of the official code that is not reproduced.** Its server builds each client's model from a
state dict whose fusion keys lack the ``fusion.`` prefix and loads it with ``strict=False``, so the
aggregated fusion (and fusion LoRA) weights silently never reach the clients. Here the broadcast is
written into every client model by exact state-dict key (and ``check_structures`` rejects keys the
server's model lacks); ``tests/test_tap.py`` checks that the aggregated fusion and LoRA tensors are
what each client starts the next round from.

Example:
    >>> from rayfed.config import load_config
    >>> cfg = load_config(None, ["algorithm.name=tap", "algorithm.margins={topic: 0.005}"])
    >>> cfg.algorithm.margin_of("topic"), cfg.algorithm.margin_of("digit")
    (0.005, 0.01)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
import torch.nn.functional as F

from rayfed.algorithms.base import Algorithm, ClientContext, ClientState
from rayfed.config import AlgorithmConfig, TrainConfig, require
from rayfed.data.info import ClientData, TaskInfo
from rayfed.errors import ConfigError
from rayfed.models.views import tensors

if TYPE_CHECKING:
    from rayfed.clients import ClientSpec

__all__ = ["TAP", "PersonalModel", "TAPConfig", "distill_client", "distillation_loss", "replace_components",
           "tasks_to_replace", "teacher_outputs"]


@dataclass
class TAPConfig(AlgorithmConfig):
    """TAP options (local training of both models uses the ``train`` section)."""

    name: str = "tap"
    margin: float = field(default=0.01, metadata={
        "help": "replace a task's components in the personal model when the regular model's training loss is "
                "lower by more than this"})
    margins: dict[str, float] = field(default_factory=dict, metadata={
        "help": "per-task margins overriding margin, e.g. {topic: 0.005, imgen: 0.005} (the paper's smaller margin "
                "for text classification and image generation)"})
    replacement: bool = field(default=True, metadata={
        "help": "stage 1 replacement; false = the ablation whose personal model only trains locally"})
    distillation: bool = field(default=True, metadata={
        "help": "stage 2 distillation; false = the ablation that fine-tunes the personal model with the task loss "
                "only"})
    w_kd: float = field(default=2e-3, metadata={"help": "weight of the distillation term (the official script's)"})
    w_kd_tasks: dict[str, float] = field(default_factory=dict, metadata={
        "help": "per-task distillation weights overriding w_kd (the official code uses 500 x w_kd for text "
                "classification)"})
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature T"})
    kd_image: Literal["mse", "kl"] = field(default="mse", metadata={
        "help": "distillation of image targets: mse between the images, or kl over the softmax of their last axis "
                "(the official code)"})
    personal_lr: Optional[float] = field(default=None, metadata={
        "help": "learning rate of the personal model's local training (default train.lr)"})
    finetune_epochs: float = field(default=1.0, metadata={"help": "stage 2: epochs fine-tuning the teacher"})
    finetune_lr: Optional[float] = field(default=None, metadata={"help": "stage 2: teacher lr (default train.lr)"})
    distill_epochs: float = field(default=1.0, metadata={"help": "stage 2: epochs training the personal model"})
    distill_lr: Optional[float] = field(default=None, metadata={
        "help": "stage 2: personal model lr (default train.lr)"})

    def __post_init__(self) -> None:
        require(self.margin >= 0, "algorithm.margin", self.margin, "a number >= 0 (the paper: 0.01)")
        for t, m in self.margins.items():
            require(m >= 0, f"algorithm.margins.{t}", m, "a number >= 0")
        require(self.w_kd >= 0, "algorithm.w_kd", self.w_kd, "a number >= 0")
        for t, w in self.w_kd_tasks.items():
            require(w >= 0, f"algorithm.w_kd_tasks.{t}", w, "a number >= 0")
        require(self.temperature > 0, "algorithm.temperature", self.temperature, "a number > 0 (the paper: 1)")
        for k in ("finetune_epochs", "distill_epochs"):
            require(getattr(self, k) > 0, f"algorithm.{k}", getattr(self, k), "a number of epochs > 0")
        for k in ("personal_lr", "finetune_lr", "distill_lr"):
            v = getattr(self, k)
            if v is not None:
                require(v > 0, f"algorithm.{k}", v, "a learning rate > 0 or null")

    def margin_of(self, task: str) -> float:
        """The replacement margin of ``task``."""
        return float(self.margins.get(task, self.margin))

    def w_kd_of(self, task: str) -> float:
        """The distillation weight of ``task`` (0 when distillation is off)."""
        return float(self.w_kd_tasks.get(task, self.w_kd)) if self.distillation else 0.0


@dataclass
class PersonalModel:
    """A client's personal model: it lives in its :class:`~rayfed.algorithms.ClientState` and never leaves it.

    Stored in ``state.extra["personal"]`` as a plain tree (tensors, numbers, dicts), which the
    client state store persists safely and a resumed run reads back.

    Attributes:
        tensors: the personal model's trained tensors (state-dict key -> tensor).
        train_loss: each task's mean training loss in the personal model's latest local training.
        replaced: replacements so far per task.
    """

    tensors: dict[str, torch.Tensor]
    train_loss: dict[str, float] = field(default_factory=dict)
    replaced: dict[str, int] = field(default_factory=dict)

    KEY = "personal"

    @classmethod
    def of(cls, state: ClientState) -> Optional[PersonalModel]:
        """The personal model in ``state`` (None before the client's first local training)."""
        tree = state.extra.get(cls.KEY)
        if tree is None:
            return None
        return cls(dict(tree["tensors"]), {k: float(v) for k, v in tree["train_loss"].items()},
                   {k: int(v) for k, v in tree["replaced"].items()})

    def store(self, state: ClientState) -> None:
        """Write this personal model into ``state``."""
        state.extra[self.KEY] = {"tensors": dict(self.tensors), "train_loss": dict(self.train_loss),
                                 "replaced": dict(self.replaced)}

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the personal tensors into ``model`` (in place)."""
        sd = tensors(model)
        with torch.no_grad():
            for k, v in self.tensors.items():
                sd[k].copy_(v)


def tasks_to_replace(regular_loss: Mapping[str, float], personal_loss: Mapping[str, float],
                     margins: Mapping[str, float]) -> list[str]:
    """The tasks whose components the personal model takes from the regular one: ``regular + margin <
    personal`` (a task without a personal loss yet counts as infinitely bad; one without a finite
    regular loss, e.g. no training step, is never replaced).

    Example:
        >>> margins = {"a": 0.01, "b": 0.01, "c": 0.01}
        >>> tasks_to_replace({"a": 0.50, "b": 0.50, "c": 0.50}, {"a": 0.52, "b": 0.505}, margins)
        ['a', 'c']
    """
    return [t for t, r in regular_loss.items()
            if math.isfinite(r) and r + margins[t] < personal_loss.get(t, math.inf)]


def replace_components(personal: dict[str, torch.Tensor], regular: Mapping[str, torch.Tensor],
                       keys: Iterable[str]) -> list[str]:
    """Copy ``regular[k]`` into ``personal[k]`` for every key (new tensors; ``regular`` is not aliased)."""
    keys = list(keys)
    for k in keys:
        personal[k] = regular[k].detach().clone()
    return keys


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0,
                      kind: str = "class", image_loss: str = "mse") -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` over the last axis, summed over any
    other axes and averaged over the batch (``batchmean`` for ``(N, K)`` logits, as the official code).

    For ``kind`` image or regression with ``image_loss="mse"``: the mean squared error between the
    student's and the teacher's outputs instead.
    """
    if kind in ("image", "regression") and image_loss == "mse":
        return F.mse_loss(student, teacher)
    t = float(temperature)
    log_p = F.log_softmax(student / t, dim=-1)
    q = F.softmax(teacher / t, dim=-1)
    return F.kl_div(log_p, q, reduction="sum") / student.shape[0] * (t * t)


@torch.no_grad()
def teacher_outputs(model: torch.nn.Module, data: ClientData, infos: Mapping[str, TaskInfo], device: torch.device,
                    batch_size: int = 256) -> dict[str, torch.Tensor]:
    """``model``'s outputs (eval mode) on every training sample of every task of ``data``, by task."""
    from rayfed.models.views import set_mode
    from rayfed.training import batches, forward_task, to_tensors

    set_mode(model, False)
    out = {}
    for name, t in data.tasks.items():
        xt, yt = to_tensors(t.x_train, t.y_train, device)
        outs = [forward_task(model, infos[name], xb) for xb, _ in batches(xt, yt, batch_size)]
        out[name] = torch.cat(outs) if outs else torch.empty(0)
    set_mode(model, True)
    return out


def distill_client(model: torch.nn.Module, names: Iterable[str], data: ClientData,
                   teacher: Optional[Mapping[str, torch.Tensor]], infos: Mapping[str, TaskInfo], cfg: TrainConfig, *,
                   weights: Mapping[str, float], temperature: float, image_loss: str, generator: torch.Generator,
                   device: torch.device, epochs: float, lr: Optional[float] = None) -> dict[str, Any]:
    """Train ``names`` with each task's loss plus ``weights[task]`` times :func:`distillation_loss`
    to ``teacher[task]`` (outputs per training sample, :func:`teacher_outputs`; None or weight 0: the
    task loss alone). Tasks take turns batch by batch, each for ``epochs`` over its training split
    (capped at ``cfg.max_steps`` steps in all). Returns the mean loss, the mean distillation term,
    the steps, and per task under ``tasks``.
    """
    from rayfed.models.views import set_mode
    from rayfed.training import Stepper, forward_task, local_steps, only_trainable, task_loss, to_tensors

    streams, planned = {}, 0
    for name, t in data.tasks.items():
        xt, yt = to_tensors(t.x_train, t.y_train, device)
        total = local_steps(len(yt), cfg.batch_size, epochs)
        if total > 0 and len(yt):
            streams[name] = _index_stream(len(yt), cfg.batch_size, total, generator, xt, yt)
            planned += total
    set_mode(model, True)
    sums = {n: [0.0, 0.0, 0] for n in data.tasks}
    steps = 0
    with only_trainable(model, names) as params:
        if not params or not streams:
            return {"train_loss": float("nan"), "distill_loss": float("nan"), "steps": 0}
        step = Stepper(params, cfg, lr=lr, device=device,
                       batches=planned if cfg.max_steps is None else min(planned, cfg.max_steps))
        while streams and (cfg.max_steps is None or steps < cfg.max_steps):
            for name in list(streams):
                batch = next(streams[name], None)
                if batch is None:
                    del streams[name]
                    continue
                idx, xb, yb = batch
                kind = infos[name].target
                w = float(weights.get(name, 0.0))
                with step.forward():
                    out = forward_task(model, infos[name], xb)
                    loss = task_loss(out, yb, kind=kind)
                    kd = torch.zeros((), device=out.device)
                    if teacher is not None and w > 0:
                        kd = distillation_loss(out, teacher[name][idx].to(out.device), temperature=temperature,
                                               kind=kind, image_loss=image_loss)
                step.backward(loss + w * kd)
                s = sums[name]
                s[0] += float(loss.detach())
                s[1] += float(kd.detach())
                s[2] += 1
                steps += 1
                if cfg.max_steps is not None and steps >= cfg.max_steps:
                    break
        step.finish()
    done = {n: s for n, s in sums.items() if s[2]}
    return {"train_loss": sum(s[0] for s in done.values()) / max(steps, 1),
            "distill_loss": sum(s[1] for s in done.values()) / max(steps, 1), "steps": steps,
            "tasks": {n: {"train_loss": s[0] / s[2], "distill_loss": s[1] / s[2]} for n, s in done.items()}}


def _index_stream(n: int, batch_size: int, total: int, generator: torch.Generator, x: Any, y: torch.Tensor):
    """``total`` shuffled mini-batches ``(indices, x, y)`` over ``n`` samples (epoch after epoch)."""
    from rayfed.training import batches

    done = 0
    idx = torch.arange(n)
    while done < total:
        for ib, _ in batches(idx, idx, batch_size, generator=generator):
            xb = {k: v[ib] for k, v in x.items()} if isinstance(x, Mapping) else x[ib]
            yield ib, xb, y[ib]
            done += 1
            if done >= total:
                return


def _task_losses(metrics: Mapping[str, Any], data: ClientData) -> dict[str, float]:
    """Each task's mean training loss from :func:`rayfed.training.train_client` metrics."""
    if "tasks" in metrics:
        return {t: float(m["train_loss"]) for t, m in metrics["tasks"].items()}
    return {data.task_names[0]: float(metrics.get("train_loss", float("nan")))}


class TAP(Algorithm):
    """Two-stage adaptive personalization (see the module docstring)."""

    name = "tap"
    config_class = TAPConfig
    has_finalize = True

    def client_specs(self, specs: dict[int, ClientSpec], seed: int) -> dict[int, ClientSpec]:
        """Check that the per-task options name tasks some client holds."""
        tasks = {t for s in specs.values() for t in s.tasks}
        for key in ("margins", "w_kd_tasks"):
            unknown = sorted(set(getattr(self.config, key)) - tasks)
            if unknown:
                raise ConfigError(f"config key 'algorithm.{key}': tasks {unknown} are not tasks of the data; the "
                                  f"clients' tasks are {sorted(tasks)}")
        return specs

    def local_update(self, ctx: ClientContext) -> tuple[Any, dict[str, Any]]:
        """Train the regular model (uploaded) and then the personal one (kept), replacing components first."""
        from rayfed.models.experts import task_tensor_names
        from rayfed.training import train_client

        c = self.config
        trained = self.trained_names(ctx.roles)
        sd = tensors(ctx.model)
        personal = PersonalModel.of(ctx.state)
        if personal is None:  # first participation: the personal model starts as the received model
            personal = PersonalModel({k: sd[k].detach().clone() for k in trained})
        regular = train_client(ctx.model, trained, ctx.data, ctx.train, infos=ctx.tasks, generator=ctx.generator,
                               device=ctx.device)
        upload = self.upload(ctx)
        super().save_client_state(ctx)  # the regular model's private tensors, if algorithm.private names any
        regular_loss = _task_losses(regular, ctx.data)
        replaced = []
        if c.replacement:
            margins = {t: c.margin_of(t) for t in regular_loss}
            for t in tasks_to_replace(regular_loss, personal.train_loss, margins):
                replace_components(personal.tensors, sd, task_tensor_names(ctx.model, t, trained))
                replaced.append(t)
        personal.load_into(ctx.model)
        own = train_client(ctx.model, trained, ctx.data, ctx.train, infos=ctx.tasks, generator=ctx.generator,
                           device=ctx.device, lr=c.personal_lr)
        own_loss = _task_losses(own, ctx.data)
        personal.tensors = {k: sd[k].detach().clone() for k in trained}
        personal.train_loss.update({t: v for t, v in own_loss.items() if math.isfinite(v)})
        for t in replaced:
            personal.replaced[t] = personal.replaced.get(t, 0) + 1
        personal.store(ctx.state)
        per_task = {t: {"train_loss": regular_loss[t], "personal_train_loss": own_loss.get(t),
                        "replaced": float(t in replaced)} for t in regular_loss}
        metrics = {"train_loss": regular["train_loss"], "steps": regular["steps"],
                   "personal_train_loss": own["train_loss"], "replacements": float(len(replaced)),
                   "tasks": {t: {k: v for k, v in m.items() if v is not None} for t, m in per_task.items()}}
        return upload, metrics

    def save_client_state(self, ctx: ClientContext) -> None:
        """Nothing: :meth:`local_update` keeps the regular model's private tensors before the personal
        model is loaded into the model object, and stores the personal model itself.
        """

    def evaluate_client(self, ctx: ClientContext) -> dict[str, Any]:
        """Test the personal model (the received global one for a client that has not trained yet)."""
        personal = PersonalModel.of(ctx.state)
        if personal is not None:
            personal.load_into(ctx.model)
        return super().evaluate_client(ctx)

    def finalize_client(self, ctx: ClientContext) -> dict[str, Any]:
        """Stage 2: distil the final global model, fine-tuned briefly, into the personal model."""
        from rayfed.training import train_client

        c = self.config
        trained = self.trained_names(ctx.roles)
        sd = tensors(ctx.model)
        personal = PersonalModel.of(ctx.state)
        if personal is None:  # never trained: the student starts from the global model
            personal = PersonalModel({k: sd[k].detach().clone() for k in trained})
        out: dict[str, Any] = {}
        teacher = None
        if c.distillation:
            ft = train_client(ctx.model, trained, ctx.data, ctx.train, infos=ctx.tasks, generator=ctx.generator,
                              device=ctx.device, epochs=c.finetune_epochs, lr=c.finetune_lr)
            out["teacher_train_loss"] = ft["train_loss"]
            teacher = teacher_outputs(ctx.model, ctx.data, ctx.tasks, ctx.device)
        personal.load_into(ctx.model)
        weights = {t: c.w_kd_of(t) for t in ctx.data.task_names}
        m = distill_client(ctx.model, trained, ctx.data, teacher, ctx.tasks, ctx.train, weights=weights,
                           temperature=c.temperature, image_loss=c.kd_image, generator=ctx.generator,
                           device=ctx.device, epochs=c.distill_epochs, lr=c.distill_lr)
        personal.tensors = {k: sd[k].detach().clone() for k in trained}
        personal.store(ctx.state)
        return {**out, "distill_train_loss": m["train_loss"], "distill_loss": m["distill_loss"]}


ALGORITHMS = (TAP,)
