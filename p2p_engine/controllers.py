"""What a user asks an edit to do: the controller descriptions, and `from_spec` for dict specs.

`Store`, `Replace`, `Refine`, `Reweight` and `LocalBlend` are plain dataclasses
(windows as fractions of the steps, words as strings); `control.compile_control`
turns them into tensors once per edit. The other editors, `MasaCtrl` and
`PlugAndPlay`, are described here too and compiled by `p2p_engine.editors`.
`from_spec` builds a controller from the dict form the job files use and the
command line builds from its flags.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .checks import is_number


@dataclass
class Store:
    """Keep attention maps only; no edit. `self_maps` also keeps self maps of layers with N <= 32*32."""

    self_maps: bool = False


@dataclass
class _Edit:
    cross_steps: object = 0.8
    self_steps: object = 0.4
    # Self replacement applies to layers with at most this many queries: 16*16 in the stable notebook, 32*32 in
    # the null-text notebook. None: the notebook of the source's kind (`Pipeline.self_max_queries`): for an edit
    # from an inversion the null-text notebook's 32*32, the reference for real images; for a generated image the
    # stable notebook's 16*16. SDXL scales both with the latent side L ((L/2)^2 and (L/4)^2), as REFERENCE.md's
    # SDXL section says.
    self_max_queries: int | None = None
    self_maps: bool = False
    # The targets' stored maps: False, each prompt's own (before injection); True, the maps the edit used (after
    # injection), which is what the reference's AttentionStore holds, its edit writing through a view of them.
    injected_maps: bool = False


@dataclass
class Replace(_Edit):
    """Word swap: target cross maps become P_src @ M_j (same number of words in every prompt)."""


@dataclass
class Refine(_Edit):
    """Added words: aligned tokens take the source's maps, inserted tokens keep their own."""


@dataclass
class Reweight(_Edit):
    """Scale the chosen words' columns of the (mapped) source maps; `prev` is a Replace or Refine."""

    equalizer: dict = field(default_factory=dict)
    prev: object = None

    def __init__(self, equalizer=None, prev=None, cross_steps=0.8, self_steps=0.4,
                 self_max_queries=None, self_maps=False, injected_maps=False):
        super().__init__(cross_steps, self_steps, self_max_queries, self_maps, injected_maps)
        if equalizer is not None and not isinstance(equalizer, dict):
            raise TypeError(f"Reweight's equalizer maps words to scales, e.g. {{\"fluffy\": 2.0}}; got "
                            f"{type(equalizer).__name__}")
        self.equalizer = dict(equalizer or {})
        self.prev = prev
        if prev is not None and not isinstance(prev, (Replace, Refine)):
            raise TypeError(f"Reweight(prev=...) must be a Replace or Refine, got {type(prev).__name__}")


@dataclass
class LocalBlend:
    """Keep the source latent outside the chosen words' region.

    words: one entry per prompt (a word or a list of words), e.g. ["cat", "dog"].
    subtract: the same shape, or None (null-text notebook's subtraction).
    start: fraction of the steps before blending starts; None: the notebook of the source's kind, 0.2 for an
        edit from an inversion (the null-text notebook's, the reference for real images), 0 for a generated
        image (the stable notebook's). `EditOutput.blend_start` states the value an edit used.
    level: the UNet level whose down/up cross maps build the mask; None = latent / 4 (the
        reference's 16x16 maps at 64x64 latents), falling back to the coarsest level with
        down/up cross attention.
    """

    words: object
    subtract: object = None
    start: float | None = None
    threshold: float = 0.3
    subtract_threshold: float = 0.3
    level: int | None = None


class Editor:
    """The editors other than Prompt-to-Prompt's word edits (`p2p_engine.editors` compiles them): they read the
    source row in both guidance halves, through self-attention plans with `rows` and the decoder's feature seam."""

    self_maps: bool = False


@dataclass
class MasaCtrl(Editor):
    """Mutual self-attention (MasaCtrl; PnPInversion's run_editing_masactrl.py): from UNet call `start_step` on,
    in the self-attention layers of the transformer blocks numbered `start_layer` and after (forward order; SD
    1.x/2.x have 16), every row keeps its own queries and attends to the keys and values of its guidance half's
    source row. Cross attention is untouched.

    start_layer None: the decoder's two finest resolutions (the latent's and half of it): 10 of 16 on SD 1.x/2.x,
    the reference's; on SDXL, which has no attention at the latent's own size, the up block at half of it (64 of
    70). The reference's source prompt, and its inversion's, is "": give prompts ["", target] for it, or the
    source prompt (docs/editors.md)."""

    start_step: int = 4
    start_layer: int | None = None
    self_maps: bool = False


