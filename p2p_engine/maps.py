"""Stored attention maps of one edit, retrievable per resolution and per word.

Cross maps are kept for every layer at every resolution (8/16/32/64 at SD
sizes; the reference keeps <= 32 and shows 16), summed over UNet calls (one per
step, steps + 1 with PNDM; `steps` is their number, as the reference's cur_step) and averaged
over heads: (P, N, 77) per layer, the maps of the conditional rows before
injection. Self maps (P, N, N) for N <= 32*32 only when asked for.

`cross(res)` averages the layers of that resolution in the down and up
blocks, as the reference's visualisation does; the mid block is used only
for a resolution no down/up layer has (8x8 at SD sizes, 4x4 for "tiny"),
so every stored resolution can be retrieved.

Difference from the reference, by choice: the reference's AttentionStore
keeps the edited rows *after* injection (its edit writes through a view of
the stored tensor), so its maps of a target show the source's layout inside
the cross window. These maps are each prompt's own (pre-injection) maps, as
the plan contract states. LocalBlend alone rebuilds the post-injection sums
(see control.Control.end_step) so that its masks match the reference. The
reference's maps are one option away: an edit controller with
`injected_maps=True` keeps the targets' maps as the edit used them (cross maps
injected inside their window, self maps of the replaced layers the source's),
rebuilt per call from the same buffers (not for re-edits from a cache).
"""
from __future__ import annotations

import torch

from .checks import is_int
from .words import require_word


PLACES = ("down", "mid", "up")  # the UNet blocks an attention layer lies in (plan.AttnLayer.place)
SELF_MAPS_MAX_QUERIES = 32 * 32  # self maps are kept for layers of at most this many queries, as the reference


def level_hw(h: int, w: int, level: int) -> tuple[int, int]:
    """The map size of an attention layer at `level` for latents of h x w: each level halves with a stride-2
    convolution (padding 1), rounding up."""
    return -(-h // 2 ** level), -(-w // 2 ** level)


class AttentionMaps:
    def __init__(self, prompts, layers, cross_sum, self_sum, steps: int, latent_hw, tokenizer=None):
        self.prompts = list(prompts)
        self.layers = layers  # layer index -> (AttnLayer, n_queries)
        self._cross = cross_sum  # layer index -> (P, N, 77)
        self._self = self_sum  # layer index -> (P, N, N)
        self.steps = steps  # UNet calls summed into the maps
        self.latent_hw = tuple(latent_hw)
        self.tokenizer = tokenizer

    def _hw(self, level: int) -> tuple[int, int]:
        return level_hw(*self.latent_hw, level)

    @property
    def resolutions(self) -> list[int]:
        """Map heights with stored cross maps, finest first."""
        return sorted({self._hw(self.layers[k][0].level)[0] for k in self._cross}, reverse=True)

    def _pick(self, store, res: int, places):
        if not is_int(res):
            raise TypeError(f"res is a map height in latent pixels (an int such as 16), got {res!r}")
        if isinstance(places, str):
            places = (places,)
        if not places or any(p not in PLACES for p in places):
            raise ValueError(f"places must name blocks among {PLACES} (e.g. (\"down\", \"up\")), got {places!r}")
        keys = [k for k in store if self._hw(self.layers[k][0].level)[0] == res]
        if not keys:
            raise ValueError(f"no stored maps at resolution {res}; available: {self.resolutions}")
        chosen = [k for k in keys if self.layers[k][0].place in places] or keys
        return chosen, self._hw(self.layers[chosen[0]][0].level)

    def cross(self, res: int = 16, places=("down", "up")) -> torch.Tensor:
        """(P, res_h, res_w, 77): cross maps averaged over heads, the layers of that resolution, and steps."""
        keys, (h, w) = self._pick(self._cross, res, places)
        m = sum(self._cross[k] for k in keys) / (len(keys) * self.steps)
        return m.reshape(m.shape[0], h, w, m.shape[-1])

    def self_maps(self, res: int = 16, places=("down", "up")) -> torch.Tensor:
        """(P, N, N) self maps (N = res_h * res_w) averaged like `cross`; needs self_maps=True."""
        if not self._self:
            raise ValueError("no self maps were stored: pass a controller with self_maps=True "
                             "(e.g. p2p.Store(self_maps=True))")
        keys, _ = self._pick(self._self, res, places)
        return sum(self._self[k] for k in keys) / (len(keys) * self.steps)

    def word_maps(self, prompt_index: int, word: str, res: int = 16) -> torch.Tensor:
        """(res_h, res_w): the mean over the word's tokens of prompt `prompt_index`'s cross maps."""
        if self.tokenizer is None:
            raise ValueError("word_maps needs the tokenizer; these maps were built without one")
        n = len(self.prompts)
        if not is_int(prompt_index) or not -n <= prompt_index < n:
            raise IndexError(f"prompt_index must be an int in [0, {n}) (0 is the source), got {prompt_index!r}")
        inds = require_word(self.prompts[prompt_index], word, self.tokenizer, "word_maps")
        return self.cross(res)[prompt_index][..., inds].mean(-1)
