"""Find parameters by role (attention projections, classifier head, input layer) in any model.

Every name returned is a name from ``model.named_parameters()`` of the model you pass in (which are
also its ``state_dict`` keys), so the same functions work on a plain model and on the same model
wrapped by PEFT (whose names carry a ``base_model.model.`` prefix, and whose adapted layers keep
their original weight under ``<layer>.base_layer.weight``).

Names found with transformers 5.x:

- ``ViTForImageClassification``: ``vit.layers.{i}.attention.{q,k,v}_proj.{weight,bias}``, head
  ``classifier.*``, input layer ``vit.embeddings.*`` (cls token, position embeddings, patch
  projection).
- ``BertForSequenceClassification``: ``bert.encoder.layer.{i}.attention.self.{query,key,value}.*``,
  head ``classifier.*``, input layer ``bert.embeddings.*``.

Example:
    >>> from rayfed.config import ModelConfig
    >>> from rayfed.data.info import DatasetInfo
    >>> from rayfed.models.builders import build_model
    >>> m = build_model(ModelConfig(name="mlp", mlp_hidden=[8]), DatasetInfo(3, (5,), "vector"), seed=0)
    >>> head_parameter_names(m)
    ['classifier.weight', 'classifier.bias']
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from torch import nn

from rayfed.errors import ConfigError

__all__ = [
    "AttentionProjection",
    "attention_projections",
    "head_parameter_names",
    "input_layer_parameter_names",
    "param_names",
]

Kind = Literal["q", "k", "v"]
_KINDS: tuple[Kind, ...] = ("q", "k", "v")

# Last component of the module name of a query/key/value projection in known architectures:
# transformers 5.x ViT/DeiT and most decoders (q_proj), BERT/RoBERTa/MiniLM (query), DistilBERT (q_lin).
_DEFAULT_NAMES: dict[str, Kind] = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v",
    "query": "q", "key": "k", "value": "v",
    "q_lin": "q", "k_lin": "k", "v_lin": "v",
}
_HEAD_ATTRS = ("classifier", "head", "fc", "heads")  # heads: a MultiTaskModel's per-task heads
_INPUT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class AttentionProjection:
    """One query, key or value projection of one attention layer.

    Attributes:
        layer: 0-based index of the attention layer.
        kind: ``"q"``, ``"k"`` or ``"v"``.
        module: module name of the projection (a PEFT-wrapped layer keeps its original name).
        weight: parameter name of the projection's weight (``<module>.base_layer.weight`` under PEFT).
        bias: parameter name of its bias, or None when it has none.
    """

    layer: int
    kind: Kind
    module: str
    weight: str
    bias: str | None


def param_names(model: nn.Module) -> list[str]:
    """All parameter names of ``model``, in ``named_parameters()`` order."""
    return [n for n, _ in model.named_parameters()]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _wrapped_base(module: nn.Module) -> nn.Module | None:
    """The original layer inside a PEFT wrapper (tuner layer or modules_to_save), else None."""
    get_base = getattr(module, "get_base_layer", None)
    if callable(get_base) and isinstance(getattr(module, "base_layer", None), nn.Module):
        return get_base()
    original = getattr(module, "original_module", None)
    if isinstance(original, nn.Module) and hasattr(module, "modules_to_save"):
        return original
    return None


def _units(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(name, module, original)`` for each module in ``named_modules`` order (root excluded).

    A PEFT wrapper counts as one unit whose ``original`` is the layer it wraps; its insides
    (``base_layer``, ``lora_A``, ``modules_to_save``...) are not visited on their own.
    """
    seen: set[int] = {id(model)}

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, nn.Module]]:
        for child_name, child in module.named_children():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{prefix}.{child_name}" if prefix else child_name
            base = _wrapped_base(child)
            if base is not None:
                yield name, child, base
                continue
            yield name, child, child
            yield from walk(child, name)

    yield from walk(model, "")


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _params_under(model: nn.Module, module_name: str) -> list[str]:
    if not module_name:
        return param_names(model)
    prefix = module_name + "."
    return [n for n in param_names(model) if n.startswith(prefix)]


