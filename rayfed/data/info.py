"""Plain records shared by data sources, models and the runtime: what a data set's tasks are, and
what one client holds.

A data set has one or more named **tasks**. Each task has its own inputs (one array per input
modality: ``image``, ``text``, ``vector``), its own kind of target (a class label, a regression
target, an image or a token sequence to generate) and its own metric. A client holds some of the
tasks, each with its own train and test split. The single-task case needs none of this:
``ClientData(cid, x_train, y_train, x_test, y_test)`` is one task named ``main``.

Example:
    >>> import numpy as np
    >>> d = ClientData(0, np.zeros((3, 2)), np.array([0, 1, 1]), np.zeros((1, 2)), np.array([1]))
    >>> d.task_names, d.num_train, d.x_train.shape
    (['main'], 3, (3, 2))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, Optional, Union

import numpy as np

__all__ = ["DEFAULT_TASK", "ClientData", "DatasetInfo", "Inputs", "TaskData", "TaskInfo"]

#: name of the task of single-task data
DEFAULT_TASK = "main"

TargetKind = Literal["class", "regression", "image", "tokens"]
Modality = Literal["image", "text", "vector"]
#: a task's inputs for a batch of samples: one array, or one array per input modality
Inputs = Union[np.ndarray, Mapping[str, np.ndarray]]

_METRIC = {"class": "accuracy", "regression": "mse", "image": "mse", "tokens": "token_accuracy"}


@dataclass(frozen=True)
class TaskInfo:
    """One task of a data set: what goes in, what comes out and how it is scored.

    Attributes:
        name: the task's name (unique in the data set).
        inputs: ``(modality, per-sample shape)`` per input, e.g. ``(("image", (3, 64, 64)), ("text", (16,)))``;
            at most one input per modality, so an input is named by its modality.
        target: ``class`` (integer labels; cross-entropy; accuracy), ``regression`` (float targets;
            mean squared error), ``image`` (an image to generate; MSE) or ``tokens`` (a token sequence
            to generate; per-position cross-entropy ignoring id 0; token accuracy).
        num_outputs: classes (class), outputs (regression), or the vocabulary size (tokens); for
            image targets the number of values of one target.
        target_shape: per-sample shape of the target: ``()`` for class and scalar regression,
            ``(C, H, W)`` for images, ``(L,)`` for token sequences.
        vocab_size: vocabulary size of a text input (token ids ``1 .. vocab_size-1``, 0 = padding).
    """

    name: str
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    target: TargetKind = "class"
    num_outputs: int = 2
    target_shape: tuple[int, ...] = ()
    vocab_size: Optional[int] = None

    def __post_init__(self) -> None:
        mods = [m for m, _ in self.inputs]
        if not mods or len(set(mods)) != len(mods):
            raise ValueError(f"task {self.name!r}: inputs must name each modality at most once, got {mods}")
        bad = [m for m in mods if m not in ("image", "text", "vector")]
        if bad:
            raise ValueError(f"task {self.name!r}: unknown input modalities {bad}; use image, text or vector")
        if self.target not in _METRIC:
            raise ValueError(f"task {self.name!r}: target {self.target!r}; valid: {', '.join(_METRIC)}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The task's input modalities, in order."""
        return tuple(m for m, _ in self.inputs)

    @property
    def metric(self) -> str:
        """The task's headline metric: ``accuracy``, ``mse`` or ``token_accuracy``."""
        return _METRIC[self.target]

    def input_shape(self, modality: str) -> tuple[int, ...]:
        """Per-sample shape of the task's ``modality`` input."""
        return dict(self.inputs)[modality]

    @property
    def output_size(self) -> int:
        """Values a model outputs per sample for this task (logits, outputs, pixels or L x vocab)."""
        if self.target == "image":
            return math.prod(self.target_shape)
        if self.target == "tokens":
            return math.prod(self.target_shape) * self.num_outputs
        return self.num_outputs


@dataclass(frozen=True)
class DatasetInfo:
    """What a model builder needs to know about the data.

    The first six fields describe the data set's first (for single-task data: only) task, as every
    single-task model builder reads them; ``tasks`` lists every task when the data was declared with
    tasks (``data.tasks`` or :meth:`rayfed.data.FederatedDataset.from_tasks`), else it is empty.

    Attributes:
        num_classes: number of labels (labels are ``0 .. num_classes-1``).
        feature_shape: shape of one sample: ``(C, H, W)`` images, ``(L,)`` token ids, ``(d,)`` vectors.
        modality: ``"image"``, ``"text"`` or ``"vector"``.
        vocab_size: token vocabulary size (text only).
        task: ``"classification"`` (integer labels, cross-entropy, accuracy) or ``"regression"``
            (float targets, mean squared error; ``num_classes`` is then the number of outputs).
        private_features: for data built with client-specific trailing features (the
            ``partial_linear`` source), how many; ``model.name=linear`` reads them with its head.
        tasks: every task of data declared with tasks (see :class:`TaskInfo`).
    """

    num_classes: int
    feature_shape: tuple[int, ...]
    modality: Literal["image", "text", "vector"]
    vocab_size: Optional[int] = None
    task: Literal["classification", "regression"] = "classification"
    private_features: Optional[int] = None
    tasks: tuple[TaskInfo, ...] = ()

    def task_infos(self) -> tuple[TaskInfo, ...]:
        """Every task: ``tasks``, or the one implicit task ``main`` of single-task data."""
        if self.tasks:
            return self.tasks
        target: TargetKind = "regression" if self.task == "regression" else "class"
        return (TaskInfo(DEFAULT_TASK, ((self.modality, tuple(self.feature_shape)),), target, self.num_classes,
                         (), self.vocab_size),)

    def task_info(self, name: str) -> TaskInfo:
        """The task called ``name``; the error lists the tasks."""
        for t in self.task_infos():
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; the data's tasks are {[t.name for t in self.task_infos()]}")

    @property
    def multitask(self) -> bool:
        """Whether models need one output head per task or several input encoders (more than one
        task, or a task with more than one input modality).
        """
        infos = self.task_infos()
        return len(infos) > 1 or len(infos[0].inputs) > 1

    @classmethod
    def for_tasks(cls, tasks: tuple[TaskInfo, ...], *, private_features: Optional[int] = None) -> DatasetInfo:
        """A multi-task info whose single-task fields describe ``tasks[0]``."""
        first = tasks[0]
        modality, shape = first.inputs[0]
        kind = "regression" if first.target == "regression" else "classification"
        vocab = next((t.vocab_size for t in tasks if t.vocab_size is not None), None)
        return cls(first.num_outputs, tuple(shape), modality, vocab, kind, private_features, tuple(tasks))


