"""Aligner (csrc/aligner.cpp via p2p_engine.words) against a plain-Python re-statement of the
reference's ptp_utils.get_word_inds and seq_aligner mappers, written here independently."""
import random

import numpy as np
import pytest
import torch

from p2p_engine import _native, words
from p2p_engine.tokenizer import clip_tokenizer
from reference import ref_word_inds


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


# ---- reference re-statement (ref_word_inds lives in reference.py, shared with other tests) ------
def ref_align(x, y):
    nx, ny = len(x), len(y)
    score = np.zeros((nx + 1, ny + 1), dtype=np.int64)
    tb = np.zeros((nx + 1, ny + 1), dtype=np.int64)
    tb[0, 1:], tb[1:, 0], tb[0, 0] = 1, 2, 4
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i, j] = max(left, up, diag)
            tb[i, j] = 1 if score[i, j] == left else (2 if score[i, j] == up else 3)
    i, j, pairs = nx, ny, []
    while i > 0 or j > 0:
        if tb[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append(i)
        elif tb[i, j] == 1:
            j -= 1
            pairs.append(-1)
        elif tb[i, j] == 2:
            i -= 1
        else:
            break
    return pairs[::-1]


def ref_refine(x, y, tok, max_len=77):
    xs, ys = tok.encode(x), tok.encode(y)
    m = torch.tensor(ref_align(xs, ys), dtype=torch.int64)
    alphas = torch.ones(max_len)
    alphas[: len(m)] = m.ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: len(m)] = m
    mapper[len(m):] = len(ys) + torch.arange(max_len - len(ys))
    return mapper, alphas


def ref_replace(x, y, tok, max_len=77):
    wx, wy = x.split(" "), y.split(" ")
    swapped = [i for i in range(len(wy)) if wy[i] != wx[i]]
    src = [ref_word_inds(x, i, tok) for i in swapped]
    tgt = [ref_word_inds(y, i, tok) for i in swapped]
    m = np.zeros((max_len, max_len))
    i = j = cur = 0
    while i < max_len and j < max_len:
        if cur < len(src) and src[cur][0] == i:
            s, t = src[cur], tgt[cur]
            if len(s) == len(t):
                m[s, t] = 1
            else:
                for tt in t:
                    m[s, tt] = 1 / len(t)
            cur, i, j = cur + 1, i + len(s), j + len(t)
        elif cur < len(src):
            m[i, j] = 1
            i, j = i + 1, j + 1
        else:
            m[j, j] = 1
            i, j = i + 1, j + 1
    return torch.from_numpy(m).float()


# ---- tests ------------------------------------------------------------------------------
def n_tokens(word, tok):
    return len(tok.encode(word)) - 2


@pytest.mark.parametrize("prompt,word", [
    ("a cat", "cat"), ("a cat and a cat", "cat"), ("a cat and a cat", "a"), ("a cat and a cat", 3),
    ("a photo of a hippopotamus", "hippopotamus"), ("a zorblax riding a flumphet", "flumphet"),
    ("a zorblax riding a flumphet", 1), ("a cat", "dog"),
    ("日本 cat", "cat"), ("a naïve über cat", "cat"),   # characters, not UTF-8 bytes, are counted
])
def test_word_inds(tok, prompt, word):
    assert words.word_inds(prompt, word, tok) == ref_word_inds(prompt, word, tok)


def test_word_inds_values(tok):
    assert words.word_inds("a cat and a cat", "cat", tok) == [2, 5]
    assert n_tokens("zorblax", tok) > 1  # the case below really is multi-token
    k = n_tokens("zorblax", tok)
    assert words.word_inds("a zorblax sat", "zorblax", tok) == list(range(2, 2 + k))


@pytest.mark.parametrize("n,word,want", [(74, "dog", [75]), (72, "zorblax", [73, 74, 75])])
def test_word_inds_at_the_end_of_the_window(tok, n, word, want):
    """A word whose last token is the last before EOS (position 75 of the 77-token window) is found where the
    reference finds it."""
    prompt = " ".join(["a"] * n) + " " + word
    assert len(tok.encode(prompt)) == 77  # the prompt fills the window exactly: nothing is truncated
    assert ref_word_inds(prompt, word, tok) == want
    assert words.word_inds(prompt, word, tok) == want