# Plug-and-Play's negative prompt for the target's unconditional branch (PnPInversion's run_editing_pnp.py, as
# the original plug-and-play code's default configuration).
PNP_NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"
PNP_BRANCHES = ("empty", "prompt")


@dataclass
class PlugAndPlay(Editor):
    """Plug-and-Play (PnPInversion's run_editing_pnp.py): the source branch's residual features at the decoder's
    latent/4 block's second resnet (SD 1.x: up_blocks[1].resnets[1]) for the first `feature_steps` of the steps,
    and its self-attention queries and keys in the decoder's later attention modules (SD 1.x:
    up_blocks[1].attentions[1, 2], up_blocks[2, 3].attentions[0 .. 2]) for the first `self_steps`, taken by every
    target row in both guidance halves. Windows are fractions of the steps, or (start, end) pairs.

    branch: "empty", the source's unconditional row (the empty prompt "" for DDIM and Direct inversions and
    generation, as the reference's source branch), or "prompt", the source prompt's row.
    negative_prompt: the targets' unconditional prompt (the reference's; None keeps the edit's own).
    From a DDIM inversion the source row advances at guidance 1 (the reference's reconstruction); from a direct
    one it is pinned to the pivots (the reference's inversion latents)."""

    feature_steps: object = 0.8
    self_steps: object = 0.5
    branch: str = "empty"
    negative_prompt: str | None = PNP_NEGATIVE_PROMPT
    self_maps: bool = False


MODES = ("replace", "refine", "reweight", "masactrl", "pnp")
SPEC_KEYS = ("mode", "cross_steps", "self_steps", "equalizer", "self_max_queries")
EDITOR_KEYS = {"masactrl": ("mode", "start_step", "start_layer"),
               "pnp": ("mode", "feature_steps", "self_steps", "branch", "negative_prompt")}
BLEND_KEYS = ("words", "subtract", "start", "threshold", "subtract_threshold", "level")


def from_spec(spec: dict | None):
    """{"mode": "replace" | "refine" | "reweight", "cross_steps": ..., "self_steps": ..., "equalizer":
    {word: scale}, "self_max_queries": n} -> a controller (every key optional; mode defaults to replace).
    An equalizer given with replace or refine stacks a Reweight on the word edit, as the reference's
    `controller=prev` does. {"mode": "masactrl", "start_step", "start_layer"} and {"mode": "pnp",
    "feature_steps", "self_steps", "branch", "negative_prompt"} give the other editors. Raises ValueError naming
    the key to fix."""
    spec = dict(spec or {})
    if spec.get("mode") in EDITOR_KEYS:
        mode = spec.pop("mode")
        unknown = sorted(set(spec) - set(EDITOR_KEYS[mode]))
        if unknown:
            raise ValueError(f"unknown {mode} controller keys {unknown}; it has {list(EDITOR_KEYS[mode])}")
        return (MasaCtrl if mode == "masactrl" else PlugAndPlay)(**spec)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"unknown controller keys {unknown}; a controller has {list(SPEC_KEYS)}")
    mode = spec.pop("mode", "replace")
    if mode not in MODES:
        raise ValueError(f"controller mode must be one of {MODES}, got {mode!r}")
    equalizer = spec.pop("equalizer", None) or {}
    if not isinstance(equalizer, dict) or not all(
            is_number(v) for v in equalizer.values()):
        raise ValueError(f"the equalizer must map words to numbers, e.g. {{\"fluffy\": 2.0}}; got {equalizer!r}")
    if mode == "reweight":
        if not equalizer:
            raise ValueError("mode reweight needs at least one word to scale: an equalizer {word: scale} "
                             "(on the command line, --reweight WORD=SCALE)")
        return Reweight(equalizer=equalizer, **spec)
    base = (Replace if mode == "replace" else Refine)(**spec)
    return Reweight(equalizer=equalizer, prev=base, **spec) if equalizer else base


def blend_from_spec(spec: dict | None) -> LocalBlend | None:
    """{"words": [...], "subtract": ..., "start": ..., "threshold": ..., ...} -> LocalBlend (None -> None).
    Raises ValueError naming the key to fix."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or "words" not in spec:
        raise ValueError(f"a blend is an object with 'words' (one entry per prompt), got {spec!r}")
    unknown = sorted(set(spec) - set(BLEND_KEYS))
    if unknown:
        raise ValueError(f"unknown blend keys {unknown}; a blend has {list(BLEND_KEYS)}")
    words = spec["words"]
    if not isinstance(words, list) or not all(isinstance(w, (str, list)) for w in words):
        raise ValueError(f"blend 'words' must list one word (or list of words) per prompt, got {words!r}")
    return LocalBlend(**spec)
