"""A word-level caption tokenizer on HF `tokenizers`, saved as `tokenizer.json`.

Captions are lower-cased (after NFKC) and split on whitespace and punctuation
(`\\w+|[^\\w\\s]+`); every word seen in the training captions gets an id after the four special
tokens [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3. `encode` gives fixed-length rows

    [BOS] w_1 ... w_n [EOS] [PAD] ... [PAD]        mask: True on BOS..EOS, False on padding

Documented behaviour for bad input (nothing is dropped silently):
  * a caption longer than context_length - 2 words is truncated to its first context_length - 2
    words and still ends in [EOS]; each `encode` call warns once with the number of truncated
    captions;
  * a word outside the vocabulary becomes [UNK]; each distinct unknown word is reported once per
    Tokenizer (one warning per call, listing the words not reported before). Special-token
    literals typed into a caption ("[eos]", "[PAD]") are treated the same way, as unknown words;
  * the empty caption "" encodes to [BOS] [EOS]: the null caption of classifier-free guidance.

    tok = train_tokenizer(captions)
    tok.save("runs/enc")                     # runs/enc/tokenizer.json
    tok = Tokenizer.load("runs/enc")
    ids, mask = tok.encode(["a red square"], context_length=tok.context_length(captions))
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from ..safeio import atomic_write

FILENAME = "tokenizer.json"
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3 in this order


class Tokenizer:
    """A trained HF `tokenizers.Tokenizer` (WordLevel) plus fixed-length encoding to tensors."""

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.json_text = json_text  # the exact tokenizer.json content: digest() and save() use it
        try:
            self.hf = HFTokenizer.from_str(json_text)
        except Exception as e:  # the Rust parser's error type is not exported
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{FILENAME} is not a tokenizers file ({reason}); train one with "
                             f"unifusion.data.tokenizer.train_tokenizer") from None
        ids = {t: self.hf.token_to_id(t) for t in SPECIAL_TOKENS}
        if ids != {t: i for i, t in enumerate(SPECIAL_TOKENS)}:
            raise ValueError(f"{FILENAME} must define the special tokens {list(SPECIAL_TOKENS)} as ids 0..3, "
                             f"found {ids}; train it with unifusion.data.tokenizer.train_tokenizer")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(4)
        self._reported: set[str] = set()  # unknown words already warned about

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the embedding table's size)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def digest(self) -> str:
        """sha256 of the tokenizer.json content (the file `save` writes), for specs to record."""
        return hashlib.sha256(self.json_text.encode("utf-8")).hexdigest()

    def save(self, folder: str | os.PathLike) -> Path:
        """Write folder/tokenizer.json (atomically); returns its path."""
        return atomic_write(Path(folder) / FILENAME, self.json_text)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Read folder/tokenizer.json (a path to the file itself is accepted too)."""
        path = Path(folder)
        if path.is_dir() or path.name != FILENAME:
            path = path / FILENAME
        if not path.is_file():
            raise ValueError(f"{path.parent} has no {FILENAME}: train one with train_tokenizer(captions) and "
                             f"save it there, or pass the folder the text encoder was saved to")
        try:
            return cls(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def words(self, text: str) -> list[str]:
        """The normalised words of one caption (what the vocabulary is made of)."""
        return self.hf.encode(text, add_special_tokens=False).tokens

    def context_length(self, captions: Iterable[str], multiple: int = 8) -> int:
        """The smallest multiple of `multiple` that holds every caption with BOS and EOS."""
        longest = max((len(e.ids) for e in self.hf.encode_batch(list(captions), add_special_tokens=False)),
                      default=0)
        return max(multiple, math.ceil((longest + 2) / multiple) * multiple)

    def encode(self, texts: list[str], context_length: int) -> tuple[Tensor, Tensor]:
        """(ids LongTensor (B, L), mask BoolTensor (B, L)) with L = context_length: BOS words EOS,
        then PAD; mask True on real tokens (BOS, words, EOS). See the module doc for truncation
        and unknown words."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of captions, not one string")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for BOS and EOS), got {context_length}")
        room = context_length - 2
        ids = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), context_length), dtype=torch.bool)
        truncated, unknown = 0, []
        for b, (text, enc) in enumerate(zip(texts, self.hf.encode_batch(list(texts), add_special_tokens=False))):
            row = list(enc.ids)
            for j, (i, (start, end)) in enumerate(zip(row, enc.offsets)):
                # a special token typed into the caption is no word of the vocabulary either
                if i in (self.unk_id, self.pad_id, self.bos_id, self.eos_id):
                    row[j] = self.unk_id
                    unknown.append(text[start:end].lower())
            if len(row) > room:
                truncated += 1
                row = row[:room]
            n = len(row) + 2
            ids[b, :n] = torch.tensor([self.bos_id, *row, self.eos_id], dtype=torch.long)
            mask[b, :n] = True
        new = sorted(set(unknown) - self._reported)
        if new:
            self._reported.update(new)
            warnings.warn(f"{len(new)} word(s) not in the tokenizer's vocabulary map to {UNK}: {', '.join(new)}",
                          stacklevel=2)
        if truncated:
            warnings.warn(f"{truncated} of {len(texts)} caption(s) are longer than the context length "
                          f"{context_length} (BOS and EOS included) and were truncated to it", stacklevel=2)
        return ids, mask

    def decode(self, ids: Tensor | list[int]) -> str:
        """The words of one row of ids, special tokens left out."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.hf.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, digest={self.digest()[:12]})"


def train_tokenizer(captions: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """A word-level tokenizer of the words in `captions`: every word when vocab_size is None,
    else the vocab_size - 4 most frequent ones (vocab_size counts the special tokens)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    captions = list(captions)
    if not captions:
        raise ValueError("train_tokenizer needs at least one caption")
    if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    hf = HFTokenizer(models.WordLevel(unk_token=UNK))
    hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+ : words and runs of punctuation
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size or 2**31 - 1, min_frequency=1,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    hf.train_from_iterator(captions, trainer=trainer)
    return Tokenizer(hf.to_str(pretty=True))


__all__ = ["Tokenizer", "train_tokenizer", "FILENAME", "SPECIAL_TOKENS", "PAD", "UNK", "BOS", "EOS"]
