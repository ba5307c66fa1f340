"""Examples of one task subset, as arrays, and the batches a model reads.

An example is image indices into its source's split (``-1``: an empty slot) and one text row
(:meth:`~.text.Vocabulary.row`). Examples are drawn by a generator seeded with the benchmark seed,
the task and the subset — not the run seed — so every run, client and machine sees the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetpfl.rng import numpy_rng

from .images import NUM_SUBSETS, SOURCES, ImagePool, to_model_input
from .tasks import CLASS_WORDS, TaskSpec, parse_task
from .text import Vocabulary

__all__ = ["MAX_IMAGES", "NUM_IMAGE_CLASSES", "TEXT_LENGTH", "class_offset", "Batch", "TaskExamples", "TaskSet", "build_examples", "build_task_sets", "make_batch"]

#: Image slots and text positions of every example (the most any task needs, with room to spare).
MAX_IMAGES = 3
TEXT_LENGTH = 20


@dataclass(frozen=True)
class TaskExamples:
    """``n`` examples of ``spec`` from image subset ``subset`` of split ``split``."""

    spec: TaskSpec
    subset: int
    split: str
    images: np.ndarray  # (n, MAX_IMAGES) int64, -1 for an empty slot
    text: np.ndarray  # (n, TEXT_LENGTH) int64
    prompt_len: np.ndarray  # (n,) int64: positions through <answer>
    answer_len: np.ndarray  # (n,) int64: answer words + <eos>

    @property
    def name(self) -> str:
        return f"{self.spec.name}/{self.subset}"

    def __len__(self) -> int:
        return int(self.text.shape[0])


def build_examples(pool: ImagePool, vocab: Vocabulary, spec: TaskSpec, subset: int, split: str, n: int,
                   seed: int = 0) -> TaskExamples:
    """Draw ``n`` examples of ``spec`` on images of ``subset`` (< :data:`NUM_SUBSETS`) of ``split``
    (``"train"`` or ``"test"``). Raises ``ValueError`` for a source missing from the pool or a
    subset out of range."""
    images_of = getattr(pool, split)
    if spec.source not in images_of:
        raise ValueError(f"hetvqa: task {spec.name!r} needs source {spec.source!r}, the image pool has "
                         f"{', '.join(images_of) or 'none'}")
    if not 0 <= subset < NUM_SUBSETS:
        raise ValueError(f"hetvqa: subset {subset} of task {spec.name!r} is not in 0..{NUM_SUBSETS - 1}")
    source = images_of[spec.source]
    members = source.subsets[subset]
    labels = source.labels[members]
    by_class = {int(c): members[labels == c] for c in np.unique(labels)}
    rng = numpy_rng(seed, "hetvqa", spec.name, subset, split)
    class_words = CLASS_WORDS[spec.source]
    image_rows = np.full((n, MAX_IMAGES), -1, dtype=np.int64)
    text = np.zeros((n, TEXT_LENGTH), dtype=np.int64)
    prompt_len = np.zeros(n, dtype=np.int64)
    answer_len = np.zeros(n, dtype=np.int64)
    for i in range(n):
        chosen, wording, answer = spec.template.make(rng, by_class, class_words)
        image_rows[i, :len(chosen)] = chosen
        text[i], prompt_len[i], answer_len[i] = vocab.row(spec.template.questions[wording], answer, TEXT_LENGTH)
    return TaskExamples(spec, subset, split, image_rows, text, prompt_len, answer_len)


@dataclass(frozen=True)
class Batch:
    """What a vision-language model reads for a batch, and where its answer lies."""

    images: torch.Tensor  # (B, MAX_IMAGES, 3, 32, 32) float in [0, 1]
    image_mask: torch.Tensor  # (B, MAX_IMAGES) bool
    text: torch.Tensor  # (B, TEXT_LENGTH) int64
    prompt_len: torch.Tensor  # (B,)
    answer_len: torch.Tensor  # (B,)
    image_labels: torch.Tensor  # (B, MAX_IMAGES) class of each image among all sources' (-1: empty slot)


def make_batch(pool: ImagePool, examples: TaskExamples, rows: np.ndarray) -> Batch:
    """The examples at ``rows``, with their images read from the pool in the task's domain."""
    idx = examples.images[rows]
    source = getattr(pool, examples.split)[examples.spec.source]
    filled = idx >= 0
    safe = np.where(filled, idx, 0).reshape(-1)  # empty slots read image 0, then are zeroed and masked
    images = to_model_input(source.images[safe], examples.spec.domain, keys=safe)
    images = images.reshape(*idx.shape, *images.shape[1:]) * torch.from_numpy(filled)[..., None, None, None]
    labels = np.where(filled, source.labels[safe].reshape(idx.shape) + class_offset(examples.spec.source), -1)
    return Batch(images, torch.from_numpy(filled), torch.from_numpy(examples.text[rows]),
                 torch.from_numpy(examples.prompt_len[rows]), torch.from_numpy(examples.answer_len[rows]),
                 torch.from_numpy(labels))


def class_offset(source: str) -> int:
    """Where ``source``'s classes start when all sources' classes are numbered together
    (:data:`NUM_IMAGE_CLASSES` in all; what pretraining's vision probe predicts)."""
    return sum(len(CLASS_WORDS[s]) for s in SOURCES[:SOURCES.index(source)])


#: Classes of all sources together (see :func:`class_offset`).
NUM_IMAGE_CLASSES = sum(len(CLASS_WORDS[s]) for s in SOURCES)


@dataclass(frozen=True)
class TaskSet:
    """A task subset's training and test examples."""

    train: TaskExamples
    test: TaskExamples


def build_task_sets(pool: ImagePool, vocab: Vocabulary, tasks: list[str] | tuple[str, ...], n_train: int,
                    n_test: int, seed: int = 0) -> dict[str, TaskSet]:
    """``{"<task>/<k>": TaskSet}`` for every named task subset (see :func:`build_examples`)."""
    out = {}
    for name in dict.fromkeys(tasks):
        spec, subset = parse_task(name)
        if subset is None:
            raise ValueError(f"hetvqa: task {name!r} names no subset ('<task>/<k>')")
        out[name] = TaskSet(build_examples(pool, vocab, spec, subset, "train", n_train, seed),
                            build_examples(pool, vocab, spec, subset, "test", n_test, seed))
    return out
