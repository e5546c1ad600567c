"""Re-statements of the reference implementation (google/prompt-to-prompt) shared by several tests.

Written from the reference's semantics (../shared/REFERENCE.md), independently of the engine's code, so
that a test comparing the engine with them can fail.
"""


def ref_word_inds(text, place, tok):
    """ptp_utils.get_word_inds: token positions (BOS counted) of word `place` (a string: every occurrence;
    an int: the word at that index) of `text` split on spaces, by walking the decoded tokens."""
    words = text.split(" ")
    places = [i for i, w in enumerate(words) if w == place] if isinstance(place, str) else [place]
    out = []
    if places:
        dec = [tok.decode([t]).strip("#") for t in tok.encode(text)][1:-1]
        cur, ptr = 0, 0
        for i, d in enumerate(dec):
            cur += len(d)
            if ptr in places:
                out.append(i + 1)
            if cur >= len(words[ptr]):
                ptr, cur = ptr + 1, 0
    return out
