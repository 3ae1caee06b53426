"""The one path from a config to a client's model: build, prepare for the client's structure, assign roles.

Every model in a federation, on a client actor, on the server and on the driver (which checks
every structure before any actor starts), is made by :func:`build_structure`:

1. :func:`rayfed.models.build_model` builds the configured model (or calls the ``model_factory``)
   with weights fixed by the seed;
2. :meth:`rayfed.algorithms.Algorithm.prepare_model` shapes it for a
   :class:`~rayfed.clients.Structure`. The default, :func:`standard_preparation`, keeps only the
   structure's task heads and encoders (a :class:`~rayfed.models.multitask.MultiTaskModel`), cuts
   the transformer to the structure's depth tier (:func:`cut_depth`) and wraps it with HF PEFT when
   ``model.peft`` is set; an algorithm adds exits, masks or anything else here. It runs under an
   RNG seeded by the run's seed, so new modules start identically everywhere;
3. the algorithm's role rules give the :class:`~rayfed.roles.RoleMap`; tensors that only some
   structures hold (``RunPlan.partial_keys``) become ``tiered`` where they would be ``shared``.

Example:
    >>> from rayfed.config import ModelConfig
    >>> from rayfed.data.info import DatasetInfo
    >>> from rayfed.algorithms import create
    >>> from rayfed.config import AlgorithmConfig
    >>> from rayfed.clients import Structure
    >>> info = DatasetInfo(num_classes=3, feature_shape=(1, 8, 8), modality="image")
    >>> cfg = ModelConfig(name="vit", hidden_size=16, num_layers=3, num_heads=2, intermediate_size=16, patch_size=4)
    >>> model, roles = build_structure(cfg, info, 0, create(AlgorithmConfig("fedavg")), Structure(tier=1))
    >>> len(model.vit.layers)
    1
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn

from rayfed.config import ModelConfig, PeftConfig
from rayfed.data.info import DatasetInfo
from rayfed.errors import ConfigError
from rayfed.roles import SERVER_HELD, Role, RoleMap

if TYPE_CHECKING:
    from rayfed.algorithms.base import Algorithm
    from rayfed.clients import Structure
    from rayfed.plan import RunPlan

__all__ = ["block_list", "build_structure", "check_structures", "cut_depth", "num_blocks", "standard_preparation",
           "structure_keys"]

ModelSource = Union[ModelConfig, Callable[[DatasetInfo], nn.Module]]

#: the last base model built in this process, with what it was built from: another structure of
#: the same model starts from a copy of it (a pre-trained model is read from disk once per
#: process, not once per structure). The source is held so that a factory's id is not reused.
_LAST_BASE: Optional[tuple[Any, ModelSource, nn.Module]] = None


def _base_model(source: ModelSource, info: DatasetInfo, seed: int) -> nn.Module:
    global _LAST_BASE
    from rayfed.models.builders import build_model

    key = (repr(source) if isinstance(source, ModelConfig) else id(source), info, int(seed))
    if _LAST_BASE is not None and _LAST_BASE[0] == key:
        return copy.deepcopy(_LAST_BASE[2])
    model = build_model(source, info, seed)
    _LAST_BASE = (key, source, copy.deepcopy(model))
    return model


def block_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The transformer's list of blocks: ``(parent module, attribute, ModuleList)``.

    The longest ``nn.ModuleList`` of same-class modules named ``layer``, ``layers``, ``blocks``
    or ``h`` (transformers ViT ``vit.layers``, BERT ``bert.encoder.layer``, GPT-2 ``h``), found
    through PEFT wrappers too.
    """
    best: Optional[tuple[nn.Module, str, nn.ModuleList]] = None
    for module in model.modules():
        for attr, child in module.named_children():
            if not isinstance(child, nn.ModuleList) or attr not in ("layer", "layers", "blocks", "h") or not len(child):
                continue
            if len({type(c) for c in child}) == 1 and (best is None or len(child) > len(best[2])):
                best = (module, attr, child)
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no list of transformer blocks (an nn.ModuleList named layer, "
                          "layers, blocks or h), so it cannot be cut to a depth tier; leave data.tiers empty or pass "
                          "a model_factory whose blocks are such a list")
    return best


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks of ``model`` (see :func:`block_list`)."""
    return len(block_list(model)[2])


def cut_depth(model: nn.Module, depth: int) -> nn.Module:
    """Keep only the first ``depth`` transformer blocks (in place; returns the model).

    The kept blocks keep their names (``...layers.0`` .. ``layers.{depth-1}``), so they are the same
    tensors as in a deeper client's model; a Hugging Face config's ``num_hidden_layers`` follows.
    """
    parent, attr, blocks = block_list(model)
    if not 1 <= depth <= len(blocks):
        raise ConfigError(f"config key 'data.tiers': depth {depth} is not in 1..{len(blocks)}, the model's "
                          f"{len(blocks)} blocks; use depths the model has")
    if depth < len(blocks):
        setattr(parent, attr, nn.ModuleList(list(blocks)[:depth]))
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "num_hidden_layers"):
                cfg.num_hidden_layers = depth
    return model


def standard_preparation(model: nn.Module, structure: Structure, peft: Optional[PeftConfig],
                         info: DatasetInfo) -> nn.Module:
    """The default :meth:`~rayfed.algorithms.Algorithm.prepare_model`: the structure's tasks only,
    its depth tier, then PEFT (``model.peft``) over what is left.
    """
    from rayfed.models.multitask import MultiTaskModel

    if isinstance(model, MultiTaskModel):
        model.restrict(list(structure.tasks))
    if structure.tier is not None:
        cut_depth(model, structure.tier)
    if peft is not None and peft.enabled:
        from rayfed.models.peft import apply_peft

        length = info.feature_shape[0] if info.modality == "text" else None
        model = apply_peft(model, peft, sequence_length=length)
    return model


def _roles(algorithm: Algorithm, model: nn.Module, partial: Iterable[str]) -> RoleMap:
    roles = algorithm.roles(model)
    partial = set(partial)
    if not partial:
        return roles
    return RoleMap({k: (Role.TIERED if r == Role.SHARED and k in partial else r) for k, r in roles.roles.items()})


def build_structure(source: ModelSource, info: DatasetInfo, seed: int, algorithm: Algorithm, structure: Structure, *,
                    peft: Optional[PeftConfig] = None, partial_keys: Iterable[str] = ()) -> tuple[nn.Module, RoleMap]:
    """A model for ``structure`` and its role map (see the module docstring).

    Args:
        source: ``config.model`` or a ``model_factory(info) -> nn.Module``.
        info: the data's :class:`~rayfed.data.info.DatasetInfo`.
        seed: the run's seed (initial weights, and the RNG under which the model is prepared).
        algorithm: the algorithm whose ``prepare_model`` and role rules apply.
        structure: the client structure to build.
        peft: ``config.model.peft`` (ignored for a factory's model unless given).
        partial_keys: tensors only some structures hold; ``shared`` ones among them become ``tiered``.

    Returns:
        ``(model, roles)``: the model on CPU in train mode.
    """
    model = _base_model(source, info, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) + 0x5EED)
        model = algorithm.prepare_model(model, structure, peft, info)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{type(algorithm).__name__}.prepare_model must return a torch.nn.Module, got "
                          f"{type(model).__name__}")
    return model.to("cpu").train(), _roles(algorithm, model, partial_keys)


def structure_keys(models: Mapping[Structure, tuple[nn.Module, RoleMap]]) -> frozenset[str]:
    """Server-held tensors that some structures hold and others do not (averaged over their holders)."""
    held = [frozenset(roles.names(*SERVER_HELD)) for _, roles in models.values()]
    if len(held) < 2:
        return frozenset()
    return frozenset(set().union(*held) - frozenset.intersection(*held))


def check_structures(plan: RunPlan, source: ModelSource, info: DatasetInfo, seed: int, algorithm: Algorithm, *,
                     peft: Optional[PeftConfig] = None) -> dict[Structure, RoleMap]:
    """Build the server's model and every client structure's once (on the driver, before any actor
    starts), check that each structure's server-held tensors are tensors of the server's model with
    the same shapes, and record in the plan the tensors only some structures hold
    (``partial_keys``) and what each structure uploads (``upload_keys``, ``upload_shapes``).

    Returns:
        The role map of each structure and of ``plan.union`` (which tiers became ``tiered``).

    Raises:
        ConfigError: a structure cannot be built, or holds a server-held tensor the server's model
            lacks or shapes differently (a ``prepare_model`` that renames or reshapes shared tensors).
    """
    built = {s: build_structure(source, info, seed, algorithm, s, peft=peft)
             for s in dict.fromkeys([plan.union, *plan.structures])}
    union_model, union_roles = built[plan.union]
    held = set(union_roles.names(*SERVER_HELD))
    server = {k: tuple(v.shape) for k, v in union_model.state_dict().items() if k in held}
    for s, (model, roles) in built.items():
        sd = model.state_dict()
        for k in roles.names(*SERVER_HELD):
            if k not in server or server[k] != tuple(sd[k].shape):
                got = "missing" if k not in server else f"shaped {list(server[k])}"
                raise ConfigError(f"clients of structure '{s.label()}' hold the tensor {k!r} (shape "
                                  f"{list(sd[k].shape)}) that the server's model (structure '{plan.union.label()}') "
                                  f"has {got}; {type(algorithm).__name__}.prepare_model must keep the names and shapes "
                                  "of server-held tensors the same in every structure")
    plan.partial_keys = structure_keys(built)
    roles = {s: _roles(algorithm, model, plan.partial_keys) for s, (model, _) in built.items()}
    for s, (model, _) in built.items():
        keys = algorithm.upload_keys(model, roles[s])
        plan.upload_keys[s] = frozenset(keys)
        sd = model.state_dict()
        for k in keys:
            plan.upload_shapes.setdefault(k, (tuple(sd[k].shape), _np_dtype(sd[k].dtype)))
    return roles


def _np_dtype(dtype: torch.dtype) -> Any:
    import numpy as np

    return np.dtype(str(dtype).replace("torch.", ""))
