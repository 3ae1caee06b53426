r"""Parameter roles: which tensor is shared, private, generated, masked, tiered or frozen.

Every method rayfed implements is an assignment of roles to the model's tensors (its state-dict
keys). Roles are explicit data, so one aggregation path serves every method, the bytes on the wire
are derived from what each role sends, and a test can prove that private tensors never reach the
server.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> roles = assign_roles(model, [(r"^2\.", Role.PRIVATE)])
    >>> roles.names(Role.PRIVATE)
    ['2.weight', '2.bias']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Union

import torch

from rayfed.errors import ConfigError

__all__ = ["SERVER_HELD", "TRAINED", "UPLOADABLE", "Role", "RoleMap", "Selector", "assign_roles", "select"]


class Role(str, Enum):
    """What happens to one tensor in federated training."""

    SHARED = "shared"  # aggregated on the server, sent to every client
    PRIVATE = "private"  # lives only in the client's state; never serialized to the server
    GENERATED = "generated"  # produced per client by the server (FedTP's hypernetwork)
    MASKED = "masked"  # shared, but each client trains and sends its own sparse subset (FedSpa)
    TIERED = "tiered"  # shared, held only by clients whose budget reaches it; mean over holders
    FROZEN = "frozen"  # pre-trained or non-trainable: never trained, never sent

    def __repr__(self) -> str:
        return f"Role.{self.name}"


#: Roles of the tensors the server holds, aggregates (each key over the clients that hold it) and
#: sends back: the server's weights.
SERVER_HELD = frozenset({Role.SHARED, Role.MASKED, Role.TIERED})
#: Roles whose values may leave a client: the server's weights, and generated tensors (which go back
#: to their generator on the server, e.g. FedTP's hypernetwork, and are never averaged).
UPLOADABLE = SERVER_HELD | {Role.GENERATED}
#: Roles a client trains locally.
TRAINED = frozenset({Role.SHARED, Role.PRIVATE, Role.GENERATED, Role.MASKED, Role.TIERED})

Selector = Union[str, Callable[[torch.nn.Module], Iterable[str]]]


@dataclass(frozen=True)
class RoleMap:
    """An immutable mapping from state-dict key to :class:`Role`, in state-dict order."""

    roles: Mapping[str, Role] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Role:
        return self.roles[name]

    def __contains__(self, name: object) -> bool:
        return name in self.roles

    def __iter__(self):
        return iter(self.roles)

    def __len__(self) -> int:
        return len(self.roles)

    def names(self, *roles: Role) -> list[str]:
        """Keys holding any of ``roles`` (all keys when none given), in state-dict order."""
        if not roles:
            return list(self.roles)
        wanted = set(roles)
        return [k for k, r in self.roles.items() if r in wanted]

    def counts(self) -> dict[str, int]:
        """Number of keys per role (roles with none omitted)."""
        out: dict[str, int] = {}
        for r in self.roles.values():
            out[r.value] = out.get(r.value, 0) + 1
        return out


#: Substrings of PEFT adapter parameter names (LoRA, IA3, LoHa/LoKr, prompt and prefix tuning).
_ADAPTER_MARKERS = ("lora_", "ia3_", "hada_", "lokr_", "prompt_encoder", "prefix_encoder", "adapter")


def _adapter_names(model: torch.nn.Module) -> list[str]:
    """Trainable adapter tensors (PEFT's LoRA, IA3, LoHa, LoKr, prompt/prefix encoders, ``*adapter*``)."""
    return [n for n, _ in model.named_parameters() if any(s in n for s in _ADAPTER_MARKERS)]


def _norm_names(model: torch.nn.Module) -> list[str]:
    """Every tensor (affine parameters and running statistics) of normalisation layers (FedBN-style)."""
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, norm_types) or type(mod).__name__.endswith(("LayerNorm", "RMSNorm")):
            prefix = f"{mname}." if mname else ""
            out += [prefix + n for n, _ in mod.named_parameters(recurse=False)]
            out += [prefix + n for n, _ in mod.named_buffers(recurse=False)]
    return out


