"""Words of prompts: token positions, the token mappers of Replace and Refine (and a word edit's mapping tables),
prompt checks.

The work is done in C++ (`csrc/aligner.cpp`, the module `p2p_engine._native`);
this is its glue. `tokenizer` is the pipeline's CLIP tokenizer. Prompts longer
than the 77-token window are truncated as the text encoder sees them (the
reference does the same, with a warning from `check_prompts`); words past the
window have no tokens, and asking for one is an error.
"""
from __future__ import annotations

import math

import torch

from . import _native
from .checks import is_number, warn
from .controllers import Replace, Reweight

MAX_TOKENS = 77  # the text encoder's window, BOS and EOS included


def _ids(text: str, tokenizer) -> list[int]:
    # BOS ... EOS, truncated to the 77-token window the text encoder sees
    return tokenizer.encode(text, truncation=True, max_length=MAX_TOKENS)


def _decoded_tokens(text: str, tokenizer) -> list[str]:
    return [tokenizer.decode([i]).strip("#") for i in _ids(text, tokenizer)][1:-1]


def word_inds(prompt: str, word: str | int, tokenizer) -> list[int]:
    """Token positions (BOS counted, so from 1) of `word` (every occurrence of a string, or
    the word at an index) in `prompt` split on spaces."""
    words = prompt.split(" ")
    places = [i for i, w in enumerate(words) if w == word] if isinstance(word, str) else [int(word)]
    if not places:
        return []
    return list(_native.word_token_positions(words, _decoded_tokens(prompt, tokenizer), places))


def replace_mapper(source: str, target: str, tokenizer, max_len: int = MAX_TOKENS) -> torch.Tensor:
    """(max_len, max_len) float: target map = source map @ mapper, for a word swap."""
    ws, wt = source.split(" "), target.split(" ")
    if len(ws) != len(wt):
        raise ValueError(
            f"Replace needs prompts with the same number of words: {source!r} has {len(ws)} words, "
            f"{target!r} has {len(wt)}. Use Refine for prompts that add or remove words.")
    swapped = [i for i in range(len(wt)) if ws[i] != wt[i]]
    src = [word_inds(source, i, tokenizer) for i in swapped]
    tgt = [word_inds(target, i, tokenizer) for i in swapped]
    for i, s, t in zip(swapped, src, tgt):
        if not s or not t:
            raise ValueError(f"word {i} ({ws[i]!r} -> {wt[i]!r}) lies past the 77-token window of the prompt")
    flat = _native.replacement_mapper(src, tgt, max_len)
    return torch.tensor(flat, dtype=torch.float32).view(max_len, max_len)


def refine_mapper(source: str, target: str, tokenizer, max_len: int = MAX_TOKENS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper (max_len,) int64, alphas (max_len,) float): target token j takes source column
    mapper[j] where alphas[j] = 1; inserted tokens have mapper -1 and alpha 0; positions past
    the target prompt map to themselves."""
    x, y = _ids(source, tokenizer), _ids(target, tokenizer)
    y_to_x = torch.tensor(_native.global_align(x, y), dtype=torch.int64)
    mapper = torch.arange(max_len, dtype=torch.int64)
    alphas = torch.ones(max_len)
    n = min(len(y), max_len)
    mapper[:n] = y_to_x[:n]
    alphas[:n] = (y_to_x[:n] != -1).float()
    return mapper, alphas


def replace_mappers(prompts: list[str], tokenizer) -> torch.Tensor:
    """(P-1, 77, 77): the mapper from prompts[0] to each other prompt."""
    return torch.stack([replace_mapper(prompts[0], p, tokenizer) for p in prompts[1:]])


def refine_mappers(prompts: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """((P-1, 77) int64, (P-1, 77) float)."""
    pairs = [refine_mapper(prompts[0], p, tokenizer) for p in prompts[1:]]
    return torch.stack([m for m, _ in pairs]), torch.stack([a for _, a in pairs])


_PUNCTUATION = ",.;:!?\"'()"


def require_word(prompt: str, word: str, tokenizer, what: str) -> list[int]:
    """`word_inds`, raising with a message naming `what` asked when the word is not in the prompt."""
    inds = word_inds(prompt, word, tokenizer)
    if not inds and word in prompt.split(" "):
        raise ValueError(f"{what}: the word {word!r} lies past the 77-token window of the prompt {prompt!r}, "
                         "which the text encoder truncates")
    if not inds:
        near = [w for w in dict.fromkeys(prompt.split(" ")) if isinstance(word, str) and word and w != word
                and w.strip(_PUNCTUATION) == word.strip(_PUNCTUATION)]
        hint = f"; the prompt has {' or '.join(map(repr, near))}" if near else ""
        raise ValueError(f"{what}: the word {word!r} is not in the prompt {prompt!r} "
                         f"(words are matched whole, split on spaces{hint})")
    return inds


def check_prompts(prompts, tokenizer) -> list[str]:
    """A list of prompt strings, source first; warns about prompts the text encoder will truncate."""
    if isinstance(prompts, str):
        prompts = [prompts]
    try:
        prompts = list(prompts)
    except TypeError:
        raise TypeError(f"prompts must be a list of strings, source first, got {type(prompts).__name__}") from None
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (the source first)")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"every prompt must be a str, got {type(p).__name__}")
        n = len(tokenizer(p).input_ids)
        if n > MAX_TOKENS:
            warn(f"prompt {p!r} has {n} tokens; it is truncated to {MAX_TOKENS} like the reference does")
    return prompts


def one_hot_mapper(mapper: torch.Tensor) -> torch.Tensor:
    """(P-1, T) index map (-1 = unaligned) -> (P-1, T, T) with column t holding a 1 at row mapper[t]."""
    n, t = mapper.shape
    out = torch.zeros(n, t, t)
    cols = torch.arange(t).expand(n, t)
    ok = mapper >= 0
    b = torch.arange(n)[:, None].expand(n, t)
    out[b[ok], mapper[ok].long(), cols[ok]] = 1.0
    return out


def edit_mapping(ctrl, prompts, tokenizer):
    """A word edit's (mapper (P-1,T,T), mix (P-1,T) or None, equalizer (P-1,T) or None): `plan.inject_cross`'s."""
    n = len(prompts) - 1
    if isinstance(ctrl, Reweight):
        if ctrl.prev is not None:
            mapper, mix, _ = edit_mapping(ctrl.prev, prompts, tokenizer)
        else:
            mapper, mix = torch.eye(MAX_TOKENS).expand(n, -1, -1).clone(), None
        if not ctrl.equalizer and ctrl.prev is None:
            raise ValueError("Reweight needs at least one word to scale: an equalizer {word: scale}, e.g. "
                             "Reweight({\"fluffy\": 2.0})")
        eq = torch.ones(n, MAX_TOKENS)
        for word, scale in ctrl.equalizer.items():
            if not (is_number(scale) and math.isfinite(scale)):
                raise ValueError(f"Reweight equalizer: the scale of {word!r} must be a finite number, got {scale!r}")
            for j, p in enumerate(prompts[1:]):
                eq[j, require_word(p, word, tokenizer, "Reweight equalizer")] = float(scale)
        return mapper, mix, eq
    if isinstance(ctrl, Replace):
        return replace_mappers(prompts, tokenizer), None, None
    mapper, alphas = refine_mappers(prompts, tokenizer)
    return one_hot_mapper(mapper), alphas.float(), None
