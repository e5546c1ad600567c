"""The CLIP tokenizer built from the shipped BPE file gives the real Stable Diffusion token ids."""
import pytest

from p2p_engine.tokenizer import (BOS, EOS, VOCAB_SIZE, clip_tokenizer, clip_vocab_and_merges, load_tokenizer,
                                  write_tokenizer)

# Token ids of the real SD 1.x/2.x tokenizers (openai/clip-vit-large-patch14 vocabulary).
CAT_IDS = [49406, 320, 2368, 4919, 525, 320, 1615, 49407]
PROMPTS = ["a cat sitting on a car", "A photo of a Squirrel, eating a burger!!", "  spaces   and\ttabs ",
           "café naïve 東京 🐱", ""]


def test_vocab_layout():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab[BOS] == 49406 and vocab[EOS] == 49407
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))


@pytest.mark.parametrize("pad,pad_id", [(EOS, 49407), ("!", 0)])
def test_known_ids_and_padding(pad, pad_id):
    tok = clip_tokenizer(pad)
    ids = tok(["a cat sitting on a car"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert ids[:8] == CAT_IDS and ids[8:] == [pad_id] * 69


def test_truncation_keeps_eos():
    ids = clip_tokenizer()(["cat " * 100], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and ids[1:76] == [2368] * 75


@pytest.mark.parametrize("pad", [EOS, "!"])
def test_written_folder_matches_in_memory(tmp_path, pad):
    write_tokenizer(tmp_path, pad)
    a, b = load_tokenizer(tmp_path), clip_tokenizer(pad)
    assert a.pad_token == pad and a.model_max_length == 77
    kw = dict(padding="max_length", max_length=77, truncation=True)
    assert a(PROMPTS, **kw).input_ids == b(PROMPTS, **kw).input_ids
