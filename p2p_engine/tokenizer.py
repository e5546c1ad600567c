"""The CLIP tokenizer: from a checkpoint's `tokenizer/` folder, or built from the
CLIP BPE vocabulary shipped with the package (for single-file checkpoints).

SD 1.x pads with `<|endoftext|>` (49407); SD 2.x (OpenCLIP) pads with `!` (id 0),
as the `special_tokens_map.json` of diffusers' SD 2.x tokenizer folders says.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
from importlib import resources

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
VOCAB_SIZE = 49408
# 49408 = 256 bytes + 256 bytes with "</w>" + merges + 2 specials.
N_MERGES = VOCAB_SIZE - 2 * 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable-character table: printable Latin-1 bytes map to themselves,
    the rest to code points from 256 up, in byte order (so BPE never sees whitespace/control bytes)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # CLIP lists the kept bytes first, then the remapped ones: order the dict the same way.
    return {b: table[b] for b in keep} | {b: table[b] for b in range(256) if b not in keep}


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id with 49408 entries, merges as "a b" strings) from the shipped BPE file."""
    with resources.files("p2p_engine.data").joinpath(BPE_FILE).open("rb") as raw:
        lines = gzip.decompress(raw.read()).decode("utf-8").split("\n")
    merges = lines[1:1 + N_MERGES]  # line 0 is a version header
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = EOS):
    """A transformers CLIPTokenizer built in memory from the shipped vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], unk_token=EOS, bos_token=BOS,
                         eos_token=EOS, pad_token=pad_token, model_max_length=MAX_LENGTH)


def load_tokenizer(folder: str | os.PathLike):
    """CLIPTokenizer from a diffusers `tokenizer/` folder (vocab.json + merges.txt + special tokens)."""
    from transformers import CLIPTokenizer

    from .files import CheckpointError

    try:
        tok = CLIPTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)
    except Exception as e:  # transformers raises bare Exception, OSError or ValueError for a broken folder
        raise CheckpointError(f"{folder}: cannot read the CLIP tokenizer (vocab.json, merges.txt): {e}") from None
    tok.model_max_length = MAX_LENGTH  # some folders store a huge sentinel here
    return tok


def write_tokenizer(folder: str | os.PathLike, pad_token: str = EOS) -> None:
    """Write a diffusers-style tokenizer folder for the real CLIP vocabulary."""
    from .files import atomic_write, write_json

    vocab, merges = clip_vocab_and_merges()
    with atomic_write(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with atomic_write(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
    write_json(os.path.join(folder, "tokenizer_config.json"),
               {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
                "do_lower_case": True, "errors": "replace", **special})
