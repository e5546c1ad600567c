"""What a request asks, checked against the model, the prompts and the server's limits before it is queued.

`schemas.py` has already checked the types; here each refusal is an `ApiError` whose message names what to fix
and whose `field` names where (`controller.equalizer`, `targets[1]`, ...). An edit is also compiled once on the
CPU with the routes' own tokenizer (`compile_control`, as the engine compiles it), so what the engine would
refuse (a word swap between prompts of different lengths, a blend word missing) is answered with a 422 now,
not with a failed job later.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..control import compile_control
from ..controllers import LocalBlend, Store, from_spec
from ..words import MAX_TOKENS, require_word, word_inds
from .store import BadId, check_id, derived_id


class ApiError(Exception):
    """An answer with a 4xx status: JSON {"error": message, "field": field}."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.headers = status, field, headers


class UploadTooLarge(Exception):
    """Raised by the guard while an upload without a Content-Length arrives, once it passes the limit."""


def checked_id(value, field: str) -> str:
    try:
        return check_id(value, field)
    except BadId as e:
        raise ApiError(422, str(e), field) from None


@dataclass
class Model:
    """What the routes read of the loaded model: sizes, defaults, its attention layers, and a tokenizer of their
    own (the worker's may be in use on its thread)."""

    tokenizer: object
    latent_hw: tuple[int, int]
    default_guidance: float
    layers: list
    self_max_queries: int
    fingerprint: str  # a hash of the weights probe: inversion ids of another model differ
    schedule: object  # the model's `scheduler.DDIM` (its timesteps are plain arithmetic)

    @classmethod
    def of(cls, pipe) -> "Model":
        import copy
        side = pipe.config.latent_size
        probe = pipe.weights_probe()
        return cls(copy.deepcopy(pipe.tokenizer), (side, side), pipe.default_guidance, pipe.unet.attn_layers,
                   pipe.self_max_queries(side, side),
                   derived_id({"probe": [round(float(v), 6) for v in probe], "family": pipe.family}), pipe.scheduler)


def check_prompt(prompt: str, tokenizer, field: str) -> str:
    """Refuse a prompt past the text encoder's window, naming its first word that does not fit."""
    n = len(tokenizer(prompt).input_ids)
    if n <= MAX_TOKENS:
        return prompt
    words = prompt.split(" ")
    for i in range(len(words)):
        if len(tokenizer(" ".join(words[:i + 1])).input_ids) > MAX_TOKENS:
            raise ApiError(422, f"{field}: the prompt has {n} tokens and the model reads {MAX_TOKENS} (its start and "
                                f"end included); the words from {words[i]!r} (word {i}) on would be cut: shorten it",
                           field)
    raise ApiError(422, f"{field}: the prompt has {n} tokens, past the model's {MAX_TOKENS}; shorten it", field)


def prompt_words(prompt: str, tokenizer) -> list[dict]:
    """GET /v1/tokens: each word (split on spaces) with its token positions (BOS is 0; empty past the window)."""
    return [{"index": i, "word": w, "tokens": word_inds(prompt, i, tokenizer)}
            for i, w in enumerate(prompt.split(" "))]


def _steps(steps: int, config, model: Model) -> int:
    if not 1 <= steps <= config.max_steps:
        raise ApiError(422, f"steps must be in [1, {config.max_steps}] (--max-steps), got {steps}", "steps")
    try:
        model.schedule.timesteps(steps)  # what the model's schedule allows (e.g. 999 steps at most with offset 1)
    except ValueError as e:
        raise ApiError(422, f"steps: {e}", "steps") from None
    return steps


# -- inversions


@dataclass
class InversionSpec:
    image_id: str
    prompt: str
    method: str
    steps: int
    guidance: float
    inner_steps: int
    inversion_id: str
    rows: int = 0  # inversions run in their own lane, one at a time

    def request(self) -> dict:
        return {"image_id": self.image_id, "prompt": self.prompt, "method": self.method, "steps": self.steps,
                "guidance": self.guidance, "inner_steps": self.inner_steps, "inversion_id": self.inversion_id}


