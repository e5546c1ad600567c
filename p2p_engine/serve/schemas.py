"""The request bodies of API v1, as the OpenAPI page (`/docs`) shows them: types only, strictly (a string is not a
number, 1.0 is not an integer, NaN and infinities are refused, unknown keys are errors). What depends on the
model and the prompts (words, token windows, the limits) is `validate.py`'s."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class InversionBody(BaseModel):
    model_config = STRICT
    image_id: str = Field(description="from POST /v1/images")
    prompt: str = Field(description="a prompt describing the image")
    method: Literal["null_text", "direct", "negative_prompt", "ddim"] = "null_text"
    steps: int = Field(50, description="DDIM steps; edits from the inversion run these")
    guidance: float | None = Field(None, description="the edits' guidance (default the model family's)")
    inner_steps: int = Field(10, description="null-text optimisation iterations per step")


class ControllerBody(BaseModel):
    model_config = STRICT
    mode: Literal["replace", "refine", "reweight", "store"] = Field(
        "replace", description="replace: word swap (same word count); refine: added words; reweight: scale words "
                               "of the target (prompt edits with an equalizer stack it on replace or refine); "
                               "store: keep attention maps only")
    cross_steps: Fraction | dict[str, Fraction] = Field(
        0.8, description="fraction of steps with cross-attention injection, or {\"default_\": f, word: f}")
    self_steps: Fraction | Annotated[list[Fraction], Field(min_length=2, max_length=2)] = Field(
        0.4, description="fraction of steps with self-attention injection, or [start, end]")
    equalizer: dict[str, float] = Field({}, description="word -> scale of its attention in the targets")


class EditBody(BaseModel):
    model_config = STRICT
    prompts: list[str] | None = Field(None, description="a generated source: the source prompt first, then targets")
    seed: int = Field(0, description="the generated source's noise seed")
    inversion_id: str | None = Field(None, description="an inverted image as the source (POST /v1/inversions)")
    targets: list[str] | None = Field(None, description="with inversion_id: the edited prompts")
    controller: ControllerBody | None = None
    blend: list[list[str]] | None = Field(None, description="local blend: the words of each prompt, source first")
    steps: int | None = Field(None, description="sampling steps (default 50; an inversion's own)")
    guidance: float | None = Field(None, description="default the family's, or the inversion's")
    sampler: Literal["ddim", "pndm", "dpmsolver++"] | None = Field(None, description="ddim with an inversion")
    maps: bool = Field(False, description="keep per-word cross-attention maps (results' maps/...)")
