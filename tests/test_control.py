"""Compilation of controllers into per-step tables, against the reference's formulas restated here."""
import pytest
import torch

import p2p_engine as p2p
from p2p_engine import control as C
from p2p_engine import controllers, words
from p2p_engine.plan import AttnLayer, CrossPlan
from p2p_engine.tokenizer import clip_tokenizer
from reference import ref_word_inds

TOK = clip_tokenizer()
LAYERS = [AttnLayer(0, "down", True, 0), AttnLayer(1, "up", True, 1)]  # cross layers LocalBlend can read
PROMPTS = ["a cat riding a bicycle", "a dog riding a bicycle"]


def ref_alpha(prompts, num_steps, cross, tokenizer):
    """The reference's get_time_words_attention_alpha, restated."""
    def update(alpha, bounds, i, inds=None):
        if isinstance(bounds, float):
            bounds = 0, bounds
        s, e = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
        inds = torch.arange(alpha.shape[2]) if inds is None else torch.tensor(inds)
        alpha[:s, i, inds] = 0
        alpha[s:e, i, inds] = 1
        alpha[e:, i, inds] = 0
        return alpha
    if not isinstance(cross, dict):
        cross = {"default_": cross}
    cross = dict(cross)
    cross.setdefault("default_", (0.0, 1.0))
    a = torch.zeros(num_steps + 1, len(prompts) - 1, 77)
    for i in range(len(prompts) - 1):
        a = update(a, cross["default_"], i)
    for k, v in cross.items():
        if k != "default_":
            for i, p in enumerate(prompts[1:]):
                ind = ref_word_inds(p, k, tokenizer)
                if ind:
                    a = update(a, v, i, ind)
    return a


@pytest.mark.parametrize("steps", [1, 4, 7, 50])
@pytest.mark.parametrize("cross", [0.8, 0.0, 1.0, (0.1, 0.55), {"default_": 0.3, "dog": 0.9}, {"dog": 0.5}])
def test_cross_gate_matches_reference(steps, cross):
    """A dict without "default_" leaves the other tokens on for every step, (0, 1) as the reference's default."""
    assert torch.equal(C.cross_gate(PROMPTS, steps, cross, TOK), ref_alpha(PROMPTS, steps, cross, TOK))


def test_defaults():
    """The documented defaults (REFERENCE.md, API.md): edits replace cross maps for 0.8 and self maps for 0.4 of the
    steps; LocalBlend thresholds both masks at 0.3 of their maximum, picks its level, and leaves its start and the
    self-replacement limit to the source's kind (compiled: from the first step, or 0.2 of the steps given as the
    default of an edit from an inversion; tests/test_editing.py checks both kinds against the notebooks)."""
    for cls in (p2p.Replace, p2p.Refine, p2p.Reweight):
        c = cls()
        assert (c.cross_steps, c.self_steps, c.self_max_queries) == (0.8, 0.4, None), cls.__name__
    blend = p2p.LocalBlend(["a", "b"])
    assert (blend.threshold, blend.subtract_threshold) == (0.3, 0.3)
    assert (blend.start, blend.level, blend.subtract) == (None, None, None)
    prompts = ["a cat", "a dog"]
    for default, start in ((0.0, 0), (0.2, 2)):
        ctrl = C.compile_control(None, prompts, TOK, 10, "cpu", local_blend=controllers.LocalBlend(["cat", "dog"]),
                                 layers=LAYERS, blend_start=default)
        assert (ctrl.blend.start, ctrl.blend.start_fraction) == (start, default)
    given = C.compile_control(None, prompts, TOK, 10, "cpu", local_blend=controllers.LocalBlend(["cat", "dog"],
                                                                                                 start=0.0),
                              layers=LAYERS, blend_start=0.2)
    assert (given.blend.start, given.blend.start_fraction) == (0, 0.0)  # an explicit start wins


@pytest.mark.parametrize("steps,s,want", [(50, 0.4, (0, 20)), (7, 0.4, (0, 2)), (7, (0.2, 0.9), (1, 6)),
                                          (5, 0.0, (0, 0))])
def test_self_window_rounding(steps, s, want):
    assert C.self_window(steps, s) == want


@pytest.mark.parametrize("bad", [1.5, -0.1, (0.2, 1.2), {"default_": 2.0}])
def test_windows_outside_unit_interval_raise(bad):
    with pytest.raises(ValueError, match="0, 1"):
        C.compile_control(controllers.Replace(cross_steps=bad), PROMPTS, TOK, 4, "cpu")
    if not isinstance(bad, dict):
        with pytest.raises(ValueError, match="0, 1"):
            C.compile_control(controllers.Replace(self_steps=bad), PROMPTS, TOK, 4, "cpu")


def test_missing_words_are_named():
    with pytest.raises(ValueError, match="'horse'.*a dog riding a bicycle"):
        C.compile_control(controllers.Reweight({"horse": 2.0}), PROMPTS, TOK, 4, "cpu")
    with pytest.raises(ValueError, match="'horse'"):
        C.compile_control(controllers.Replace(cross_steps={"default_": 0.8, "horse": 0.2}), PROMPTS, TOK, 4, "cpu")
    with pytest.raises(ValueError, match="'horse'.*a cat riding a bicycle"):
        C.compile_control(None, PROMPTS, TOK, 4, "cpu", local_blend=controllers.LocalBlend(["horse", "dog"]))
    with pytest.raises(ValueError, match="empty"):
        words.check_prompts([], TOK)
    with pytest.raises(ValueError, match="source and at least one target"):
        C.compile_control(controllers.Replace(), PROMPTS[:1], TOK, 4, "cpu")


def test_long_prompt_warns_truncation():
    with pytest.warns(UserWarning, match="truncated"):
        words.check_prompts(["cat " * 90], TOK)


def test_refine_one_hot_mapper():
    m = torch.tensor([[0, 1, -1, 2]])
    oh = words.one_hot_mapper(m)
    p = torch.rand(3, 4)
    ref = p[:, m[0].clamp(min=0)] * (m[0] >= 0)
    assert torch.allclose(p @ oh[0], ref)


def test_plan_picks_step_slices():
    steps = 5
    ctl = C.compile_control(controllers.Reweight({"dog": 2.0}, cross_steps=0.5, self_steps=(0.2, 0.6)), PROMPTS, TOK,
                            steps, "cpu")
    gate = ref_alpha(PROMPTS, steps, 0.5, TOK)
    cross = AttnLayer(0, "down", True, 0)
    selfl = AttnLayer(1, "down", False, 0)
    for i in range(steps):
        pc = ctl.plan(cross, 16)
        ps = ctl.plan(selfl, 16)
        assert isinstance(pc, CrossPlan) and pc.store.shape == (2, 16, 77)
        if gate[i].any():
            assert torch.equal(pc.gate, gate[i]) and pc.injects
        else:
            assert not pc.injects
        assert (ps is not None and ps.inject) == (1 <= i < 3)
        ctl.end_step(torch.zeros(2, 4, 4, 4))
    # a large self layer is never replaced (16*16 limit by default)
    ctl.step = 1
    assert ctl.plan(AttnLayer(2, "down", False, 0), 32 * 32) is None
    eq = ctl.edit.equalizer[0]
    assert eq[ref_word_inds(PROMPTS[1], "dog", TOK)].eq(2).all() and eq.sum() == 77 + 1
