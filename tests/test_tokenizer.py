"""The caption tokenizer: vocabulary, fixed-length encoding with BOS/EOS/PAD and mask, truncation
and unknown words reported (never silent), save/load round trip and digest."""
import hashlib
import warnings

import pytest
import torch

from unifusion.data.shapes import ShapesSource
from unifusion.data.tokenizer import FILENAME, SPECIAL_TOKENS, Tokenizer, train_tokenizer

CAPTIONS = ["a small red square", "a large blue circle left of a small red triangle",
            "A Small Green Triangle, and a large red square"]


def no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


def test_vocabulary_is_special_tokens_then_every_lowercased_word():
    tok = train_tokenizer(CAPTIONS)
    vocab = tok.hf.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3] and (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    words = {w for c in CAPTIONS for w in c.lower().replace(",", " , ").split()}
    assert set(vocab) - set(SPECIAL_TOKENS) == words  # "," is a token; "A" and "a" are one word
    assert tok.vocab_size == len(words) + 4
    assert tok.words("A  large, RED square") == ["a", "large", ",", "red", "square"]


def test_encode_rows_are_bos_words_eos_then_padding():
    tok = train_tokenizer(CAPTIONS)
    ids, mask = no_warnings(tok.encode, ["a small red square", "", "Red, RED"], 8)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (3, 8)
    v = tok.hf.get_vocab()
    assert ids[0].tolist() == [2, v["a"], v["small"], v["red"], v["square"], 3, 0, 0]
    assert ids[1].tolist() == [2, 3, 0, 0, 0, 0, 0, 0]  # the empty caption: the CFG null caption
    assert ids[2].tolist() == [2, v["red"], v[","], v["red"], 3, 0, 0, 0]
    assert mask.tolist() == [[True] * 6 + [False] * 2, [True] * 2 + [False] * 6, [True] * 5 + [False] * 3]
    assert tok.decode(ids[0]) == "a small red square"


def test_too_long_captions_are_truncated_keeping_eos_with_one_warning():
    tok = train_tokenizer(CAPTIONS)
    long = "a large blue circle left of a small red triangle"  # 10 words
    with pytest.warns(UserWarning, match=r"2 of 3 caption\(s\) are longer than the context length 6") as rec:
        ids, mask = tok.encode([long, "a red square", long], 6)
    assert len(rec) == 1
    v = tok.hf.get_vocab()
    assert ids[0].tolist() == [2, v["a"], v["large"], v["blue"], v["circle"], 3] and mask[0].all()
    assert ids[1].tolist() == [2, v["a"], v["red"], v["square"], 3, 0]
    no_warnings(tok.encode, [long], 12)  # 10 words + BOS + EOS fit exactly
    with pytest.raises(ValueError, match="context_length"):
        tok.encode(["a"], 1)
    with pytest.raises(TypeError, match="list"):
        tok.encode("a red square", 8)


def test_unknown_words_become_unk_and_are_reported_once_each():
    tok = train_tokenizer(CAPTIONS)
    with pytest.warns(UserWarning, match=r"2 word\(s\) not in the tokenizer's vocabulary map to \[UNK\]: hexagon, zebra"):
        ids, mask = tok.encode(["a Zebra hexagon", "a zebra"], 6)
    assert ids[0, 2:4].tolist() == [1, 1] and ids[1, 2].item() == 1 and mask[0, :5].all()
    with pytest.warns(UserWarning, match=r"map to \[UNK\]: okapi$"):  # only the word not reported before
        tok.encode(["zebra okapi hexagon"], 6)
    no_warnings(tok.encode, ["a zebra"], 6)
    # special-token literals typed into a caption are not the special tokens
    with pytest.warns(UserWarning, match=r"\[eos\]"):
        ids, _ = tok.encode(["red [EOS] square"], 8)
    assert ids[0].tolist().count(3) == 1 and ids[0, 2].item() == 1


def test_save_load_round_trip_and_digest(tmp_path):
    tok = train_tokenizer(CAPTIONS)
    path = tok.save(tmp_path / "enc")
    assert path == tmp_path / "enc" / FILENAME
    assert tok.digest() == hashlib.sha256(path.read_bytes()).hexdigest()
    for where in (tmp_path / "enc", path):
        back = Tokenizer.load(where)
        assert back.digest() == tok.digest() and back.vocab_size == tok.vocab_size
        a, b = tok.encode(CAPTIONS, 16), back.encode(CAPTIONS, 16)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert train_tokenizer(CAPTIONS[:1]).digest() != tok.digest()
    assert train_tokenizer(CAPTIONS).digest() == tok.digest()  # training is deterministic


def test_load_without_tokenizer_json_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match=f"has no {FILENAME}: train one") as err:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / FILENAME).write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="is not a tokenizers file") as err:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(err.value)


def test_vocab_size_keeps_the_most_frequent_words():
    tok = train_tokenizer(CAPTIONS, vocab_size=7)  # 4 special + "a", "red", one more
    vocab = tok.hf.get_vocab()
    assert tok.vocab_size == 7 and {"a", "red"} <= set(vocab)
    with pytest.warns(UserWarning, match="map to"):
        tok.encode(["a blue circle"], 8)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CAPTIONS, vocab_size=4)
    with pytest.raises(ValueError, match="at least one caption"):
        train_tokenizer([])


def test_shapes_captions_encode_without_unknowns_or_truncation():
    src = ShapesSource(n=500)
    captions = src.captions(range(500))
    tok = train_tokenizer(captions)
    L = tok.context_length(captions)
    assert L % 8 == 0 and L >= max(len(tok.words(c)) for c in captions) + 2
    ids, mask = no_warnings(tok.encode, captions, L)
    assert (ids[mask] != tok.unk_id).all()
    assert (ids[torch.arange(len(captions)), mask.sum(1) - 1] == tok.eos_id).all()
