"""Cached views of a model's tensors, parameters and modules, for the per-client hot path.

A client actor trains many clients per round on one model object, and each client's round walks
the module tree several times (``state_dict()`` to load and to upload, ``named_parameters()`` to
pick the trained tensors, ``train()``); on a small transformer those walks cost about as much as a
training step. The walks give the same tensors every time (weights are loaded with in-place
``copy_``), so they are taken once per model and cached here.

The cache assumes the model's structure is fixed once it is in use: build, wrap (PEFT) and move it
to its device first. Code that replaces modules, parameters or buffers afterwards calls
:func:`forget`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["forget", "named_params", "set_mode", "tensors"]


@dataclass
class _Views:
    tensors: dict[str, torch.Tensor]
    params: list[tuple[str, nn.Parameter]]
    modules: list[nn.Module]


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Views] = weakref.WeakKeyDictionary()


def _views(model: nn.Module) -> _Views:
    v = _CACHE.get(model)
    if v is None:
        v = _Views(dict(model.state_dict()), list(model.named_parameters()), list(model.modules()))
        _CACHE[model] = v
    return v


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` (detached tensors sharing the model's memory), taken once. Do not
    mutate the dict; write into its tensors (``copy_``) to change the model.
    """
    return _views(model).tensors


def named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``list(model.named_parameters())``, taken once."""
    return _views(model).params


def set_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)``, skipped when every module is already in that mode."""
    if any(m.training != training for m in _views(model).modules):
        model.train(training)


def forget(model: nn.Module) -> None:
    """Drop the cached views (after changing the model's modules, parameters or buffers)."""
    _CACHE.pop(model, None)
