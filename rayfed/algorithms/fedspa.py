r"""FedSpa: each client's model is its own sparse mask over one shared weight vector.

Huang, Liu, Shen, He, Lin, Tao. *Achieving Personalized Federated Learning with Sparse Local
Models.* arXiv 2201.11380 (2022). The paper has no public code; the mask mechanics follow its
sibling DisPFL (Dai, Shen, He, Tian, Tao. *DisPFL: Towards Communication-Efficient Personalized
Federated Learning via Decentralized Sparse Training.* ICML 2022, arXiv 2206.00187; code
rong-dai/DisPFL) and RigL (Evci, Gale, Menick, Castro, Elsen. *Rigging the Lottery: Making All
Tickets Winners.* ICML 2020, arXiv 1911.11134).

**Roles.** The tensors picked by ``algorithm.masked`` (default: every ``Linear`` and ``Conv`` weight,
i.e. the transformer's projections and MLPs, the patch embedding and the head) with at least
``mask_min_ndim`` dimensions are ``masked``: the server holds one dense weight vector ``w``, and
client ``k``'s model is ``m_k * w`` with a binary mask ``m_k`` that lives in the client's private
state (``ClientState.masks``). Biases, norms and embeddings stay ``shared`` and dense;
``algorithm.private`` and ``algorithm.frozen`` apply first (a private or frozen tensor is never
masked).

**A round, client k** (round ``t``, ``T = anneal_rounds``):

1. *Download*: the dense shared tensors (the broadcast) and, per masked tensor, a
   :class:`~rayfed.tensors.SparseTensor` of ``w`` at the positions the server knows for this
   client (values plus a bitmap or index: its own masked slice, nothing else).
2. *Train only active weights*: a gradient hook multiplies every masked tensor's gradient by its
   mask, so off-mask gradients are exactly zero; off-mask weights start at zero and stay exactly
   zero, since SGD (with momentum and weight decay), Adam and AdamW all map a zero gradient of a
   zero weight to a zero step (tested).
3. *Upload* the trained values at the mask's positions (a ``SparseTensor``) and the dense rest.
4. *Evolve the mask* (``evolve``): per masked tensor, prune ``floor(a_t * active)`` active
   weights of smallest magnitude and regrow as many inactive positions with the largest gradient
   magnitude, from one dense batch at the trained weights (``regrow: gradient``), or uniformly
   at random (``regrow: random``); ``a_t = (anneal / 2) (1 + cos(pi min(t, T) / T))``. The
   tensor's number of active entries, so the density, is unchanged.

**Server.** Each coordinate of a masked tensor is the sample-weighted mean over the clients whose
upload holds it (no dilution by zeros); a coordinate no sampled client holds keeps its value
(:class:`~rayfed.aggregate.StreamingMean`). The server records the positions of each client's
upload: that record is all it ever learns of a mask, and it is what the client's next download
is cut to.

**Choices** (the paper leaves these open; each is an option or documented here):

* *First download.* The server draws every client's initial mask from the run's seed (layer
  densities by Erdos-Renyi-kernel, :func:`erk_densities`; positions uniformly at random per
  tensor, :func:`initial_masks`; one mask for all with ``same_init_mask``) and cuts a client it
  has never heard from to that mask; the client adopts the positions of its first download as
  its mask. So the first download is as sparse as every later one, and the only mask the server
  knows without an upload is one it drew itself from public randomness.
* *Which mask the upload covers* (``upload_mask``). The paper's server knows each client's evolved
  mask and averages its trained update; under the rule that the server learns a mask only as the
  positions of an upload, one upload cannot give both. ``trained`` (default): the upload holds
  exactly the positions that were trained, so every value the server averages is a trained one;
  the server's record lags the client's mask by one evolution: the next download is cut to the
  upload's positions, the client zeroes the pruned ones with its mask on arrival, and the regrown
  ones, which the server does not know, start from zero (RigL's initialisation of grown
  connections). ``evolved``: the upload covers the evolved mask (step 4 before step 3): the
  pruned weights' trained values are not sent, the regrown ones are sent as their value, zero,
  and averaged as such; the next download is exactly the client's mask, regrown positions
  included, at the server's values.
* *Regrow candidates*: the positions inactive before pruning (so the mask changes by exactly
  ``a_t`` of its entries where there is room); ``regrow_pruned`` lets the just-pruned compete
  too, as DisPFL's code does. A dense tensor (ERK density 1) has no candidates and does not
  change. Ties (equal magnitudes or gradients) go to the lower flat position.
* *The gradient batch*: one mini-batch (``grad_batch_size``, default ``train.batch_size``) of the
  client's training split, drawn with its seeded generator after training; the model in eval
  mode (no dropout noise, as DisPFL's ``screen_gradients``); the loss of the data's task.
* *The schedule's T* is ``anneal_rounds``, by default the run's ``rounds`` (rounds after T use
  ``a_T = 0``).
* *Initial active count* per tensor: ``round(density_l * size)``, at least 1, so the global
  density is as configured up to half an entry per tensor.
* *FLOPs* (:func:`training_flops`): the multiply-adds of the masked ``Linear``/``Conv`` layers'
  weights, each entry counted once per position it is applied to (per token for a ViT's
  ``Linear``, per output pixel for a convolution), measured with forward hooks on one sample.
  Training costs ``3 f`` per sample (forward, input gradient, weight gradient), RigL's
  convention, over the samples of the round's steps; the gradient batch of the mask update costs
  ``2 f_S + f_D`` per sample (sparse forward and input gradient, dense weight gradient). Work
  outside those layers (attention scores, softmax, norms, biases) is left out of both sides, so
  ``flops_relative`` is the ratio for the masked layers.

Not supported: clients with different model structures (``data.tiers``, tasks held by some
clients only: one mask over one weight vector needs one shape per tensor) and multi-task data.
With a robust ``aggregation.rule`` the runtime aggregates only the dense shared tensors robustly;
the masked ones are still averaged over their holders.

Example:
    >>> from rayfed.config import from_dict
    >>> cfg = from_dict({"algorithm": {"name": "fedspa", "density": 0.3, "regrow": "random"}})
    >>> cfg.algorithm.density, cfg.algorithm.regrow, cfg.algorithm.anneal
    (0.3, 'random', 0.5)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional

import numpy as np
import torch

from rayfed.algorithms.base import Algorithm, ClientContext, ClientUpdate, MeanAggregator, ServerState
from rayfed.config import AlgorithmConfig, require
from rayfed.errors import ConfigError
from rayfed.models.views import named_params, set_mode, tensors
from rayfed.roles import Role, RoleMap, select
from rayfed.tensors import SparseTensor, is_sparse

if TYPE_CHECKING:
    from rayfed.clients import ClientSpec

__all__ = [
    "FedSpa",
    "FedSpaAggregator",
    "FedSpaConfig",
    "anneal_rate",
    "erk_densities",
    "initial_masks",
    "layer_uses",
    "masked_gradients",
    "prune_and_regrow",
    "samples_seen",
    "training_flops",
]

#: ``ServerState.extra`` key: the masked tensors' names, in state-dict order
MASKED_KEYS = "fedspa_masked"
#: ``ServerState.extra`` key: each masked tensor's initial density (ERK or uniform)
DENSITIES = "fedspa_densities"
#: ``ServerState.extra`` key: the seed the initial masks are drawn from
MASK_SEED = "fedspa_mask_seed"
#: ``ServerState.extra`` key: client id -> masked tensor -> packed bits of its last upload's positions
POSITIONS = "fedspa_positions"


@dataclass
class FedSpaConfig(AlgorithmConfig):
    """FedSpa options (local training itself uses the ``train`` section)."""

    name: str = "fedspa"
    density: float = field(default=0.5, metadata={
        "help": "fraction of the masked tensors' entries each client holds, trains and exchanges (global density)"})
    distribution: Literal["erk", "uniform"] = field(default="erk", metadata={
        "help": "layer densities: erk (Erdos-Renyi-kernel: density ~ (sum of dims) / (product of dims), scaled to "
                "the global density, layers above 1 made dense) or uniform (every tensor at the global density)"})
    erk_power: float = field(default=1.0, metadata={
        "help": "exponent of the ERK score (sum of dims / product of dims) ** erk_power; 1 = RigL's ERK"})
    masked: list[str] = field(default_factory=lambda: ["type:Linear", "type:Conv1d", "type:Conv2d"], metadata={
        "help": "selectors of the masked tensors (see rayfed.roles.select); only shared tensors with at least "
                "mask_min_ndim dimensions are masked"})
    mask_min_ndim: int = field(default=2, metadata={
        "help": "masked tensors need at least this many dimensions: 2 = weight matrices and kernels (biases and "
                "norms stay dense); 1 = biases too"})
    same_init_mask: bool = field(default=False, metadata={
        "help": "every client starts from the same random mask (DisPFL's default) instead of its own"})
    evolve: bool = field(default=True, metadata={
        "help": "prune and regrow each client's mask after local training; false = the fixed random masks of "
                "the ablation (sub-FedAvg-style: sparse training, no mask search)"})
    anneal: float = field(default=0.5, metadata={
        "help": "a_0: the fraction of active weights replaced in round 0; a_t = (anneal/2)(1 + cos(pi t / T))"})
    anneal_rounds: Optional[int] = field(default=None, metadata={
        "help": "T of the schedule; null = the run's rounds (later rounds use a_T = 0)"})
    regrow: Literal["gradient", "random"] = field(default="gradient", metadata={
        "help": "regrow the inactive positions of largest gradient magnitude on one dense batch, or at random"})
    regrow_pruned: bool = field(default=False, metadata={
        "help": "let the just-pruned positions be regrown too (DisPFL's code); false = only those inactive "
                "before pruning, so the mask changes by exactly a_t of its entries"})
    upload_mask: Literal["trained", "evolved"] = field(default="trained", metadata={
        "help": "positions the upload covers, and so the server's record of the mask: trained (the mask just "
                "trained; the next download lags the evolution, regrown weights restart at 0) or evolved (the "
                "mask after prune/regrow; pruned values are not sent, regrown ones are sent as 0)"})
    grad_batch_size: Optional[int] = field(default=None, metadata={
        "help": "samples of the dense gradient batch of regrow=gradient; null = train.batch_size"})

    def __post_init__(self) -> None:
        require(0 < self.density <= 1, "algorithm.density", self.density, "a fraction in (0, 1], e.g. 0.5")
        require(self.erk_power >= 0, "algorithm.erk_power", self.erk_power, "a number >= 0 (1 = RigL's ERK)")
        require(self.mask_min_ndim >= 1, "algorithm.mask_min_ndim", self.mask_min_ndim, "an integer >= 1")
        require(0 <= self.anneal <= 1, "algorithm.anneal", self.anneal, "a fraction in [0, 1] (the paper: 0.5)")
        if self.anneal_rounds is not None:
            require(self.anneal_rounds >= 1, "algorithm.anneal_rounds", self.anneal_rounds,
                    "an integer >= 1, or null for the run's rounds")
        if self.grad_batch_size is not None:
            require(self.grad_batch_size >= 1, "algorithm.grad_batch_size", self.grad_batch_size,
                    "an integer >= 1 or null")
        if not self.masked:
            raise ConfigError("config key 'algorithm.masked': fedspa needs at least one selector of masked tensors, "
                              "got []; e.g. ['type:Linear'] (or use algorithm.name=fedavg for dense training)")


# ---------------------------------------------------------------------------------------------
# mask maths (pure functions, tested against hand numbers)
# ---------------------------------------------------------------------------------------------


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float, *, distribution: str = "erk",
                  power: float = 1.0) -> dict[str, float]:
    """Per-tensor densities whose size-weighted mean is ``density``.

    ERK (RigL's Erdos-Renyi-kernel): tensor ``l`` of shape ``(n_out, n_in[, k_1, ...])`` gets
    ``eps * (sum(shape) / prod(shape)) ** power``, with one ``eps`` for all chosen so the active
    entries total ``density * sum(sizes)``; a tensor that would exceed density 1 is made dense
    (the one with the largest score first, as RigL does) and ``eps`` is found again.

    Args:
        shapes: tensor name -> shape.
        density: the global density, in (0, 1].
        distribution: ``"erk"`` or ``"uniform"`` (every tensor at ``density``).
        power: the exponent of the ERK score.

    Returns:
        Tensor name -> density in (0, 1], in the order of ``shapes``.

    Example:
        >>> d = erk_densities({"a": (8, 4), "b": (2, 8)}, 0.5)  # scores 12/32 and 10/16; eps = 24/22
        >>> round(d["a"], 4), round(d["b"], 4)
        (0.4091, 0.6818)
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    sizes = {k: math.prod(int(d) for d in s) for k, s in shapes.items()}
    if distribution == "uniform":
        return {k: float(density) for k in shapes}
    if distribution != "erk":
        raise ValueError(f"distribution must be 'erk' or 'uniform', got {distribution!r}")
    score = {k: (sum(int(d) for d in s) / sizes[k]) ** power for k, s in shapes.items()}
    dense: set[str] = set()
    eps = 0.0
    while True:
        free = [k for k in shapes if k not in dense]
        if not free:
            break
        rhs = density * sum(sizes[k] for k in free) - (1 - density) * sum(sizes[k] for k in dense)
        eps = rhs / sum(score[k] * sizes[k] for k in free)
        top = max(score[k] for k in free)
        if eps * top <= 1:
            break
        dense.update(k for k in free if score[k] == top)
    return {k: 1.0 if k in dense else float(eps * score[k]) for k in shapes}


def initial_masks(shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float], seed: int,
                  client_id: Optional[int] = None) -> dict[str, np.ndarray]:
    """Random masks at the given densities: ``round(density * size)`` (at least 1) positions per
    tensor, uniformly at random, from a generator seeded by ``(seed, client, tensor name)``.

    Args:
        shapes: tensor name -> shape.
        densities: tensor name -> density (e.g. from :func:`erk_densities`).
        seed: the run's seed.
        client_id: the client; ``None`` gives the mask every client shares (``same_init_mask``).

    Returns:
        Tensor name -> boolean array of its shape.

    Example:
        >>> m = initial_masks({"w": (4, 5)}, {"w": 0.5}, seed=0, client_id=3)
        >>> int(m["w"].sum()), m["w"].shape
        (10, (4, 5))
    """
    who = 0 if client_id is None else int(client_id) + 1
    out = {}
    for k, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        size = math.prod(shape)
        active = min(size, max(1, int(math.floor(densities[k] * size + 0.5))))
        rng = np.random.default_rng([int(seed) % 2**63, who, zlib.crc32(k.encode())])
        flat = np.zeros(size, dtype=bool)
        flat[rng.choice(size, active, replace=False)] = True
        out[k] = flat.reshape(shape)
    return out