def _preset(model: torch.nn.Module, name: str) -> list[str]:
    from rayfed import models

    presets: dict[str, Callable[[torch.nn.Module], list[str]]] = {
        "head": models.head_parameter_names,
        "input": models.input_layer_parameter_names,
        "attention_qkv": lambda m: [p.weight for p in models.attention_projections(m)],
        "attention_qkv_bias": lambda m: [
            n for p in models.attention_projections(m) for n in (p.weight, p.bias) if n],
        "lora": lambda m: [n for n, _ in m.named_parameters() if "lora_" in n],
        "adapter": _adapter_names,
        "body": lambda m: [n for n in models.param_names(m) if n not in set(models.head_parameter_names(m))],
        "norm": _norm_names,
    }
    if name not in presets:
        raise ConfigError(f"unknown role preset {name!r}; valid presets: {', '.join(sorted(presets))} "
                          "(or a regular expression over parameter names, or 'type:ClassName')")
    return presets[name](model)


def select(model: torch.nn.Module, selector: Selector) -> list[str]:
    """State-dict keys picked by a selector.

    A selector is ``"preset:NAME"`` (head: the classifier head; body: every parameter but the
    head; input: the input layer / embeddings; norm: normalisation layers; lora: LoRA matrices;
    adapter: any PEFT adapter tensors; attention_qkv, attention_qkv_bias),
    ``"type:ClassName"`` (every tensor of modules of that class), a regular expression searched in
    each key, or a callable ``model -> names``.
    """
    keys = list(model.state_dict().keys())
    if callable(selector):
        picked = list(selector(model))
    elif selector.startswith("preset:"):
        picked = _preset(model, selector[len("preset:"):])
    elif selector.startswith("type:"):
        cls_name = selector[len("type:"):]
        picked = []
        for mname, mod in model.named_modules():
            if type(mod).__name__ == cls_name:
                prefix = f"{mname}." if mname else ""
                picked += [prefix + n for n, _ in mod.named_parameters(recurse=False)]
                picked += [prefix + n for n, _ in mod.named_buffers(recurse=False)]
    else:
        try:
            rx = re.compile(selector)
        except re.error as e:
            raise ConfigError(f"role selector {selector!r} is not a valid regular expression: {e}") from e
        picked = [k for k in keys if rx.search(k)]
    keyset = set(keys)
    return [k for k in picked if k in keyset]


def assign_roles(
    model: torch.nn.Module,
    rules: Sequence[tuple[Selector, Role]] = (),
    *,
    default: Role = Role.SHARED,
    strict: bool = True,
) -> RoleMap:
    """Build a :class:`RoleMap` for ``model``.

    Trainable float parameters start as ``default``; parameters with ``requires_grad=False`` and
    integer buffers start as ``FROZEN``; float buffers (e.g. norm statistics) start as ``default``
    too. Then each ``(selector, role)`` rule is applied in order; a later rule overrides an earlier
    one.

    Args:
        model: the model whose state-dict keys get roles.
        rules: ``(selector, role)`` pairs; see :func:`select` for selectors.
        default: the role of trainable tensors no rule names.
        strict: raise :class:`ConfigError` when a rule matches nothing (usually a typo).
    """
    # every name of a parameter, aliases included: a state-dict key that aliases a frozen parameter (PEFT
    # prompt tuning's ``word_embeddings.weight``, tied weights) is that parameter, not a float buffer
    params = dict(model.named_parameters(remove_duplicate=False))
    roles: dict[str, Role] = {}
    for k, t in model.state_dict().items():
        p = params.get(k)
        if p is not None:
            roles[k] = default if p.requires_grad else Role.FROZEN
        else:
            roles[k] = default if t.is_floating_point() else Role.FROZEN
    for selector, role in rules:
        hit = select(model, selector)
        if strict and not hit:
            sample = ", ".join(list(roles)[:6])
            raise ConfigError(f"role rule {selector!r} -> {role.value} matches no parameter; parameter names "
                              f"look like: {sample} ...")
        for k in hit:
            roles[k] = Role(role)
    return RoleMap(roles)