def inversion_spec(body, model: Model, store, config) -> InversionSpec:
    image_id = checked_id(body.image_id, "image_id")
    if store.image_path(image_id) is None:
        raise ApiError(404, f"image_id {image_id}: no such image; upload it with POST /v1/images", "image_id")
    prompt = check_prompt(body.prompt, model.tokenizer, "prompt")
    steps = _steps(body.steps, config, model)
    inner = body.inner_steps if body.method == "null_text" else 0
    if not 0 <= inner <= config.max_inner_steps:
        raise ApiError(422, f"inner_steps must be in [0, {config.max_inner_steps}] (--max-inner-steps), got {inner}",
                       "inner_steps")
    guidance = model.default_guidance if body.guidance is None else body.guidance
    inputs = {"image_id": image_id, "prompt": prompt, "method": body.method, "steps": steps, "guidance": guidance,
              "inner_steps": inner, "model": model.fingerprint}
    return InversionSpec(image_id, prompt, body.method, steps, guidance, inner, derived_id(inputs))


# -- edits


@dataclass
class EditSpec:
    prompts: list[str]  # the source first
    seed: int | None  # a generated source's; None from an inversion
    inversion_id: str | None
    controller: object  # p2p_engine controller or None
    local_blend: LocalBlend | None
    steps: int
    guidance: float
    sampler: str
    maps: bool
    latent_hw: tuple[int, int]
    timesteps: tuple | None  # an inversion's, which its edits run

    @property
    def rows(self) -> int:
        """UNet rows of one call of its loop: the unconditional and conditional row of each prompt."""
        return 2 * len(self.prompts)

    @property
    def cacheable(self) -> bool:
        """Whether its source row can come from an edit cache (it has targets to run)."""
        return len(self.prompts) >= 2

    @property
    def source_key(self) -> tuple:
        """What fixes the source row: its edit cache and its past edits are looked up by it."""
        source = ("inversion", self.inversion_id) if self.inversion_id else ("generated", self.prompts[0], self.seed)
        return source + (self.steps, self.guidance, self.sampler, self.latent_hw)


def edit_spec(body, model: Model, store, config, inversion_job=None) -> EditSpec:
    """`inversion_job`: the queued or running job of `body.inversion_id`, if any (a 409 then: wait for it)."""
    tok = model.tokenizer
    if (body.prompts is None) == (body.inversion_id is None):
        raise ApiError(422, "give either \"prompts\" (a generated source: source prompt first, then targets) or "
                            "\"inversion_id\" with \"targets\"", "prompts")
    timesteps = None
    if body.prompts is not None:
        if body.targets is not None:
            raise ApiError(422, "\"targets\" go with \"inversion_id\"; with \"prompts\", list the targets after the "
                                "source in \"prompts\"", "targets")
        prompts, names = list(body.prompts), [f"prompts[{i}]" for i in range(len(body.prompts))]
        if not prompts:
            raise ApiError(422, "prompts is empty: give the source prompt first, then the targets", "prompts")
        if not 0 <= body.seed < 2 ** 63:
            raise ApiError(422, f"seed must be in [0, 2**63), got {body.seed}", "seed")
        steps = _steps(50 if body.steps is None else body.steps, config, model)
        guidance = model.default_guidance if body.guidance is None else body.guidance
        sampler, seed, inversion_id = body.sampler or "ddim", body.seed, None
    else:
        inversion_id = checked_id(body.inversion_id, "inversion_id")
        meta = store.inversion_request(inversion_id)
        if meta is None:
            if inversion_job is not None:
                raise ApiError(409, f"inversion {inversion_id} is still being made (job {inversion_job.id}); "
                                    f"edit it when that job is done", "inversion_id")
            raise ApiError(404, f"inversion_id {inversion_id}: no such inversion; make one with POST /v1/inversions",
                           "inversion_id")
        if not body.targets:
            raise ApiError(422, "targets: give at least one edited prompt (the source is the inverted prompt)",
                           "targets")
        prompts = [meta["prompt"]] + list(body.targets)
        names = ["prompt of the inversion"] + [f"targets[{i}]" for i in range(len(body.targets))]
        if body.steps is not None and body.steps != meta["steps"]:
            raise ApiError(422, f"steps: an edit from an inversion runs the inversion's {meta['steps']} steps; leave "
                                f"steps out", "steps")
        if body.sampler not in (None, "ddim"):
            raise ApiError(422, "sampler: an edit from an inversion runs DDIM on the inversion's timesteps; leave "
                                "sampler out", "sampler")
        steps, sampler, seed = meta["steps"], "ddim", None
        guidance = meta["guidance"] if body.guidance is None else body.guidance
        timesteps = tuple(meta["timesteps"])
    if len(prompts) > config.max_prompts:
        raise ApiError(422, f"an edit takes at most {config.max_prompts} prompts, source included (--max-prompts); "
                            f"got {len(prompts)}", "targets" if inversion_id else "prompts")
    for prompt, name in zip(prompts, names):
        check_prompt(prompt, tok, name)
    controller = _controller(body.controller, prompts, tok)
    blend = _blend(body.blend, prompts, tok)
    spec = EditSpec(prompts, seed, inversion_id, controller, blend, steps, guidance, sampler, body.maps,
                    model.latent_hw, timesteps)
    try:  # what the engine would refuse, refused now (the module docstring)
        compile_control(controller, prompts, tok, steps, "cpu", layers=model.layers, local_blend=blend,
                        store=body.maps, calls=steps + (sampler == "pndm"), self_max_queries=model.self_max_queries)
    except (ValueError, TypeError) as e:
        raise ApiError(422, str(e), "blend" if "LocalBlend" in str(e) or "blend" in str(e) else "controller") from None
    return spec