def anneal_rate(round: int, total_rounds: int, anneal: float) -> float:
    """FedSpa's (and DisPFL's) cosine schedule of the fraction of active weights replaced:
    ``(anneal / 2) (1 + cos(pi min(round, T) / T))`` with ``T = total_rounds``.

    Example:
        >>> [anneal_rate(t, 4, 0.5) for t in (0, 2, 4, 9)]
        [0.5, 0.25, 0.0, 0.0]
    """
    t = min(max(int(round), 0), total_rounds)
    return max(0.0, float(anneal / 2 * (1 + math.cos(math.pi * t / total_rounds))))


def prune_and_regrow(weight: torch.Tensor, mask: torch.Tensor, rate: float, *, scores: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None, regrow_pruned: bool = False) -> torch.Tensor:
    """One mask update: prune ``floor(rate * active)`` active entries of smallest ``|weight|`` and
    regrow as many candidates, those of largest ``scores`` (e.g. ``|gradient|``) or, without
    scores, uniformly at random with ``generator``. The number of active entries is unchanged.

    Candidates are the entries inactive before pruning (``regrow_pruned`` adds the just-pruned
    ones); where there are fewer candidates than ``floor(rate * active)``, only that many entries
    are swapped. Ties go to the lower flat position.

    Args:
        weight: the trained tensor.
        mask: its boolean mask (same shape).
        rate: the fraction ``a_t`` of active entries to replace, in [0, 1].
        scores: the regrowth score per entry (same shape), or ``None`` for random regrowth.
        generator: the generator of random regrowth.
        regrow_pruned: whether just-pruned entries may be regrown.

    Returns:
        The new boolean mask (a new tensor).

    Example:
        >>> w = torch.tensor([0.5, -0.1, 0.0, 0.3, 0.0, -0.2, 0.0, 0.0])
        >>> m = w != 0
        >>> g = torch.tensor([0.0, 0.0, 0.9, 0.0, -0.05, 0.0, 0.4, -0.7])
        >>> prune_and_regrow(w, m, 0.5, scores=g.abs()).nonzero().flatten().tolist()
        [0, 2, 3, 7]
    """
    flat_m = mask.reshape(-1).to(torch.bool)
    active = int(flat_m.sum())
    k = int(math.floor(rate * active + 1e-9))
    room = flat_m.numel() - active + (k if regrow_pruned else 0)
    k = min(k, room)
    new = flat_m.clone()
    if k <= 0:
        return new.reshape(mask.shape)
    w = weight.detach().reshape(-1).abs().to(torch.float64)
    w = torch.where(flat_m, w, torch.full_like(w, math.inf))
    pruned = torch.sort(w, stable=True).indices[:k]
    new[pruned] = False
    candidates = ~new if regrow_pruned else ~flat_m
    if scores is not None:
        s = scores.detach().reshape(-1).to(torch.float64)
        s = torch.where(candidates, s, torch.full_like(s, -math.inf))
        grown = torch.sort(s, descending=True, stable=True).indices[:k]
    else:
        pool = candidates.nonzero().flatten()
        pick = torch.randperm(pool.numel(), generator=generator)[:k].to(pool.device)
        grown = pool[pick]
    new[grown] = True
    return new.reshape(mask.shape)


