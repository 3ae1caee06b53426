"""PEFT preparation of models (LoRA, IA3, prompt tuning) and export of the trained adapters.

:func:`apply_peft` wraps a model that :func:`~rayfed.models.build_model` made with Hugging Face
PEFT as ``model.peft`` (:class:`~rayfed.config.PeftConfig`) says. The base weights of the wrapped
model have ``requires_grad=False``, so :func:`~rayfed.roles.assign_roles` makes them ``frozen``
(never trained, never sent); the adapter tensors and the ``modules_to_save`` copies (the
classifier head by default) stay trainable and take the default role (``shared``, or ``private``
through a selector such as ``preset:lora`` or ``preset:adapter``). :func:`adapter_state` is what
would cross the wire; :func:`export_adapter` writes a client's personalized model as a PEFT
adapter folder that :func:`load_adapter` (``PeftModel.from_pretrained``) loads back onto a
freshly built base.

Defaults, chosen to do the right thing on every model rayfed builds:

- ``target_modules``: the attention query and value projections that
  :func:`~rayfed.models.attention_projections` finds (ViT ``q_proj``/``v_proj``, BERT
  ``query``/``value``); IA3 also targets each transformer block's feed-forward output layer (its
  last ``nn.Linear``: BERT ``output.dense``, ViT ``mlp.fc2``), which IA3 scales on its input
  (``feedforward_modules``). A model without attention projections (``MLPClassifier``, most user
  modules) gets every ``nn.Linear`` outside ``modules_to_save``.
- ``modules_to_save``: the module of the classifier head
  (:func:`~rayfed.models.head_parameter_names`; a multi-layer head such as a ``Sequential`` is one
  module), so a head newly added to pre-trained weights trains. Prompt tuning always trains it
  (PEFT's sequence-classification wrapper adds ``classifier``/``score`` itself).

Targets are resolved to exact module names before PEFT sees them (PEFT's own matching: a list
entry matches that name or any name ending in ``.<entry>``; a string is a regular expression
matched against the whole name), so the exported ``adapter_config.json`` names exactly the
modules that were adapted.

Example:
    >>> import torch
    >>> from rayfed.config import ModelConfig, PeftConfig
    >>> from rayfed.data.info import DatasetInfo
    >>> from rayfed.models.builders import build_model
    >>> info = DatasetInfo(num_classes=3, feature_shape=(5,), modality="vector")
    >>> model = build_model(ModelConfig(name="mlp", mlp_hidden=[8]), info, seed=0)
    >>> _ = torch.manual_seed(0)
    >>> lora = apply_peft(model, PeftConfig(type="lora", r=2))
    >>> sorted(adapter_state(lora))  # doctest: +NORMALIZE_WHITESPACE
    ['base_model.model.body.0.lora_A.default.weight', 'base_model.model.body.0.lora_B.default.weight',
     'base_model.model.classifier.modules_to_save.default.bias',
     'base_model.model.classifier.modules_to_save.default.weight']
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rayfed.config import PeftConfig
from rayfed.errors import ConfigError
from rayfed.models.introspect import attention_projections, head_parameter_names

__all__ = ["adapter_state", "apply_peft", "export_adapter", "load_adapter"]

_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def apply_peft(model: nn.Module, cfg: PeftConfig | None, *, sequence_length: int | None = None) -> nn.Module:
    """Wrap ``model`` with the PEFT method ``cfg`` configures (LoRA, IA3 or prompt tuning).

    The model is modified in place (PEFT injects its layers into it) and returned inside a
    ``peft.PeftModel``; use the returned object. Its base weights are frozen; the adapter tensors
    and ``modules_to_save`` are trainable. See the module docstring for the defaults.

    Deterministic: the new tensors (LoRA's ``A`` matrices, prompt tuning's virtual tokens, sampled
    from the vocabulary embeddings) are drawn from the global torch RNG at the call, so seed it
    before (``torch.manual_seed``); nothing else influences them.

    Args:
        model: a model from :func:`~rayfed.models.build_model` (or any ``nn.Module``), not yet
            wrapped by PEFT.
        cfg: the ``model.peft`` section; ``None`` or ``type="none"`` returns ``model`` unchanged.
        sequence_length: prompt tuning only: the length of the token sequences the model will see.
            When given, a model whose ``max_position_embeddings`` cannot hold them plus the virtual
            tokens is rejected here rather than failing in its first forward pass.

    Returns:
        the ``PeftModel`` (or ``model`` itself when PEFT is off).

    Raises:
        ConfigError: ``target_modules``/``feedforward_modules``/``modules_to_save`` match no module
            (the message lists module names of the model), prompt tuning on a model that is not a
            Hugging Face text model, or a configuration PEFT rejects.
        TypeError: ``model`` is already a ``PeftModel``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +SKIP
        >>> vit = apply_peft(vit, PeftConfig(type="lora", r=4))  # doctest: +SKIP
        >>> vit.peft_config["default"].target_modules  # doctest: +SKIP
        {'vit.layers.0.attention.q_proj', 'vit.layers.0.attention.v_proj', ...}
    """
    if cfg is None or not cfg.enabled:
        return model
    if _is_peft(model):
        raise TypeError(f"apply_peft: the model is already a {type(model).__name__}; pass the base model (its "
                        "get_base_model()) or add further adapters with PEFT's add_adapter")
    if cfg.type == "prompt_tuning":
        peft_config = _prompt_tuning_config(model, cfg, sequence_length)
    else:
        peft_config = _tuner_config(model, cfg)

    from peft import get_peft_model

    try:
        with _quiet_peft():
            return get_peft_model(model, peft_config)
    except ValueError as e:  # PEFT's own validation
        raise ConfigError(f"config key 'model.peft': PEFT cannot apply {cfg.type} to {type(model).__name__}: "
                          f"{e}") from e


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of a PEFT model: adapters plus ``modules_to_save`` copies.

    These are what crosses the wire for a PEFT-prepared model (every other tensor is frozen).
    Keys are the wrapped model's state-dict keys; values are detached and share storage with the
    model, like ``state_dict()`` (clone them to keep a snapshot).

    Raises:
        TypeError: ``model`` is not a ``peft.PeftModel``.

    Example:
        >>> sum(t.numel() for t in adapter_state(lora_minilm).values())  # doctest: +SKIP
        75268
    """
    if not _is_peft(model):
        raise TypeError(f"adapter_state: expected a peft.PeftModel (from apply_peft), got {type(model).__name__}; "
                        "for a plain model use its state_dict()")
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def export_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``directory`` with ``save_pretrained`` (safetensors).

    A ``PeftModel`` writes its adapter (``adapter_config.json`` and ``adapter_model.safetensors``,
    ``modules_to_save`` included), which :func:`load_adapter` loads back onto a freshly built base.
    A plain Hugging Face model (``transformers.PreTrainedModel``, e.g. a client model trained in
    full) writes a whole model folder, loadable with ``ModelConfig(name="pretrained", path=...)``.

    Args:
        model: a ``PeftModel`` or a ``transformers.PreTrainedModel``.
        directory: the folder to write (created if missing).

    Returns:
        ``directory`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: any other kind of model.

    Example:
        >>> export_adapter(lora_model, tmp_path / "client_3")  # doctest: +SKIP
        PosixPath('.../client_3')
    """
    path = Path(directory)
    if _is_peft(model):
        model.save_pretrained(str(path), safe_serialization=True)
        return path
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        model.save_pretrained(str(path))  # transformers writes safetensors by default
        return path
    raise TypeError(f"export_adapter: cannot export a {type(model).__module__}.{type(model).__name__}; supported: a "
                    "peft.PeftModel (from apply_peft) or a transformers.PreTrainedModel; for any other nn.Module "
                    "save its state_dict() (e.g. with safetensors.torch.save_file)")


def load_adapter(base_model: nn.Module, directory: str | os.PathLike[str], *, is_trainable: bool = False) -> nn.Module:
    """Load an adapter folder from :func:`export_adapter` onto ``base_model`` (``PeftModel.from_pretrained``).

    Args:
        base_model: a freshly built base model with the same structure as the one exported (e.g.
            :func:`~rayfed.models.build_model` with the same config); PEFT modifies it in place.
        directory: the folder holding ``adapter_config.json``.
        is_trainable: keep the adapter trainable (to continue training); by default (PEFT's), the
            model is for inference: in eval mode, every tensor frozen.

    Returns:
        the ``PeftModel``; the adapter's tensors land on ``base_model``'s device.

    Raises:
        FileNotFoundError: ``directory`` has no ``adapter_config.json``.
        ValueError: ``is_trainable`` for a prompt tuning adapter (PEFT loads those for inference only).

    Example:
        >>> base = build_model(model_cfg, info, seed=0)  # doctest: +SKIP
        >>> personal = load_adapter(base, "runs/exp/adapters/client_3")  # doctest: +SKIP
    """
    path = Path(directory)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"load_adapter: {str(path)!r} has no adapter_config.json; pass a folder written by "
                                "export_adapter from a PEFT model (a whole-model folder loads with "
                                "ModelConfig(name='pretrained', path=...))")
    from peft import PeftConfig as HFPeftConfig
    from peft import PeftModel

    if is_trainable and HFPeftConfig.from_pretrained(str(path)).is_prompt_learning:
        raise ValueError(f"load_adapter: {str(path)!r} holds a prompt-learning adapter, which PEFT loads for "
                         "inference only (is_trainable=False); to continue training it, apply_peft() on a fresh "
                         "base and load_state_dict() the saved adapter tensors")
    first = next(base_model.parameters(), None)
    device = str(first.device) if first is not None else "cpu"
    # PEFT would otherwise load the weights onto the "best" device it finds (a GPU) before copying them
    with _quiet_peft():
        model = PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable, torch_device=device)
    if not is_trainable:  # PEFT leaves a prompt encoder trainable even then; inference means nothing trains
        model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# building the PEFT configs
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Hide one deprecation that PEFT's wrapping triggers inside transformers 5.

    PEFT reads ``is_gradient_checkpointing``, which transformers 5 deprecates; every client wraps a
    model, and the user can do nothing about it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def _is_peft(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")  # not imported: the model cannot be one of its classes
    return peft is not None and isinstance(model, peft.PeftModel)


def _tuner_config(model: nn.Module, cfg: PeftConfig) -> Any:
    """A ``LoraConfig`` or ``IA3Config`` with exact module names resolved on ``model``."""
    from peft import IA3Config, LoraConfig

    if cfg.type != "ia3" and cfg.feedforward_modules is not None:
        raise ConfigError(f"config key 'model.peft.feedforward_modules': got {cfg.feedforward_modules!r}, but it "
                          f"applies to ia3 only (model.peft.type is {cfg.type!r}); set it to null")
    names = [n for n, _ in model.named_modules() if n]
    to_save = _modules_to_save(model, cfg, names)
    saved = tuple(to_save)
    if cfg.target_modules is None:
        targets = _default_targets(model, saved)
        if cfg.type == "ia3":
            ff_default = [n for n in _feedforward_outputs(model) if not _under(n, saved)]
            targets = [n for n in names if n in set(targets) | set(ff_default)]
        if not targets:
            raise ConfigError(f"config key 'model.peft.target_modules': got None, and {type(model).__name__} has no "
                              f"attention projection and no nn.Linear outside modules_to_save {to_save}; name "
                              f"the modules to adapt, e.g. one of: {_examples(model)}")
    else:
        targets = [n for n in names if _matches(cfg.target_modules, n) and not _under(n, saved)]
        if not targets:
            raise ConfigError(f"config key 'model.peft.target_modules': got {cfg.target_modules!r}, which matches no "
                              f"module of {type(model).__name__} outside modules_to_save {to_save}; module names look "
                              f"like: {_examples(model)} (a list entry matches that name or names ending in "
                              "'.<entry>'; a string is a regular expression matched against whole names)")
    modules = dict(model.named_modules())
    # PEFT adapts layers; a container (a whole attention block) fails deep inside it with a module dump
    containers = [f"{n} ({type(modules[n]).__name__})" for n in targets if _is_container(modules[n])]
    if containers:
        raise ConfigError(f"config key 'model.peft.target_modules': got {cfg.target_modules!r}, which matches "
                          f"container modules {_shorten(containers)}; PEFT adapts layers, so name their "
                          f"nn.Linear/nn.Conv*d/nn.Embedding children, e.g. one of: {_examples(model)}")
    modules_to_save = to_save or None
    if cfg.type == "lora":
        return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          modules_to_save=modules_to_save, bias="none")
    if cfg.feedforward_modules is None:
        ff_layers = set(_feedforward_outputs(model))
        feedforward = [t for t in targets if t in ff_layers]
    else:
        feedforward = [t for t in targets if _matches(cfg.feedforward_modules, t)]
        if not feedforward:
            raise ConfigError(f"config key 'model.peft.feedforward_modules': got {cfg.feedforward_modules!r}, which "
                              f"matches none of the target modules ({_shorten(targets)}); name some of them, or "
                              "set it to null for the feed-forward output layers")
    return IA3Config(target_modules=targets, feedforward_modules=feedforward, modules_to_save=modules_to_save)


def _prompt_tuning_config(model: nn.Module, cfg: PeftConfig, sequence_length: int | None) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or model.main_input_name != "input_ids":
        main = getattr(model, "main_input_name", None)
        got = f"{type(model).__name__}" + (f" (main input {main!r})" if main else "")
        raise ConfigError(f"config key 'model.peft.type': 'prompt_tuning' prepends learned token embeddings, so it "
                          f"needs a Hugging Face text model (input_ids), got {got}; use lora or ia3")
    for key in ("target_modules", "feedforward_modules"):
        if getattr(cfg, key) is not None:
            raise ConfigError(f"config key 'model.peft.{key}': got {getattr(cfg, key)!r}, but prompt tuning "
                              "adapts no modules; set it to null (or use lora or ia3)")
    if cfg.modules_to_save is not None and not cfg.modules_to_save:
        raise ConfigError("config key 'model.peft.modules_to_save': got [], but prompt tuning for sequence "
                          "classification always trains the classifier head (PEFT adds it); leave it null")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    positions = None if sequence_length is None else sequence_length + cfg.num_virtual_tokens
    if positions is not None and isinstance(max_pos, int) and positions > max_pos:
        raise ConfigError(f"config key 'model.peft.num_virtual_tokens': got {cfg.num_virtual_tokens}; with "
                          f"{sequence_length}-token inputs the model would see {positions} "
                          f"positions, but its max_position_embeddings is {max_pos}; use at most "
                          f"{max_pos - sequence_length} virtual tokens or shorter inputs")
    names = [n for n, _ in model.named_modules() if n]
    if cfg.modules_to_save is not None:
        extra = _modules_to_save(model, cfg, names)
    else:  # PEFT trains 'classifier' and 'score' itself; a head named otherwise must be added
        extra = [h for h in _head_modules(model) if h not in ("classifier", "score")] or None
    # SAMPLE_VOCAB starts the virtual tokens at real token embeddings (RANDOM draws N(0, 1) vectors,
    # far off the embedding scale of a pre-trained model); the token ids come from the torch RNG.
    return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=cfg.num_virtual_tokens,
                              prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, modules_to_save=extra)


def _modules_to_save(model: nn.Module, cfg: PeftConfig, names: list[str]) -> list[str]:
    """Exact names of the modules trained in full: the configured ones, else the classifier head."""
    if cfg.modules_to_save is None:
        return _head_modules(model)
    # PEFT's rule for modules_to_save: a module whose name ends with the entry (no dot needed)
    found, missing = [], []
    for entry in cfg.modules_to_save:
        hit = [n for n in names if n.endswith(entry)]
        if not hit:
            missing.append(entry)
        found += [n for n in hit if n not in found]
    if missing:
        raise ConfigError(f"config key 'model.peft.modules_to_save': got {cfg.modules_to_save!r}; {missing!r} "
                          f"match no module of {type(model).__name__}; module names look like: {_examples(model)}")
    return found


def _head_modules(model: nn.Module) -> list[str]:
    """The module(s) holding the classifier head's parameters (none when there is no head).

    One module when the head is one (a Linear, or a Sequential of layers); the layers themselves when
    they only share a ModuleDict/ModuleList parent, which PEFT cannot wrap as one layer.
    """
    try:
        params = head_parameter_names(model)
    except ConfigError:
        return []
    owners = list(dict.fromkeys(p.rsplit(".", 1)[0] for p in params if "." in p))
    if len(owners) <= 1:
        return owners
    common = ".".join(os.path.commonprefix([o.split(".") for o in owners]))
    parent = dict(model.named_modules()).get(common) if common else None
    if parent is not None and not isinstance(parent, (nn.ModuleDict, nn.ModuleList)):
        return [common]
    return owners


def _default_targets(model: nn.Module, saved: tuple[str, ...]) -> list[str]:
    try:
        projections = attention_projections(model)
    except ConfigError:  # no attention: an MLP or a user module
        return [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear) and not _under(n, saved)]
    targets = [p.module for p in projections if p.kind in ("q", "v") and not _under(p.module, saved)]
    return targets


def _feedforward_outputs(model: nn.Module) -> list[str]:
    """The feed-forward output layer of each transformer block: the block's last ``nn.Linear``.

    A block is the numbered module that holds an attention layer (``bert.encoder.layer.3``,
    ``vit.layers.3``); its last Linear in module order is the feed-forward down projection in the
    standard layouts (BERT ``output.dense``, ViT ``mlp.fc2``, Llama ``down_proj``).
    """
    try:
        projections = attention_projections(model)
    except ConfigError:
        return []
    proj_modules = {p.module for p in projections}
    blocks = {b for b in (_block_of(p.module) for p in projections) if b}
    last: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in proj_modules:
            block = _block_of(name)
            if block in blocks:
                last[block] = name
    return [last[b] for b in sorted(last, key=list(last).index)]


def _block_of(name: str) -> str | None:
    """The module name up to its last all-digit component (``a.layer.3.ffn.fc`` -> ``a.layer.3``)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i + 1])
    return None


def _matches(spec: str | list[str], name: str) -> bool:
    """PEFT's target matching: a string is a full-match regex; a list entry matches itself or a ``.entry`` suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _is_container(module: nn.Module) -> bool:
    return next(module.children(), None) is not None and not isinstance(module, nn.MultiheadAttention)


def _under(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _examples(model: nn.Module, limit: int = 6) -> str:
    names = [n for n, m in model.named_modules() if n and isinstance(m, _ADAPTABLE)]
    return _shorten(names, limit) if names else "(no nn.Linear, nn.Conv*d or nn.Embedding modules)"


def _shorten(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
