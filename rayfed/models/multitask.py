"""A multi-task, multi-modal model built from parts: one encoder per input modality, one head per task.

``MultiTaskModel(encoders, heads, tasks)`` runs task ``t`` on a batch by encoding each of its
inputs with that modality's encoder, concatenating the features in the task's input order, and
applying the task's head. A client holding only some tasks keeps only their heads and the encoders
they use (:meth:`MultiTaskModel.restrict`), so clients' models differ in structure while the
tensors they share keep the same names (``encoders.<modality>.*``, ``heads.<task>.*``), and the
server, holding the union, averages each tensor over the clients that hold it.

:func:`build_multitask` makes the family from a :class:`~rayfed.config.ModelConfig`: each encoder is
the configured model for that modality (``auto``: ViT for images, BERT for text, an MLP for
vectors) with its classifier head removed, and each head is a linear layer shaped for the task's
target (class logits, regression outputs, an image, or a token sequence's logits).

Example:
    >>> from rayfed.config import ModelConfig
    >>> from rayfed.data.info import DatasetInfo, TaskInfo
    >>> inputs = (("vector", (6,)),)
    >>> tasks = (TaskInfo("digit", inputs, "class", 10), TaskInfo("parity", inputs, "class", 2))
    >>> model = build_multitask(ModelConfig(name="mlp", mlp_hidden=[8]), DatasetInfo.for_tasks(tasks))
    >>> model(torch.zeros(3, 6), task="parity").shape
    torch.Size([3, 2])
    >>> sorted(model.restrict(["parity"]).heads)
    ['parity']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from rayfed.config import ModelConfig
from rayfed.data.info import DatasetInfo, TaskInfo
from rayfed.errors import ConfigError

__all__ = ["MultiTaskModel", "build_multitask", "strip_head"]


class _Encoder(nn.Module):
    """A single-task model with its classifier replaced by the identity: inputs -> features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from rayfed.models.builders import forward_logits

        return forward_logits(self.model, x)


class MultiTaskModel(nn.Module):
    """Encoders per modality, one head per task (see the module docstring).

    Args:
        encoders: ``modality -> module`` mapping a batch of that input to ``(N, features)``.
        heads: ``task -> module`` mapping the task's concatenated features to its outputs.
        tasks: the tasks (their inputs give the encoders each head reads, in order; their targets
            give the output shape).
    """

    def __init__(self, encoders: Mapping[str, nn.Module], heads: Mapping[str, nn.Module],
                 tasks: Sequence[TaskInfo]) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        self.heads = nn.ModuleDict(dict(heads))
        self.tasks = {t.name: t for t in tasks}

    def restrict(self, tasks: Sequence[str]) -> MultiTaskModel:
        """Keep only the heads of ``tasks`` and the encoders they read (in place; returns self)."""
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise ConfigError(f"a client holds tasks {unknown} that the model has no head for; the model's tasks "
                              f"are {sorted(self.tasks)}")
        keep = set(tasks)
        used = {m for t in tasks for m in self.tasks[t].modalities}
        for name in [n for n in self.heads if n not in keep]:
            del self.heads[name]
        for name in [n for n in self.encoders if n not in used]:
            del self.encoders[name]
        self.tasks = {n: t for n, t in self.tasks.items() if n in keep}
        return self

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
        """Outputs of ``task`` on ``x`` (one tensor for a single-input task, else modality -> tensor):
        ``(N, classes)``, ``(N, outputs)``, ``(N, *image_shape)`` or ``(N, L, vocab)``.
        """
        info = self.tasks.get(task)
        if info is None:
            raise KeyError(f"this model holds no head for task {task!r}; it holds {sorted(self.tasks)}")
        inputs = x if isinstance(x, Mapping) else {info.modalities[0]: x}
        feats = torch.cat([self.encoders[m](inputs[m]) for m in info.modalities], dim=-1)
        out = self.heads[task](feats)
        if info.target == "image":
            return out.reshape(out.shape[0], *info.target_shape)
        if info.target == "tokens":
            return out.reshape(out.shape[0], *info.target_shape, info.num_outputs)
        return out


def strip_head(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace a model's classifier head by the identity; returns the model and its feature size.

    Handles the models :func:`rayfed.models.build_model` makes (transformers ``*ForImageClassification``
    and ``*ForSequenceClassification``, whose logits then are the pooled ``hidden_size`` features,
    and :class:`~rayfed.models.MLPClassifier`) and any model with a final ``nn.Linear`` called
    ``classifier``, ``head`` or ``fc``.
    """
    for attr in ("classifier", "head", "fc"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return model, int(head.in_features)
    raise ConfigError(f"cannot use a {type(model).__name__} as a task encoder: it has no final nn.Linear named "
                      "classifier, head or fc to remove; pass a model_factory that builds the multi-task model")


def _encoder_info(modality: str, shape: tuple[int, ...], vocab: int | None) -> DatasetInfo:
    return DatasetInfo(num_classes=2, feature_shape=tuple(shape), modality=modality,  # type: ignore[arg-type]
                       vocab_size=vocab)


def build_multitask(cfg: ModelConfig, info: DatasetInfo) -> MultiTaskModel:
    """The multi-task model for ``info.tasks`` (see the module docstring).

    Call it inside a seeded RNG, as :func:`rayfed.models.build_model` does.
    """
    from rayfed.models.builders import build_model_for_one_task

    tasks = info.task_infos()
    shapes: dict[str, tuple[int, ...]] = {}
    for t in tasks:
        for m, shape in t.inputs:
            if shapes.setdefault(m, tuple(shape)) != tuple(shape):
                raise ConfigError(f"tasks read {m} inputs of shapes {list(shapes[m])} and {list(shape)}; one encoder "
                                  f"per modality needs one input shape (resize the inputs, or pass a model_factory)")
    encoders: dict[str, nn.Module] = {}
    width: dict[str, int] = {}
    for m, shape in shapes.items():
        vocab = next((t.vocab_size for t in tasks if m in t.modalities and t.vocab_size), None)
        model, width[m] = strip_head(build_model_for_one_task(cfg, _encoder_info(m, shape, vocab)))
        encoders[m] = _Encoder(model)
    heads = {t.name: nn.Linear(sum(width[m] for m in t.modalities), t.output_size) for t in tasks}
    return MultiTaskModel(encoders, heads, tasks)