@contextmanager
def masked_gradients(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, every gradient of a masked parameter is multiplied by its mask (a tensor
    hook, removed on exit), so backward leaves exactly zero off the mask.

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> with masked_gradients(lin, {"weight": torch.tensor([[True, False]])}):
        ...     lin(torch.ones(1, 2)).sum().backward()
        >>> lin.weight.grad.tolist()
        [[1.0, 0.0]]
    """
    params = dict(named_params(model))
    handles = []
    try:
        for k, m in masks.items():
            p = params.get(k)
            if p is None or not p.requires_grad:  # a buffer or frozen tensor: nothing trains it
                continue
            keep = m.to(device=p.device, dtype=p.dtype)
            handles.append(p.register_hook(lambda g, keep=keep: g * keep))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# FLOPs of local training
# ---------------------------------------------------------------------------------------------


def layer_uses(model: torch.nn.Module, keys: Sequence[str], x: torch.Tensor | Mapping[str, torch.Tensor],
               ) -> dict[str, float]:
    """Per sample, how many positions each weight in ``keys`` is applied to (one forward of ``x``
    with hooks): the tokens a ``Linear`` sees, the output pixels of a convolution. Weights of
    other modules (embeddings, attention parameters) map to 0: they are not counted.
    """
    from rayfed.models import forward_logits

    conv = torch.nn.modules.conv._ConvNd
    uses = dict.fromkeys(keys, 0.0)
    handles = []
    n = len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)
    for k in keys:
        owner, _, leaf = k.rpartition(".")
        try:
            mod = model.get_submodule(owner)
        except AttributeError:
            continue
        if leaf != "weight" or not isinstance(mod, (torch.nn.Linear, conv)):
            continue
        channel = -1 if isinstance(mod, torch.nn.Linear) else 1

        def hook(_m, _inp, out, k=k, channel=channel):
            uses[k] += out.numel() / out.shape[channel] / n

        handles.append(mod.register_forward_hook(hook))
    was = model.training
    try:
        set_mode(model, False)
        with torch.no_grad():
            forward_logits(model, x)
    finally:
        for h in handles:
            h.remove()
        set_mode(model, was)
    return uses


def samples_seen(num_samples: int, batch_size: int, steps: int) -> int:
    """Samples that ``steps`` optimizer steps of shuffled epochs over ``num_samples`` process
    (the last batch of an epoch is short), as :func:`rayfed.training.train_epochs` takes them.

    Example:
        >>> samples_seen(10, 4, 4)  # batches 4, 4, 2, then 4
        14
    """
    if num_samples <= 0 or steps <= 0:
        return 0
    per_epoch = math.ceil(num_samples / batch_size)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * num_samples + min(rest * batch_size, num_samples)


def training_flops(uses: Mapping[str, float], active: Mapping[str, int], sizes: Mapping[str, int], *,
                   samples: int, grad_samples: int = 0) -> tuple[float, float]:
    """Multiply-add FLOPs of local training in the counted layers: sparse, and dense for the same steps.

    ``f_S = sum_l 2 active_l uses_l`` and ``f_D = sum_l 2 size_l uses_l`` per sample (forward);
    training takes ``3 f`` per sample, the gradient batch of the mask update ``2 f_S + f_D``.

    Returns:
        ``(sparse, dense)``: FedSpa's FLOPs (``3 f_S samples + (2 f_S + f_D) grad_samples``) and
        those of dense training on the same samples (``3 f_D samples``).

    Example:
        >>> training_flops({"w": 1.0}, {"w": 5}, {"w": 10}, samples=2, grad_samples=1)  # f_S 10, f_D 20
        (100.0, 120.0)
    """
    f_s = sum(2.0 * active[k] * u for k, u in uses.items())
    f_d = sum(2.0 * sizes[k] * u for k, u in uses.items())
    return 3 * f_s * samples + (2 * f_s + f_d) * grad_samples, 3 * f_d * samples


# ---------------------------------------------------------------------------------------------
# the algorithm
# ---------------------------------------------------------------------------------------------


def _bits(value) -> np.ndarray:
    """The positions of an uploaded masked tensor as packed bits (a dense value holds them all)."""
    if is_sparse(value):
        return value.index.copy() if value.encoding == "bitmap" else np.packbits(value.mask().reshape(-1))
    return np.packbits(np.ones(np.asarray(value).size, dtype=bool))


class FedSpaAggregator(MeanAggregator):
    """The holder mean of :class:`~rayfed.algorithms.MeanAggregator`, and a record of the positions
    of each client's masked upload (what the client's next download is cut to).
    """

    def __init__(self, state: ServerState) -> None:
        super().__init__(state)
        self.positions: dict[int, dict[str, np.ndarray]] = {}

    def add(self, update: ClientUpdate) -> None:
        super().add(update)
        held = {k: _bits(update.tensors[k]) for k in self.state.extra[MASKED_KEYS] if k in update.tensors}
        if held:
            self.positions[update.client_id] = held

    def finish(self) -> ServerState:
        new = super().finish()
        record = dict(new.extra.get(POSITIONS, {}))
        record.update(self.positions)
        return ServerState(new.weights, {**new.extra, POSITIONS: record}, new.round)


class FedSpa(Algorithm):
    """Personalized sparse masks, trained sparse-to-sparse and evolved by prune and regrow (see the
    module docstring).
    """

    name = "fedspa"
    config_class = FedSpaConfig
    supports_multitask = False  # one gradient batch of one task; masks need one structure anyway
    config: FedSpaConfig

    # -- clients and roles ---------------------------------------------------------------------
    def client_specs(self, specs: dict[int, ClientSpec], seed: int) -> dict[int, ClientSpec]:
        """As given, after checking that every client has the same model structure (one mask per
        tensor over one shared weight vector needs one shape per tensor).
        """
        structures = {s.structure for s in specs.values()}
        if len(structures) > 1:
            labels = sorted(s.label() or "the full model" for s in structures)
            raise ConfigError(f"config key 'data.tiers': fedspa draws every client's mask over one weight vector, so "
                              f"every client needs the same model structure; got {len(structures)} ({labels}); leave "
                              "data.tiers empty (and give every task of data.tasks to every client)")
        return specs

    def roles(self, model: torch.nn.Module) -> RoleMap:
        """The base roles (``private``, ``frozen``), then the shared tensors ``masked`` picks with at
        least ``mask_min_ndim`` dimensions become ``masked``.
        """
        base = super().roles(model)
        sd = model.state_dict()
        params = {n for n, _ in model.named_parameters()}  # a mask shapes what training touches: parameters only
        picked = {k for s in self.config.masked for k in select(model, s)}
        roles = dict(base.roles)
        for k in picked:
            if roles[k] == Role.SHARED and k in params and sd[k].dim() >= self.config.mask_min_ndim:
                roles[k] = Role.MASKED
        if Role.MASKED not in roles.values():
            raise ConfigError(f"config key 'algorithm.masked': {self.config.masked} picks no shared tensor with at "
                              f">= {self.config.mask_min_ndim} dimensions (algorithm.mask_min_ndim); parameter names "
                              f"look like: {', '.join(list(sd)[:6])} ...")
        return RoleMap(roles)

    # -- server ---------------------------------------------------------------------------------
    def init_server(self, model: torch.nn.Module, roles: RoleMap, client_sizes: Mapping[int, int],
                    seed: int) -> ServerState:
        state = super().init_server(model, roles, client_sizes, seed)
        masked = roles.names(Role.MASKED)
        shapes = {k: state.weights[k].shape for k in masked}
        cfg = self.config
        state.extra.update({
            MASKED_KEYS: masked,
            DENSITIES: erk_densities(shapes, cfg.density, distribution=cfg.distribution, power=cfg.erk_power),
            MASK_SEED: int(seed),
            POSITIONS: {},
        })
        return state

    def broadcast(self, state: ServerState, round: int) -> dict[str, np.ndarray]:
        """The dense shared tensors only: masked ones go to each client as its own slice."""
        masked = set(state.extra[MASKED_KEYS])
        return {k: v for k, v in state.weights.items() if k not in masked}

    def server_masks(self, state: ServerState, client_id: int) -> dict[str, np.ndarray]:
        """The mask the server knows for a client: its last upload's positions, else the initial
        mask it drew for it (boolean arrays by tensor name).
        """
        known = state.extra[POSITIONS].get(client_id)
        masked = state.extra[MASKED_KEYS]
        shapes = {k: state.weights[k].shape for k in masked}
        if known is None:
            who = None if self.config.same_init_mask else client_id
            return initial_masks(shapes, state.extra[DENSITIES], state.extra[MASK_SEED], who)
        return {k: np.unpackbits(known[k], count=math.prod(s)).view(bool).reshape(s) for k, s in shapes.items()}

    def payloads(self, state: ServerState, client_ids: list[int], round: int,
                 ) -> dict[int, dict[str, SparseTensor]]:
        """Each client's masked slice: ``w`` at the positions :meth:`server_masks` gives."""
        w = state.weights
        return {c: {k: SparseTensor.from_dense(w[k], m) for k, m in self.server_masks(state, c).items()}
                for c in client_ids}

    def aggregator(self, state: ServerState, round: int) -> FedSpaAggregator:
        return FedSpaAggregator(state)

    # -- client ---------------------------------------------------------------------------------
    def load_client_model(self, model: torch.nn.Module, roles: RoleMap, broadcast, payload, state) -> None:
        """A client without a mask yet adopts the positions of its first download (the initial mask
        the server drew for it); then the base loading (slice, zeros off the mask).
        """
        sd = tensors(model)
        for k in roles.names(Role.MASKED):
            if k in state.masks:
                continue
            v = payload.get(k)
            if not is_sparse(v):
                raise RuntimeError(f"fedspa: client {state.client_id} has no mask for {k!r} yet and its download "
                                   f"holds {type(v).__name__} instead of its sparse slice")
            state.masks[k] = torch.from_numpy(v.mask()).to(sd[k].device)
        super().load_client_model(model, roles, broadcast, payload, state)

    def local_update(self, ctx: ClientContext) -> tuple[dict, dict[str, float]]:
        from rayfed.training import to_tensors, train_client

        cfg, model, masks = self.config, ctx.model, ctx.state.masks
        with masked_gradients(model, masks):
            metrics = train_client(model, self.trained_names(ctx.roles), ctx.data, ctx.train, infos=ctx.tasks,
                                   generator=ctx.generator, device=ctx.device)
        # the positions of the upload are all the server learns of the mask: the trained ones, or the evolved ones
        upload = self.upload(ctx) if cfg.upload_mask == "trained" else None
        task = ctx.data.only_task()
        x, y = to_tensors(task.x_train, task.y_train, ctx.device)
        sd = tensors(model)
        keys = list(masks)
        active = {k: int(masks[k].sum()) for k in keys}
        sizes = {k: masks[k].numel() for k in keys}
        uses = layer_uses(model, keys, {m: v[:1] for m, v in x.items()} if isinstance(x, Mapping) else x[:1])
        grad_samples = 0
        turnover = 0
        horizon = cfg.anneal_rounds if cfg.anneal_rounds is not None else max(ctx.num_rounds, 1)
        rate = anneal_rate(ctx.round, horizon, cfg.anneal) if cfg.evolve else 0.0
        if cfg.evolve:
            grads = None
            if cfg.regrow == "gradient":
                grads, grad_samples = self._dense_gradient(ctx, keys, x, y)
            for k in keys:
                new = prune_and_regrow(sd[k], masks[k], rate, scores=None if grads is None else grads[k].abs(),
                                       generator=ctx.generator, regrow_pruned=cfg.regrow_pruned)
                turnover += int((new & ~masks[k]).sum())
                masks[k] = new
        if upload is None:
            upload = self.upload(ctx)  # regrown weights were not trained: they go as their value, 0
        for _, p in named_params(model):  # the masked gradients of training are no state of the model
            p.grad = None
        steps = int(metrics.get("steps", 0))
        sparse, dense = training_flops(uses, active, sizes, grad_samples=grad_samples,
                                       samples=samples_seen(len(y), ctx.train.batch_size, steps))
        f_s = sum(active[k] * u for k, u in uses.items())
        f_d = sum(sizes[k] * u for k, u in uses.items())
        total_active = sum(active.values())
        metrics.update(density=total_active / max(sum(sizes.values()), 1), anneal_rate=rate,
                       mask_turnover=turnover / max(total_active, 1), train_flops=sparse, train_flops_dense=dense,
                       flops_relative=sparse / dense if dense else float("nan"),
                       inference_flops_relative=f_s / f_d if f_d else float("nan"))
        return upload, metrics

    def _dense_gradient(self, ctx: ClientContext, keys: list[str], x, y) -> tuple[dict[str, torch.Tensor], int]:
        """The gradient of the loss on one batch w.r.t. every masked tensor, at every position."""
        from rayfed.models import forward_logits
        from rayfed.training import batches, only_trainable, task_loss

        model = ctx.model
        size = self.config.grad_batch_size or ctx.train.batch_size
        xb, yb = next(batches(x, y, size, generator=ctx.generator))
        params = dict(named_params(model))
        set_mode(model, False)
        try:
            with only_trainable(model, keys):
                for k in keys:
                    params[k].grad = None
                task_loss(forward_logits(model, xb), yb).backward()
                grads = {k: params[k].grad.detach().clone() if params[k].grad is not None
                         else torch.zeros_like(params[k]) for k in keys}
        finally:
            set_mode(model, True)
        return grads, len(yb)


ALGORITHMS = (FedSpa,)
