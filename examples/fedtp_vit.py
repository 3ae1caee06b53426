"""FedTP with the official code's ViT (zhyczy/FedTP, ``models/vit.py``) as a rayfed model factory.

The official ViT (lucidrains' ``vit-pytorch`` shape) projects Q, K and V with one fused,
bias-free ``to_qkv = Linear(dim, 3 * heads * dim_head, bias=False)`` per block, and its
hypernetwork generates that fused weight (``transformer.layers.<d>.0.fn.to_qkv.weight``) whole.
This module rebuilds that ViT in plain PyTorch (no einops) with the same module names, so its
state-dict keys are the official ones, and points FedTP at the fused projection with
``algorithm.attention_patterns: {q: 'to_qkv$'}`` (one projection per layer, generated whole, as
the official ``ViTHyper`` does). The defaults are the official CIFAR shape (dim 128, 8 heads of
64, MLP 256, dropout 0.1; depth 6, the code's ``--depth`` default); patches of 4 pixels.

Run it (2 rounds on scikit-learn's digits with 10 clients, the paper's settings otherwise)::

    .venv/bin/python examples/fedtp_vit.py --rounds 2
    .venv/bin/python examples/fedtp_vit.py --rounds 50 --set data.source=mnist --set data.num_clients=50

From Python::

    from rayfed import Federation
    from rayfed.algorithms.fedtp import paper_config
    from fedtp_vit import ATTENTION_PATTERNS, official_vit
    cfg = paper_config({"data": {"source": "mnist"}, "algorithm": {"attention_patterns": ATTENTION_PATTERNS}})
    Federation(cfg, model_factory=official_vit).fit()
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import torch
from torch import nn

#: FedTP's ``algorithm.attention_patterns`` for this model: the fused projection, generated whole
ATTENTION_PATTERNS = {"q": r"to_qkv$"}


class PreNorm(nn.Module):
    """``fn(LayerNorm(x))``."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    """``Linear -> GELU -> Dropout -> Linear -> Dropout``."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention with the fused, bias-free Q/K/V projection ``to_qkv``."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        project = not (heads == 1 and dim_head == dim)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Transformer(nn.Module):
    """``depth`` pre-norm blocks: ``x + attn(x)``, then ``x + ff(x)``."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([PreNorm(dim, Attention(dim, heads, dim_head, dropout)),
                           PreNorm(dim, FeedForward(dim, mlp_dim, dropout))]) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class Patches(nn.Module):
    """``(B, C, H, W)`` -> ``(B, patches, p * p * C)`` in the official ``(p1 p2 c)`` order."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        p = self.patch
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)


class ViT(nn.Module):
    """The official FedTP ViT: patch embedding, class token, learned positions, pre-norm blocks,
    ``mlp_head = LayerNorm -> Linear`` on the class token.
    """

    def __init__(self, *, image_size: tuple[int, int], patch_size: int, num_classes: int, dim: int, depth: int,
                 heads: int, mlp_dim: int, channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
                 emb_dropout: float = 0.0) -> None:
        super().__init__()
        h, w = image_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch_size}")
        num_patches = (h // patch_size) * (w // patch_size)
        self.to_patch_embedding = nn.Sequential(Patches(patch_size), nn.Linear(channels * patch_size ** 2, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(img)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding[:, :x.shape[1] + 1]
        x = self.transformer(self.dropout(x))
        return self.mlp_head(x[:, 0])


def official_vit(info: Any, *, patch_size: int = 4, dim: int = 128, depth: int = 6, heads: int = 8,
                 dim_head: int = 64, mlp_dim: int = 256, dropout: float = 0.1) -> ViT:
    """A rayfed model factory: the official FedTP ViT for ``info``'s images.

    Args:
        info: the data set's :class:`~rayfed.data.info.DatasetInfo` (``feature_shape`` is
            ``(channels, height, width)``).
        patch_size: patch side in pixels (4 in the official code, for 32x32 CIFAR).
        dim: embedding width (128).
        depth: blocks (the code's ``--depth``, default 6).
        heads: attention heads (8).
        dim_head: width per head (64).
        mlp_dim: MLP width (256).
        dropout: dropout in the blocks and after the embeddings (0.1).

    Example:
        >>> from rayfed.data.info import DatasetInfo
        >>> m = official_vit(DatasetInfo(10, (3, 32, 32), "image"), depth=2)
        >>> qkv = m.transformer.layers[0][0].fn.to_qkv
        >>> tuple(qkv.weight.shape), qkv.bias
        ((1536, 128), None)
    """
    c, h, w = info.feature_shape
    return ViT(image_size=(h, w), patch_size=patch_size, num_classes=info.num_classes, dim=dim, depth=depth,
               heads=heads, mlp_dim=mlp_dim, channels=c, dim_head=dim_head, dropout=dropout, emb_dropout=dropout)


def main(argv: list[str] | None = None) -> int:
    """Run FedTP with this ViT and the paper's settings (see the module docstring); prints the accuracies."""
    from rayfed import Federation
    from rayfed.algorithms.fedtp import paper_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--depth", type=int, default=2, help="blocks (the official default is 6)")
    p.add_argument("--patch", type=int, default=2, help="patch size (2 for the 8x8 digits; 4 for 32x32 images)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args(argv)
    base = {"data": {"source": "digits", "num_clients": 10}, "runtime": {"executor": "local"},
            "output": {"plots": False, "progress": False},
            "algorithm": {"name": "fedtp", "attention_patterns": ATTENTION_PATTERNS}}
    # the official head generates 3 x 128 x 512 values per layer from 150 features: 29.5 M parameters
    # per layer, so the demo evaluates (generating every client's Q/K/V) only after the last round
    cfg = paper_config(base, [f"rounds={args.rounds}", f"eval_every={args.rounds}", *args.set])
    factory = functools.partial(official_vit, depth=args.depth, patch_size=args.patch)
    res = Federation(cfg, model_factory=factory, run_dir=False).fit()
    s = res.summary
    print(f"FedTP, official ViT (fused to_qkv, depth {args.depth}), paper settings, {cfg.rounds} rounds: "
          f"sample-weighted accuracy {s['accuracy_weighted']:.3f}, client mean {s['accuracy_mean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