def _rows(x: Inputs) -> int:
    if isinstance(x, Mapping):
        return len(next(iter(x.values()))) if x else 0
    return len(x)


@dataclass
class TaskData:
    """One client's data of one task: train and test splits.

    ``x_*`` is one array shaped ``(n, *shape)`` (float32 images/vectors, int64 token ids) or, for a
    task with several inputs, a mapping from modality to such arrays; ``y_*`` holds the targets:
    int64 labels, float32 regression targets or images, int64 token sequences.
    """

    x_train: Inputs
    y_train: np.ndarray
    x_test: Inputs
    y_test: np.ndarray

    @property
    def num_train(self) -> int:
        return int(len(self.y_train))

    @property
    def num_test(self) -> int:
        return int(len(self.y_test))

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if _rows(x) != len(y):
                raise ValueError(f"{split} split: {_rows(x)} input rows but {len(y)} targets")


@dataclass(init=False)
class ClientData:
    """One client's private shard: one or more named tasks, each with train and test splits.

    ``ClientData(cid, x_train, y_train, x_test, y_test)`` makes single-task data (the task ``main``);
    ``ClientData(cid, tasks={name: TaskData(...)})`` several tasks. ``x_train``, ``y_train``, ``x_test``
    and ``y_test`` are those of the only task; on a client with several tasks they raise an error
    that names the tasks (read ``tasks[name]`` instead).

    Attributes:
        client_id: the client.
        tasks: the client's tasks by name, in the data set's task order.
    """

    client_id: int
    tasks: dict[str, TaskData] = field(default_factory=dict)

    def __init__(self, client_id: int, x_train: Optional[Inputs] = None, y_train: Optional[np.ndarray] = None,
                 x_test: Optional[Inputs] = None, y_test: Optional[np.ndarray] = None, *,
                 tasks: Optional[Mapping[str, TaskData]] = None) -> None:
        self.client_id = int(client_id)
        if tasks is not None:
            if any(v is not None for v in (x_train, y_train, x_test, y_test)):
                raise ValueError("pass either the arrays of a single task or tasks=..., not both")
            self.tasks = dict(tasks)
        else:
            if any(v is None for v in (x_train, y_train, x_test, y_test)):
                raise ValueError("single-task ClientData needs x_train, y_train, x_test and y_test")
            self.tasks = {DEFAULT_TASK: TaskData(x_train, y_train, x_test, y_test)}

    @property
    def task_names(self) -> list[str]:
        """The client's task names."""
        return list(self.tasks)

    def only_task(self) -> TaskData:
        """The client's single task; an error naming its tasks when it has several."""
        if len(self.tasks) != 1:
            raise ValueError(f"client {self.client_id} holds {len(self.tasks)} tasks {self.task_names}; this code "
                             "handles single-task data only: read data.tasks[name], or use an algorithm and model "
                             "that handle several tasks")
        return next(iter(self.tasks.values()))

    @property
    def x_train(self) -> Inputs:
        return self.only_task().x_train

    @property
    def y_train(self) -> np.ndarray:
        return self.only_task().y_train

    @property
    def x_test(self) -> Inputs:
        return self.only_task().x_test

    @property
    def y_test(self) -> np.ndarray:
        return self.only_task().y_test

    @property
    def num_train(self) -> int:
        """Training samples over all the client's tasks."""
        return sum(t.num_train for t in self.tasks.values())

    @property
    def num_test(self) -> int:
        """Test samples over all the client's tasks."""
        return sum(t.num_test for t in self.tasks.values())

    def with_task(self, name: str, **changes: Inputs) -> ClientData:
        """A copy whose task ``name`` has some splits replaced (e.g. ``y_train=...``)."""
        tasks = dict(self.tasks)
        tasks[name] = replace(tasks[name], **changes)
        return ClientData(self.client_id, tasks=tasks)

    def nbytes(self) -> int:
        """Bytes of the client's arrays."""
        def size(x: Inputs) -> int:
            return int(sum(a.nbytes for a in x.values())) if isinstance(x, Mapping) else int(x.nbytes)

        return sum(size(t.x_train) + size(t.x_test) + t.y_train.nbytes + t.y_test.nbytes
                   for t in self.tasks.values())