@pytest.mark.parametrize("src,tgt", [
    ("a cat", "a big cat"),                              # insertion
    ("a photo of a cat on a mat", "a photo of a cat"),   # deletion at the end
    ("a cat and a cat", "a cat and a big cat"),          # repeated words
    ("a photo of a hippopotamus", "a photo of a small hippopotamus"),  # multi-token word
    ("a zorblax sat", "a dog sat quietly"),
    ("a cat", "a cat"),
])
def test_refine_matches_reference(tok, src, tgt):
    m, a = words.refine_mapper(src, tgt, tok)
    rm, ra = ref_refine(src, tgt, tok)
    assert m.dtype == torch.int64 and m.shape == (77,) and a.shape == (77,)
    assert torch.equal(m, rm) and torch.equal(a, ra)
    n = len(tok.encode(tgt))
    assert torch.equal(m[n:], torch.arange(n, 77)) and bool((a[n:] == 1).all())  # padding tail


def test_refine_insertion_values(tok):
    m, a = words.refine_mapper("a cat", "a big cat", tok)
    assert m[:5].tolist() == [0, 1, -1, 2, 3] and a[:5].tolist() == [1, 1, 0, 1, 1]


@pytest.mark.parametrize("src,tgt", [
    ("a photo of a cat", "a photo of a dog"),
    ("a photo of a cat", "a photo of a hippopotamus"),   # 1 -> n tokens: 1/n weights
    ("a photo of a hippopotamus", "a photo of a cat"),   # n -> 1
    ("a zorblax and a cat", "a flumphet and a dog"),
    ("a cat and a cat", "a dog and a cat"),
    ("a cat", "a cat"),
])
def test_replace_matches_reference(tok, src, tgt):
    m = words.replace_mapper(src, tgt, tok)
    assert m.shape == (77, 77) and m.dtype == torch.float32
    assert torch.equal(m, ref_replace(src, tgt, tok))


def test_replace_ratio(tok):
    k = n_tokens("hippopotamus", tok)
    assert k > 1
    m = words.replace_mapper("a photo of a cat", "a photo of a hippopotamus", tok)
    assert torch.allclose(m[5, 5:5 + k], torch.full((k,), 1 / k))


def test_replace_word_count_error(tok):
    with pytest.raises(ValueError, match=r"3 words.*4|Refine"):
        words.replace_mapper("a cat sat", "a big cat sat", tok)
    with pytest.raises(ValueError) as e:
        words.replace_mapper("a cat sat", "a big cat sat", tok)
    assert "3" in str(e.value) and "4" in str(e.value) and "Refine" in str(e.value)


def test_batched(tok):
    ps = ["a photo of a cat", "a photo of a dog", "a photo of a hippopotamus"]
    r = words.replace_mappers(ps, tok)
    assert r.shape == (2, 77, 77) and torch.equal(r[1], ref_replace(ps[0], ps[2], tok))
    ps = ["a cat", "a big cat", "a cat on a mat"]
    m, a = words.refine_mappers(ps, tok)
    assert m.shape == (2, 77) and a.shape == (2, 77)
    assert torch.equal(m[1], ref_refine(ps[0], ps[2], tok)[0])


def test_global_align_fuzz():
    rng = random.Random(0)
    for _ in range(200):
        x = [rng.randrange(5) for _ in range(rng.randrange(0, 10))]
        y = [rng.randrange(5) for _ in range(rng.randrange(0, 10))]
        assert list(_native.global_align(x, y)) == ref_align(x, y), (x, y)


def test_long_prompt_truncated(tok):
    long = " ".join(["cat"] * 100)
    m, a = words.refine_mapper(long, long + " dog", tok)
    assert m.shape == (77,) and torch.equal(m, torch.arange(77))