def _unwrapped(model: nn.Module) -> tuple[nn.Module, str]:
    """The innermost model under PEFT/compile/DataParallel wrappers and its module-name prefix."""
    from rayfed.models.builders import unwrap_model

    inner = unwrap_model(model)
    if inner is model:
        return model, ""
    name = _module_names(model).get(id(inner))
    if name is None:  # not a submodule (unusual wrapper): resolve on the outer model
        return model, ""
    return inner, (name + "." if name else "")


def _linear_names(model: nn.Module, limit: int = 6) -> str:
    names = [n for n, _, base in _units(model) if isinstance(base, nn.Linear)]
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return shown or "(no nn.Linear modules)"


# ---------------------------------------------------------------------------------------------
# attention projections
# ---------------------------------------------------------------------------------------------


def _compile_patterns(patterns: dict[str, str]) -> dict[Kind, re.Pattern[str]]:
    if not isinstance(patterns, dict) or not patterns:
        raise ConfigError(f"attention patterns: expected a non-empty dict like {{'q': r'attn\\.q$', ...}}, "
                          f"got {patterns!r}")
    bad = [k for k in patterns if k not in _KINDS]
    if bad:
        raise ConfigError(f"attention patterns: unknown key(s) {bad!r}; valid keys: 'q', 'k', 'v'")
    compiled: dict[Kind, re.Pattern[str]] = {}
    for kind, pattern in patterns.items():
        try:
            compiled[kind] = re.compile(pattern)  # type: ignore[index]
        except (re.error, TypeError) as e:
            raise ConfigError(f"attention patterns: {kind!r} is not a valid regex ({pattern!r}): {e}") from e
    return compiled


def _layer_indices(names: list[str]) -> list[int]:
    """Layer index per module name: rank of its integer path components (``layers.3`` -> 3rd).

    Names are ranked by the tuple of their all-digit components (so ``blocks.1.2`` sorts after
    ``blocks.1.1`` and before ``blocks.2.0``). When some name has no digit component, the index is
    the order of appearance instead (counted per kind by the caller).
    """
    keys = [tuple(int(p) for p in n.split(".") if p.isdigit()) for n in names]
    if any(not k for k in keys):
        return [-1] * len(names)
    rank = {k: i for i, k in enumerate(sorted(set(keys)))}
    return [rank[k] for k in keys]


