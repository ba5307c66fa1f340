"""Training and scoring vision-language models on HetVQA examples: the answer loss, batches drawn
from example sets or a replay memory, and exact-match / token-F1 scoring by greedy decoding."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.hetvqa import Batch, ReplayMemory, TaskExamples, Vocabulary, exact_match, make_batch, token_f1
from ..data.hetvqa.images import ImagePool
from ..models.vlm import greedy_answer, reuse_visual_tokens

__all__ = ["answer_logits", "answer_loss", "answer_scores", "example_batches", "memory_batches", "mixed_answer_loss", "score_answers"]


def _answer_positions(batch: Batch) -> Tensor:
    """(B, L) bool: the logits that predict an answer word or ``<eos>`` (the position before each)."""
    pos = torch.arange(batch.text.shape[1])[None, :]
    start = batch.prompt_len[:, None] - 1
    return (pos >= start) & (pos < start + batch.answer_len[:, None])


def answer_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """``model``'s logits at the positions that predict an answer word or ``<eos>`` (N, vocab), and
    the tokens they should predict (N,)."""
    logits = model(batch.images, batch.image_mask, batch.text)
    where = _answer_positions(batch)
    targets = torch.roll(batch.text, shifts=-1, dims=1)  # position p predicts token p + 1
    return logits[where], targets[where]


def answer_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean next-token cross-entropy over the answer words and ``<eos>`` (prompts are not scored)."""
    return F.cross_entropy(*answer_logits(model, batch))


def example_batches(pool: ImagePool, sets: Sequence[TaskExamples], batch_size: int,
                    rng: np.random.Generator) -> Iterator[Batch]:
    """Endless batches, each from one example set chosen in proportion to its size (a mixed
    stream over tasks: one task's examples share a source, so one batch reads one image array)."""
    sizes = np.array([len(s) for s in sets], dtype=np.float64)
    while True:
        which = int(rng.choice(len(sets), p=sizes / sizes.sum()))
        rows = rng.choice(len(sets[which]), size=min(batch_size, len(sets[which])), replace=False)
        yield make_batch(pool, sets[which], np.sort(rows))


def memory_batches(pool: ImagePool, sets: Mapping[str, TaskExamples], memory: ReplayMemory, batch_size: int,
                   rng: np.random.Generator) -> Iterator[list[Batch]]:
    """Endless steps from a replay memory: each step draws ``batch_size`` examples (favouring rarely
    used ones) and yields them as one batch per task they come from (their losses are averaged by
    example count in :func:`mixed_answer_loss`)."""
    while True:
        keys = memory.sample(batch_size, rng)
        by_task: dict[str, list[int]] = {}
        for task, i in keys:
            by_task.setdefault(task, []).append(i)
        yield [make_batch(pool, sets[task], np.array(sorted(rows))) for task, rows in sorted(by_task.items())]


def mixed_answer_loss(model: nn.Module, batches: Sequence[Batch]) -> Tensor:
    """:func:`answer_loss` over batches of different tasks, weighted by their sizes."""
    total = sum(int(b.text.shape[0]) for b in batches)
    return sum(answer_loss(model, b) * (b.text.shape[0] / total) for b in batches)


@torch.no_grad()
def answer_scores(model: nn.Module, pool: ImagePool, examples: TaskExamples, rows: np.ndarray, vocab: Vocabulary,
                  batch_size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy answers to the examples at ``rows``: per example, ``exact_match`` and ``token_f1`` (0..1),
    and the answer loss (mean cross-entropy over its answer words and ``<eos>``, teacher-forced).
    The teacher-forced pass is also decoding's first step, and the images are encoded once."""
    was_training = model.training
    model.eval()
    rows = np.asarray(rows, dtype=np.int64)
    em, f1, nll = np.zeros(rows.size), np.zeros(rows.size), np.zeros(rows.size)
    try:
        for start in range(0, rows.size, batch_size):
            chunk = rows[start:start + batch_size]
            batch = make_batch(pool, examples, chunk)
            with reuse_visual_tokens(model):
                logits = model(batch.images, batch.image_mask, batch.text)
                nll[start:start + chunk.size] = _per_example_loss(logits, batch).numpy()
                answer = greedy_answer(model, batch.images, batch.image_mask, batch.text, batch.prompt_len,
                                       max_new_tokens=int(batch.answer_len.max()), eos_id=vocab.eos_id,
                                       first_logits=logits)
            for i, row in enumerate(chunk):
                reference = vocab.decode(examples.text[row, int(examples.prompt_len[row]):])
                predicted = vocab.decode(answer[i].tolist())
                em[start + i] = exact_match(predicted, reference)
                f1[start + i] = token_f1(predicted, reference)
    finally:
        model.train(was_training)
    return em, f1, nll


def _per_example_loss(logits: Tensor, batch: Batch) -> Tensor:
    """(B,): each row's mean cross-entropy over its answer positions."""
    where = _answer_positions(batch)
    targets = torch.roll(batch.text, shifts=-1, dims=1)
    per_token = F.cross_entropy(logits[where], targets[where], reduction="none")
    row = where.nonzero()[:, 0]
    total = torch.zeros(logits.shape[0], dtype=per_token.dtype).index_add_(0, row, per_token)
    return total / where.sum(dim=1).clamp(min=1)


def score_answers(model: nn.Module, pool: ImagePool, examples: TaskExamples, vocab: Vocabulary,
                  batch_size: int = 128) -> dict[str, float]:
    """Greedy answers to every example: mean ``exact_match`` and ``token_f1`` (0..1)."""
    em, f1, _ = answer_scores(model, pool, examples, np.arange(len(examples)), vocab, batch_size)
    n = max(len(examples), 1)
    return {"exact_match": float(em.sum()) / n, "token_f1": float(f1.sum()) / n}
