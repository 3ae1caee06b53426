"""Build the model every client trains, and run it with one call for every kind of model.

:func:`build_model` turns a :class:`~rayfed.config.ModelConfig` (or any ``factory(info)``
callable) plus the data's :class:`~rayfed.data.info.DatasetInfo` into a freshly initialised
``torch.nn.Module`` on CPU, in train mode, with weights fixed by ``seed``. :func:`forward_logits`
is the single call site that feeds a batch to any such model (Hugging Face, PEFT-wrapped or plain)
and returns its logits.

Example:
    >>> from rayfed.config import ModelConfig
    >>> from rayfed.data.info import DatasetInfo
    >>> info = DatasetInfo(num_classes=3, feature_shape=(5,), modality="vector")
    >>> model = build_model(ModelConfig(name="mlp", mlp_hidden=[8]), info, seed=0)
    >>> forward_logits(model, torch.zeros(2, 5)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rayfed.config import ModelConfig
from rayfed.data.info import DatasetInfo
from rayfed.errors import ConfigError

__all__ = ["LinearModel", "MLPClassifier", "ModelFactory", "build_model", "build_model_for_one_task", "forward_logits",
           "unwrap_model"]

ModelFactory = Callable[[DatasetInfo], nn.Module]
"""Any callable ``factory(info) -> nn.Module``; accepted by :func:`build_model` in place of a config."""

_AUTO = {"image": "vit", "text": "bert", "vector": "mlp"}
_HEAD_PREFIXES = ("classifier.", "score.", "head.", "fc.")
_log = logging.getLogger(__name__)


class MLPClassifier(nn.Module):
    """Flatten, then ``Linear -> ReLU`` per hidden size, then a linear head named ``classifier``.

    Args:
        in_features: number of input features after flattening.
        hidden: hidden layer sizes (may be empty: then the model is a linear classifier).
        num_classes: number of output logits.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        self.flatten = nn.Flatten()
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        if not torch.is_floating_point(x):
            x = x.to(self.classifier.weight.dtype)
        return self.classifier(self.body(x))