def attention_projections(model: nn.Module, patterns: dict[str, str] | None = None) -> list[AttentionProjection]:
    r"""The query/key/value projections of every attention layer, sorted by (layer, q/k/v).

    Known architectures (transformers ViT ``q_proj``/``k_proj``/``v_proj``, BERT-family
    ``query``/``key``/``value``, DistilBERT ``q_lin``...) are resolved by the last component of
    the module name. For other models pass ``patterns``: regexes, keyed by ``"q"``/``"k"``/``"v"``
    (any subset), searched (``re.search``) in module names relative to the unwrapped model (so the
    same patterns work with and without a PEFT wrapper). Only modules owning a ``weight``
    parameter count (``nn.MultiheadAttention``'s fused ``in_proj_weight`` is not a projection
    module; use separate Linear layers).

    The layer index ranks the integer components of the module name (``blocks.3.attn.q`` is layer
    3 when blocks 0-3 match); when a name has none, the order of appearance is used per kind.
    Several entries may share a (layer, kind), e.g. BERT decoders with cross-attention.

    Args:
        model: any ``nn.Module`` (possibly PEFT-wrapped).
        patterns: optional regexes for custom models, e.g. ``{"q": r"attn\.wq$", "v": r"attn\.wv$"}``.

    Raises:
        ConfigError: nothing was found (the message lists some Linear modules to write patterns for),
            a module matches several kinds, or the patterns are malformed.
    """
    inner, prefix = _unwrapped(model)
    compiled = _compile_patterns(patterns) if patterns is not None else None
    names_by_id = _module_names(model)
    params = dict(model.named_parameters())

    found: list[tuple[str, Kind, str, str | None]] = []
    for rel_name, _module, base in _units(inner):
        weight = getattr(base, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        if compiled is None:
            kind = _DEFAULT_NAMES.get(rel_name.rsplit(".", 1)[-1])
            if kind is None:
                continue
        else:
            kinds = [k for k, rx in compiled.items() if rx.search(rel_name)]
            if not kinds:
                continue
            if len(kinds) > 1:
                raise ConfigError(f"attention patterns: module {rel_name!r} matches several kinds {kinds}; "
                                  "make the q/k/v patterns mutually exclusive")
            kind = kinds[0]
        base_name = names_by_id.get(id(base))
        if base_name is None:
            continue
        w_name = f"{base_name}.weight"
        if w_name not in params:  # shared/tied weight registered under another name
            continue
        b_name = f"{base_name}.bias"
        found.append((prefix + rel_name, kind, w_name, b_name if b_name in params else None))

    if not found:
        how = "patterns " + repr(patterns) if patterns is not None else "the built-in names " + \
            "(q_proj/k_proj/v_proj, query/key/value, q_lin/k_lin/v_lin)"
        raise ConfigError(f"no attention q/k/v projections found in {type(inner).__name__} with {how}; "
                          f"its Linear modules include: {_linear_names(inner)}; pass patterns, e.g. "
                          "{'q': r'attn\\.q$', 'k': r'attn\\.k$', 'v': r'attn\\.v$'}")

    layers = _layer_indices([m for m, *_ in found])
    if layers and layers[0] < 0:
        counters = dict.fromkeys(_KINDS, 0)
        layers = []
        for _, kind, *_rest in found:
            layers.append(counters[kind])
            counters[kind] += 1
    out = [AttentionProjection(layer=layer, kind=kind, module=m, weight=w, bias=b)
           for layer, (m, kind, w, b) in zip(layers, found)]
    out.sort(key=lambda p: (p.layer, _KINDS.index(p.kind)))
    return out


# ---------------------------------------------------------------------------------------------
# head and input layer
# ---------------------------------------------------------------------------------------------


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameter names of the classifier head.

    The head is the model's ``classifier`` module (Hugging Face ``*For*Classification`` models and
    :class:`~rayfed.models.builders.MLPClassifier`), else a child module named ``head`` or ``fc``,
    else the last ``nn.Linear`` in module order. Under PEFT every parameter of the wrapped head is
    included (``classifier.original_module.*`` and ``classifier.modules_to_save.<adapter>.*`` when
    the head is in ``modules_to_save``; ``lora_A``/``lora_B`` when it is LoRA-adapted).

    Raises:
        ConfigError: the model has no parameterised head and no ``nn.Linear``.
    """
    inner, prefix = _unwrapped(model)
    for attr in _HEAD_ATTRS:
        child = getattr(inner, attr, None)
        if isinstance(child, nn.Module) and any(True for _ in child.parameters()):
            names = _params_under(model, prefix + attr)
            if names:
                return names
    last = None
    for name, _module, base in _units(inner):
        if isinstance(base, nn.Linear):
            last = name
    if last is None:
        raise ConfigError(f"cannot find a classifier head in {type(inner).__name__}: no 'classifier', 'head' or "
                          "'fc' attribute and no nn.Linear; name the output layer 'classifier'")
    return _params_under(model, prefix + last)


def input_layer_parameter_names(model: nn.Module) -> list[str]:
    """Parameter names of the input layer (embeddings).

    Hugging Face models: their backbone's ``embeddings`` module (``vit.embeddings.*`` for ViT,
    ``bert.embeddings.*`` for BERT: token, position and type embeddings and their LayerNorm).
    Other models: the first ``nn.Linear``, ``nn.Conv*d`` or ``nn.Embedding`` in module order.

    Raises:
        ConfigError: no such layer exists.
    """
    inner, prefix = _unwrapped(model)
    backbone = getattr(inner, "base_model", None)
    embeddings = getattr(backbone, "embeddings", None) if isinstance(backbone, nn.Module) else None
    if isinstance(embeddings, nn.Module):
        name = _module_names(inner).get(id(embeddings))
        if name:
            names = _params_under(model, prefix + name)
            if names:
                return names
    for name, _module, base in _units(inner):
        if isinstance(base, _INPUT_TYPES) and any(True for _ in base.parameters()):
            return _params_under(model, prefix + name)
    raise ConfigError(f"cannot find an input layer in {type(inner).__name__}: no embeddings module and no "
                      "nn.Linear/Conv/Embedding layer")