def _controller(body, prompts: list[str], tokenizer):
    if body is None:
        return None if len(prompts) == 1 else from_spec({"mode": "replace"})
    if body.mode == "store":
        if body.equalizer:
            raise ApiError(422, "controller.equalizer: mode store keeps maps and edits nothing; use mode reweight",
                           "controller.equalizer")
        return Store()
    if len(prompts) < 2:
        raise ApiError(422, f"controller mode {body.mode} edits targets: add at least one target prompt after the "
                            f"source", "prompts")
    for word, scale in body.equalizer.items():
        if not math.isfinite(scale):
            raise ApiError(422, f"controller.equalizer: the scale of {word!r} must be finite", "controller.equalizer")
        for p in prompts[1:]:
            try:
                require_word(p, word, tokenizer, "controller.equalizer")
            except ValueError as e:
                raise ApiError(422, str(e), "controller.equalizer") from None
    spec = {"mode": body.mode, "cross_steps": body.cross_steps,
            "self_steps": tuple(body.self_steps) if isinstance(body.self_steps, list) else body.self_steps}
    if isinstance(spec["self_steps"], tuple) and spec["self_steps"][0] > spec["self_steps"][1]:
        raise ApiError(422, f"controller.self_steps: start {spec['self_steps'][0]} is after end "
                            f"{spec['self_steps'][1]}", "controller.self_steps")
    if body.equalizer:
        spec["equalizer"] = dict(body.equalizer)
    try:
        return from_spec(spec)
    except ValueError as e:
        raise ApiError(422, str(e), "controller.equalizer" if "equalizer" in str(e) else "controller") from None


def _blend(blend, prompts: list[str], tokenizer) -> LocalBlend | None:
    if blend is None:
        return None
    if len(blend) != len(prompts):
        raise ApiError(422, f"blend takes one list of words per prompt, source first ({len(prompts)} here), got "
                            f"{len(blend)}", "blend")
    for i, (words, prompt) in enumerate(zip(blend, prompts)):
        if not words:
            raise ApiError(422, f"blend[{i}]: name at least one word of {prompt!r}", f"blend[{i}]")
        for word in words:
            try:
                require_word(prompt, word, tokenizer, f"blend[{i}]")
            except ValueError as e:
                raise ApiError(422, str(e), f"blend[{i}]") from None
    return LocalBlend([list(w) for w in blend])