class LinearModel(nn.Module):
    """A linear model over flattened features, split into two blocks that roles can tell apart.

    ``output = body(x[:, :d - p]) + head(x[:, d - p:])`` with ``p = head_features``: ``body`` (no
    bias) reads the leading features and ``head`` (with bias) the trailing ``p``. With
    ``head_features = 0`` (or all features) the model is a single ``head`` layer. On the
    ``partial_linear`` source ``head`` holds the private ``y_i`` and ``body`` the shared ``x``, so
    ``preset:head`` is the split of FFGG's synthetic experiments.

    Args:
        in_features: number of input features after flattening.
        num_outputs: logits (classification) or regression outputs.
        head_features: trailing features read by ``head``; 0 means all of them.
    """

    def __init__(self, in_features: int, num_outputs: int, head_features: int = 0) -> None:
        super().__init__()
        p = in_features if head_features in (0, None) else int(head_features)
        if not 0 < p <= in_features:
            raise ConfigError(f"config key 'model.linear_head_features': got {head_features}, but the data has "
                              f"{in_features} features; use a number in [0, {in_features}]")
        self.split = in_features - p
        self.flatten = nn.Flatten()
        self.body = nn.Linear(self.split, num_outputs, bias=False) if self.split else None
        self.head = nn.Linear(p, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        if not torch.is_floating_point(x):
            x = x.to(self.head.weight.dtype)
        out = self.head(x[:, self.split:])
        if self.body is not None:
            out = out + self.body(x[:, :self.split])
        return out


def build_model(cfg: ModelConfig | ModelFactory, info: DatasetInfo, seed: int) -> nn.Module:
    """A freshly initialised model for ``info``'s data, in train mode on CPU.

    Deterministic: the same ``seed`` gives identical weights (all random initialisation, including
    a classifier head newly added to pre-trained weights, runs under ``torch.manual_seed(seed)``
    inside a forked RNG, so the caller's global RNG state is left untouched).

    Args:
        cfg: a :class:`ModelConfig` (``name`` auto, vit, bert, mlp or pretrained), or any callable
            ``factory(info) -> nn.Module``.
        info: what the data looks like (classes, sample shape, modality, vocabulary).
        seed: initialisation seed.

    Raises:
        ConfigError: the model does not fit the data (non-square image for ViT, patch size not
            dividing the image size, missing vocabulary size, ...), or the factory did not return
            an ``nn.Module``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if isinstance(cfg, ModelConfig) and cfg.name == "experts":  # towers, fusion experts, task heads
            from rayfed.models.experts import build_experts

            model = build_experts(cfg, info)
        elif isinstance(cfg, ModelConfig):
            model = build_model_for_one_task(cfg, info) if not info.multitask else _multitask(cfg, info)
        elif callable(cfg):
            model = cfg(info)
            if not isinstance(model, nn.Module):
                raise ConfigError(f"model factory {getattr(cfg, '__name__', cfg)!r} must return a torch.nn.Module, "
                                  f"got {type(model).__name__}")
        else:
            raise ConfigError(f"model: expected a ModelConfig or a callable factory(info) -> nn.Module, "
                              f"got {type(cfg).__name__}")
    return model.to("cpu").train()


def _multitask(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    from rayfed.models.multitask import build_multitask

    return build_multitask(cfg, info)


def build_model_for_one_task(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    """The configured single-task model for ``info`` (its first task), without seeding the RNG."""
    name = cfg.name
    if name == "auto":
        if info.modality not in _AUTO:
            raise ConfigError(f"config key 'model.name': 'auto' cannot pick a model for modality "
                              f"{info.modality!r}; valid modalities: {', '.join(_AUTO)}")
        name = _AUTO[info.modality]
    if name == "vit":
        return _build_vit(cfg, info)
    if name == "bert":
        return _build_bert(cfg, info)
    if name == "mlp":
        return MLPClassifier(math.prod(int(d) for d in info.feature_shape), list(cfg.mlp_hidden), info.num_classes)
    if name == "pretrained":
        return _build_pretrained(cfg, info)
    if name == "linear":
        p = cfg.linear_head_features if cfg.linear_head_features is not None else (info.private_features or 0)
        return LinearModel(math.prod(int(d) for d in info.feature_shape), info.num_classes, p)
    raise ConfigError(f"config key 'model.name': got {cfg.name!r}; valid choices: auto, vit, bert, mlp, pretrained, "
                      "linear")


def _build_vit(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    shape = tuple(int(d) for d in info.feature_shape)
    if len(shape) != 3:
        raise ConfigError(f"config key 'model.name': vit needs images shaped [C, H, W], but the data's "
                          f"feature_shape is {list(shape)} (modality {info.modality!r}); use model.name=mlp "
                          "or set data.image_shape")
    c, h, w = shape
    if h != w:
        raise ConfigError(f"config key 'model.name': vit needs square images, but the data's feature_shape is "
                          f"{list(shape)} (H={h}, W={w}); resize/crop the images or use model.name=mlp")
    if h % cfg.patch_size != 0:
        divisors = [d for d in range(1, h + 1) if h % d == 0]
        raise ConfigError(f"config key 'model.patch_size': patch size {cfg.patch_size} does not divide the image "
                          f"size {h} (feature_shape {list(shape)}); valid patch sizes: {divisors}")
    config = ViTConfig(
        image_size=h,
        num_channels=c,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        num_labels=info.num_classes,
    )
    return ViTForImageClassification(config)


def _build_bert(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    shape = tuple(int(d) for d in info.feature_shape)
    if len(shape) != 1:
        raise ConfigError(f"config key 'model.name': bert needs token id sequences shaped [L], but the data's "
                          f"feature_shape is {list(shape)} (modality {info.modality!r})")
    vocab = cfg.vocab_size if cfg.vocab_size is not None else info.vocab_size
    if vocab is None:
        raise ConfigError("config key 'model.vocab_size': bert needs a vocabulary size, got None and the data "
                          "does not report one; set model.vocab_size")
    if info.vocab_size is not None and vocab < info.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size': got {vocab}, but the data's token ids go up to "
                          f"{info.vocab_size - 1}; set model.vocab_size >= {info.vocab_size} or leave it null")
    if vocab < 2:
        raise ConfigError(f"config key 'model.vocab_size': got {vocab}; expected an integer >= 2 (id 0 is padding)")
    config = BertConfig(
        vocab_size=int(vocab),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        # prompt tuning prepends its virtual tokens to every sequence
        max_position_embeddings=max(shape[0], 2) + (cfg.peft.num_virtual_tokens if cfg.peft.type == "prompt_tuning"
                                                     else 0),
        pad_token_id=0,
        num_labels=info.num_classes,
    )
    return BertForSequenceClassification(config)


def _build_pretrained(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    from transformers import (
        AutoConfig,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    if not cfg.path:
        raise ConfigError("config key 'model.path': model.name='pretrained' needs a local folder, got None")
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"config key 'model.path': {cfg.path!r} is not a folder; downloads are not attempted, so "
                          "point model.path at a local save_pretrained() directory")
    if info.modality == "text":
        auto = AutoModelForSequenceClassification
    elif info.modality == "image":
        auto = AutoModelForImageClassification
    else:
        raise ConfigError(f"config key 'model.name': 'pretrained' supports text and image data, but the data's "
                          f"modality is {info.modality!r}; use model.name=mlp")
    try:
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'model.path': cannot read a Hugging Face config from {cfg.path!r} "
                          f"({type(e).__name__}: {e}); it must be a save_pretrained() directory") from e
    _check_pretrained_fits(hf_config, info, cfg.path)
    kwargs: dict[str, Any] = {"num_labels": info.num_classes, "ignore_mismatched_sizes": True,
                              "local_files_only": True, "dtype": torch.float32, "output_loading_info": True}
    try:
        with _quiet_transformers():
            model, loading = auto.from_pretrained(str(path), **kwargs)
    except ValueError as e:  # unrecognised architecture for this task
        raise ConfigError(f"config key 'model.path': the model in {cfg.path!r} (model_type "
                          f"{getattr(hf_config, 'model_type', '?')!r}) cannot be loaded as "
                          f"{auto.__name__} for {info.modality} data: {e}") from e
    _log_loading(loading, cfg.path, type(model).__name__)
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load report and progress bars while loading.

    Every client builds a model, so the report would repeat; :func:`_log_loading` says what matters
    through this module's logger instead.
    """
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


def _log_loading(loading: dict[str, Any], path: str, cls: str) -> None:
    new_head = sorted(k for k in loading.get("missing_keys", ()) if k.startswith(_HEAD_PREFIXES))
    resized = sorted(k[0] if isinstance(k, tuple) else str(k) for k in loading.get("mismatched_keys", ()))
    missing = sorted(k for k in loading.get("missing_keys", ()) if not k.startswith(_HEAD_PREFIXES))
    unexpected = sorted(loading.get("unexpected_keys", ()))
    _log.debug("loaded %s from %s; new head %s, resized %s, unused checkpoint keys %s",
               cls, path, new_head, resized, unexpected)
    if missing:
        _log.warning("loading %s from %s: %d backbone weights were not in the checkpoint and are randomly "
                     "initialised (e.g. %s); is model.path the right model?", cls, path, len(missing),
                     ", ".join(missing[:3]))


def _check_pretrained_fits(hf_config: Any, info: DatasetInfo, path: str) -> None:
    """Catch data/model mismatches at build time rather than as an obscure error in forward."""
    shape = tuple(int(d) for d in info.feature_shape)
    if info.modality == "text":
        if len(shape) != 1:
            raise ConfigError(f"config key 'model.path': text data must be shaped [L], got {list(shape)}")
        max_pos = getattr(hf_config, "max_position_embeddings", None)
        if isinstance(max_pos, int) and shape[0] > max_pos:
            raise ConfigError(f"config key 'data.max_length': sequences of {shape[0]} tokens exceed the "
                              f"pre-trained model's max_position_embeddings={max_pos} ({path!r}); "
                              f"set data.max_length <= {max_pos}")
        vocab = getattr(hf_config, "vocab_size", None)
        if isinstance(vocab, int) and info.vocab_size is not None and info.vocab_size > vocab:
            raise ConfigError(f"config key 'model.path': the data has token ids up to {info.vocab_size - 1}, but "
                              f"the pre-trained model's vocab_size is {vocab} ({path!r}); tokenize with the "
                              "model's own tokenizer (data.tokenizer)")
    else:
        if len(shape) != 3:
            raise ConfigError(f"config key 'model.path': image data must be shaped [C, H, W], got {list(shape)}")
        channels = getattr(hf_config, "num_channels", None)
        if isinstance(channels, int) and channels != shape[0]:
            raise ConfigError(f"config key 'model.path': the pre-trained model expects {channels} channels, but "
                              f"the data's feature_shape is {list(shape)}; set data.image_shape accordingly")
        size = getattr(hf_config, "image_size", None)
        if getattr(hf_config, "model_type", None) == "vit" and isinstance(size, int) and shape[1:] != (size, size):
            raise ConfigError(f"config key 'model.path': the pre-trained ViT expects {size}x{size} images, but "
                              f"the data's feature_shape is {list(shape)}; resize the images")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The innermost model under PEFT, torch.compile and (Distributed)DataParallel wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        get_base = getattr(type(model), "get_base_model", None)
        if callable(get_base):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
    return model


def _main_input_name(model: nn.Module) -> str | None:
    """``main_input_name`` of a Hugging Face model (also through PEFT), else None."""
    transformers = sys.modules.get("transformers")
    if transformers is None:  # not imported, so the model is not one of its classes (and importing costs ~2 s)
        return None
    PreTrainedModel = transformers.PreTrainedModel  # noqa: N806
    inner = unwrap_model(model)
    if isinstance(inner, PreTrainedModel):
        return str(inner.main_input_name)
    return None


def forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` on the batch ``x``: the one call site for every model.

    Hugging Face models (also wrapped by PEFT) get ``x`` under their ``main_input_name``: token ids
    as ``input_ids`` with ``attention_mask = (x != 0)`` (id 0 is padding), images as
    ``pixel_values``. Any other model is called as ``model(x)``. An output with ``.logits`` is
    unwrapped; a tuple/list yields its first element.

    Args:
        model: the model (anything :func:`build_model` returns, possibly wrapped by PEFT).
        x: a batch: ``(N, L)`` int64 token ids, ``(N, C, H, W)`` images or ``(N, d)`` vectors.

    Returns:
        ``(N, num_classes)`` logits.
    """
    name = _main_input_name(model)
    if name == "input_ids":
        if torch.is_floating_point(x):
            x = x.long()
        out = model(input_ids=x, attention_mask=(x != 0).long())
    elif name is not None:
        if name == "pixel_values" and not torch.is_floating_point(x):
            x = x.float()
        out = model(**{name: x})
    else:
        out = model(x)
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    return out
