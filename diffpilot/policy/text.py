"""A fixed word-level vocabulary for instructions and reasoning text.

The language a robot policy here meets is small and closed: task phrasings
and templated reasoning about sub-goals and object positions. A word-level
vocabulary built once from the training text covers it exactly, is readable
in a checkpoint's config (a list of words, no pickled tokenizer), and maps any
word it never saw to ``<unk>`` instead of failing, which is what held-out
phrasings need. Words are lowercase runs of letters/digits; every other
non-space character (``;``, ``,``) is a token of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["SPECIAL_TOKENS", "WordVocab", "words"]

PAD, UNK, BOS, EOS, SEP = "<pad>", "<unk>", "<bos>", "<eos>", "<sep>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, SEP)
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """``text`` split into lowercase words and single punctuation marks."""
    return _WORD.findall(str(text).lower())


class WordVocab:
    """Word <-> id, with ``<pad>``=0, ``<unk>``=1, ``<bos>``, ``<eos>``, ``<sep>`` first."""

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with the special tokens {list(SPECIAL_TOKENS)}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary lists every token once")
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        self.pad, self.unk, self.bos, self.eos, self.sep = (self.index[t] for t in SPECIAL_TOKENS)

    @classmethod
    def build(cls, texts: Iterable[str]) -> "WordVocab":
        """The vocabulary of every word in ``texts``, in sorted order after the special tokens."""
        seen = sorted({w for text in texts for w in words(text)} - set(SPECIAL_TOKENS))
        return cls([*SPECIAL_TOKENS, *seen])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a word outside the vocabulary becomes ``<unk>``."""
        return [self.index.get(w, self.unk) for w in words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first ``<eos>``, special tokens dropped."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if 0 <= i < len(self.tokens) and i >= len(SPECIAL_TOKENS):
                out.append(self.tokens[i])
        return " ".join(out)

    def unknown_fraction(self, text: str) -> float:
        """Share of ``text``'s words the vocabulary does not know (0 for empty text)."""
        ws = words(text)
        return sum(w not in self.index for w in ws) / len(ws) if ws else 0.0
