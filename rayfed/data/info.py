"""Plain records shared by data sources, models and the runtime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

__all__ = ["ClientData", "DatasetInfo"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model builder needs to know about the data.

    Attributes:
        num_classes: number of labels (labels are ``0 .. num_classes-1``).
        feature_shape: shape of one sample: ``(C, H, W)`` images, ``(L,)`` token ids, ``(d,)`` vectors.
        modality: ``"image"``, ``"text"`` or ``"vector"``.
        vocab_size: token vocabulary size (text only).
        task: ``"classification"`` (integer labels, cross-entropy, accuracy) or ``"regression"``
            (float targets, mean squared error; ``num_classes`` is then the number of outputs).
        private_features: for data built with client-specific trailing features (the
            ``partial_linear`` source), how many; ``model.name=linear`` reads them with its head.
    """

    num_classes: int
    feature_shape: tuple[int, ...]
    modality: Literal["image", "text", "vector"]
    vocab_size: Optional[int] = None
    task: Literal["classification", "regression"] = "classification"
    private_features: Optional[int] = None


@dataclass
class ClientData:
    """One client's private shard: numpy arrays, train and test splits.

    ``x_*`` is float32 for images/vectors and int64 token ids for text, shaped
    ``(n, *feature_shape)``; ``y_*`` is int64 labels (float32 targets for regression).
    """

    client_id: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_train(self) -> int:
        return int(len(self.y_train))

    @property
    def num_test(self) -> int:
        return int(len(self.y_test))
