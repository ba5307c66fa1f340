"""HetVQA's words: a fixed word-level vocabulary, the layout of one text row, and answer scoring.

A text row is ``<bos> question... <answer> answer... <eos> <pad>...``: the model reads the prompt (up
to and including ``<answer>``) and is trained to write the answer and ``<eos>``. The vocabulary is
the sorted set of every word any task can ask or answer (:func:`hetpfl.data.hetvqa.tasks.all_words`),
after the special tokens, so it is the same on every machine and never depends on data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["SPECIAL_TOKENS", "Vocabulary", "exact_match", "token_f1", "words"]

PAD, BOS, ANSWER, EOS, UNK = "<pad>", "<bos>", "<answer>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, ANSWER, EOS, UNK)


def words(text: str) -> list[str]:
    """Lower-cased words; ``?``, ``,`` and ``.`` are words of their own."""
    for mark in "?,.":
        text = text.replace(mark, f" {mark} ")
    return text.lower().split()


class Vocabulary:
    """Word <-> id, the special tokens first (``<pad>`` is 0)."""

    def __init__(self, vocabulary_words: Iterable[str]) -> None:
        extra = sorted(set(vocabulary_words) - set(SPECIAL_TOKENS))
        self.itos: tuple[str, ...] = SPECIAL_TOKENS + tuple(extra)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.answer_id, self.eos_id, self.unk_id = (self.stoi[t] for t in SPECIAL_TOKENS)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str | Sequence[str]) -> list[int]:
        tokens = words(text) if isinstance(text, str) else list(text)
        return [self.stoi.get(w, self.unk_id) for w in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first ``<eos>`` (padding and other special tokens dropped)."""
        out = []
        for i in ids:
            word = self.itos[int(i)]
            if word == EOS:
                break
            if word not in SPECIAL_TOKENS:
                out.append(word)
        return out

    def row(self, question: str, answer: str, length: int) -> tuple[np.ndarray, int, int]:
        """The text row of one example (int64, ``length`` long), its prompt length (through
        ``<answer>``) and answer length (with ``<eos>``). Raises ``ValueError`` when it does not fit."""
        prompt = [self.bos_id, *self.encode(question), self.answer_id]
        target = [*self.encode(answer), self.eos_id]
        if len(prompt) + len(target) > length:
            raise ValueError(f"hetvqa: {question!r} -> {answer!r} needs {len(prompt) + len(target)} tokens, "
                             f"the text row has {length}")
        row = np.full(length, self.pad_id, dtype=np.int64)
        row[:len(prompt)] = prompt
        row[len(prompt):len(prompt) + len(target)] = target
        return row, len(prompt), len(target)


def exact_match(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """1.0 when the predicted words equal the reference's, else 0.0."""
    return float(list(prediction) == list(reference))


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """SQuAD-style token F1: harmonic mean of precision and recall of the shared words (a multiset)."""
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return float(len(prediction) == len(reference) == 0)
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)
