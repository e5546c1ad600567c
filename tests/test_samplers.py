"""Schedules and samplers against diffusers' schedulers and StableDiffusionPipeline on the same config.

Three levels: the timesteps (exact), each sampler's trajectory on a synthetic model (float precision), and
whole generations of the tiny checkpoint against diffusers' pipeline with the same scheduler config and start
latents, with the tolerance of the model tests: ours within twice the distance of diffusers' own float32 run
from its float64 run.
"""
import math

import numpy as np
import pytest
import torch

import p2p_engine as p2p
from p2p_engine.samplers import make_sampler
from p2p_engine.scheduler import DDIM, SchedulerConfig

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
          set_alpha_to_one=False)


def _diffusers(kind: str, **cfg):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
    if kind == "ddim":
        return DDIMScheduler(**cfg)
    if kind == "pndm":
        return PNDMScheduler(skip_prk_steps=True, **{k: v for k, v in cfg.items() if k != "clip_sample"})
    return DPMSolverMultistepScheduler(**{k: v for k, v in cfg.items() if k not in ("clip_sample", "set_alpha_to_one")})


SPACINGS = [dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="leading", steps_offset=0),
            dict(timestep_spacing="trailing"), dict(timestep_spacing="linspace")]


@pytest.mark.parametrize("kind", ["ddim", "pndm", "dpmsolver++"])
@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_timesteps_match_diffusers(kind, spacing, steps):
    ref = _diffusers(kind, **SD, **spacing)
    ref.set_timesteps(steps)
    ours = make_sampler(kind, DDIM(SchedulerConfig(**spacing)), steps, "cpu")
    assert ours.timesteps == ref.timesteps.tolist()


def test_sd_default_is_981_to_1_and_offset_zero_is_980_to_0():
    sched = DDIM(SchedulerConfig())
    assert sched.timesteps(50)[:2] == [981, 961] and sched.timesteps(50)[-1] == 1
    assert sched.timesteps(50, steps_offset=0)[:2] == [980, 960] and sched.timesteps(50, steps_offset=0)[-1] == 0
    pndm = make_sampler("pndm", sched, 50, "cpu")
    assert len(pndm.timesteps) == 51 and pndm.timesteps[:4] == [981, 961, 961, 941]


@pytest.mark.parametrize("kind, steps", [("ddim", 1000), ("pndm", 1000), ("dpmsolver++", 999)])
def test_timesteps_past_the_schedule_are_refused(kind, steps):
    """Where steps_offset would put the first timestep at num_train_timesteps or beyond (diffusers indexes past
    its alphas there, and DPM-Solver++ divided by a zero step into NaN), the sampler refuses and names it; one
    offset lower is diffusers' timesteps."""
    sched = DDIM(SchedulerConfig(timestep_spacing="leading", steps_offset=1))
    with pytest.raises(ValueError, match="steps_offset must be an integer in \\[0, 0\\]"):
        make_sampler(kind, sched, steps, "cpu")
    with pytest.raises(ValueError, match="steps_offset"):
        make_sampler(kind, DDIM(SchedulerConfig()), 10, "cpu", steps_offset=-1)
    with pytest.raises(ValueError, match="steps_offset must be an integer"):  # a bool is not an offset
        make_sampler(kind, DDIM(SchedulerConfig()), 10, "cpu", steps_offset=True)
    ref = _diffusers(kind, **SD, timestep_spacing="leading", steps_offset=0)
    ref.set_timesteps(steps)
    assert make_sampler(kind, sched, steps, "cpu", steps_offset=0).timesteps == ref.timesteps.tolist()


def _fake_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A smooth stand-in for a UNet: depends on the sample and the timestep."""
    return 0.3 * x + 0.2 * torch.sin(x * (1 + t / 500.0)) + 0.05 * math.cos(t / 100.0)


@pytest.mark.parametrize("kind", ["ddim", "pndm", "dpmsolver++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("cfg", [dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
                                 dict(timestep_spacing="trailing", set_alpha_to_one=True),
                                 dict(timestep_spacing="linspace", beta_schedule="linear", beta_start=1e-4,
                                      beta_end=0.02)], ids=["sd", "trailing-one", "linear"])
def test_trajectory_matches_diffusers(kind, prediction_type, cfg):
    steps = 12
    full = {**SD, **cfg, "prediction_type": prediction_type}
    ref = _diffusers(kind, **full)
    ref.set_timesteps(steps)
    ours = make_sampler(kind, DDIM(SchedulerConfig(**{k: v for k, v in full.items() if k != "clip_sample"})),
                        steps, "cpu")
    x0 = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    a, b = x0.clone(), x0.clone()
    for i, t in enumerate(ours.timesteps):
        a = ref.step(_fake_model(a, t), t, a).prev_sample
        b = ours.step(i, _fake_model(b, t), b)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(b, x0)


def test_config_reading():
    d = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "trained_betas": None,
         "clip_sample": False}  # SD 1.5's file: no steps_offset, no timestep_spacing
    cfg = SchedulerConfig.from_diffusers(d)
    assert cfg.steps_offset == 1 and cfg.timestep_spacing is None  # SD pipelines force 1; spacing: class default
    assert DDIM(cfg).timesteps(50)[0] == 981
    from diffusers import DPMSolverMultistepScheduler
    ref = DPMSolverMultistepScheduler.from_config({**d, "steps_offset": 1})
    ref.set_timesteps(20)
    assert make_sampler("dpmsolver++", DDIM(cfg), 20, "cpu").timesteps == ref.timesteps.tolist()  # linspace
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        SchedulerConfig.from_diffusers({**d, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="beta_schedule"):
        SchedulerConfig.from_diffusers({**d, "beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(ValueError, match="leading"):
        DDIM(SchedulerConfig(timestep_spacing="trailing")).timesteps(10, steps_offset=0)
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_sampler("euler", DDIM(cfg), 10, "cpu")


# -- whole generations against diffusers' StableDiffusionPipeline

@pytest.fixture(scope="module")
def sd(tiny_ckpt):
    from diffusers import StableDiffusionPipeline
    pipes = {}
    for dt in (torch.float32, torch.float64):
        p = StableDiffusionPipeline.from_pretrained(tiny_ckpt, torch_dtype=dt, safety_checker=None,
                                                    requires_safety_checker=False)
        p.set_progress_bar_config(disable=True)
        pipes[dt] = (p, p.scheduler.config)  # the checkpoint's scheduler config, before a case replaces it
    return pipes


CASES = {"ddim offset 1": ("ddim", None), "ddim offset 0": ("ddim", 0), "pndm": ("pndm", None),
         "dpmsolver++": ("dpmsolver++", None)}


def _diffusers_scheduler(sampler: str, config, steps_offset):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
    extra = {} if steps_offset is None else {"steps_offset": steps_offset}
    if sampler == "ddim":
        return DDIMScheduler.from_config(config, **extra)
    if sampler == "pndm":
        return PNDMScheduler.from_config(config, skip_prk_steps=True, **extra)
    return DPMSolverMultistepScheduler.from_config(config, **extra)


@pytest.mark.parametrize("case", list(CASES))
def test_generation_equals_stable_diffusion_pipeline(tiny_pipe, sd, case):
    sampler, offset = CASES[case]
    steps, prompt = 6, "a cat riding a bicycle"
    s = tiny_pipe.config.latent_size
    start = torch.randn(1, 4, s, s, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    outs = {}
    for dt, (ref, config) in sd.items():
        # set after construction: the pipeline's constructor would force steps_offset back to 1
        ref.scheduler = _diffusers_scheduler(sampler, config, offset)
        outs[dt] = ref(prompt, num_inference_steps=steps, guidance_scale=7.5, latents=start.to(dt),
                       output_type="latent").images.double()
    got = tiny_pipe.generate([prompt], steps=steps, sampler=sampler, steps_offset=offset, latents=start.float(),
                        store=False, progress=False, decode_images=False).latents.double()
    gold = outs[torch.float64]
    scale = gold.abs().max()
    drift = ((outs[torch.float32] - gold).abs().max() / scale).item()
    err = ((got - gold).abs().max() / scale).item()
    assert err <= 2 * drift + torch.finfo(torch.float32).eps, (err, drift)
    other = tiny_pipe.generate([prompt], steps=steps, sampler="ddim" if sampler != "ddim" else "pndm",
                          latents=start.float(), store=False, progress=False, decode_images=False).latents.double()
    assert ((other - gold).abs().max() / scale).item() > 100 * (2 * drift + 1e-6)  # the sampler matters here


def test_dpmsolver_windows_are_fractions_of_its_steps(tiny_pipe):
    """20 DPM-Solver++ steps are 20 UNet calls; an edit's windows count them, and its maps average them."""
    prompts = ["a cat riding a bicycle", "a dog riding a bicycle"]
    out = tiny_pipe.edit(prompts, p2p.Replace(cross_steps=0.5, self_steps=0.5), steps=20, sampler="dpmsolver++",
                         progress=False, decode_images=False)
    m = out.attention.cross(out.attention.resolutions[0])
    torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:3]))
    assert out.attention.steps == 20
    pndm = tiny_pipe.edit(prompts, p2p.Replace(), steps=5, sampler="pndm", progress=False, decode_images=False)
    assert pndm.attention.steps == 6  # PLMS: steps + 1 UNet calls


def test_inversion_needs_ddim(tiny_pipe):
    img = (np.random.default_rng(0).uniform(0, 1, (40, 40, 3)) * 255).astype(np.uint8)
    inv = tiny_pipe.invert(img, "a cat", steps=3, method="ddim", progress=False)
    with pytest.raises(ValueError, match="defined on DDIM"):
        tiny_pipe.edit(["a cat", "a dog"], p2p.Replace(), inversion=inv, sampler="pndm", progress=False)
    with pytest.raises(ValueError, match="fixes the timesteps"):
        tiny_pipe.edit(["a cat", "a dog"], p2p.Replace(), inversion=inv, steps_offset=0, progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_proximal_threshold_is_torch_quantile_without_a_host_read(dtype):
    """Proximal guidance's threshold is torch.quantile's (linear interpolation): bit for bit where the rank
    q * (n - 1) is exact in float32, as at the default 0.75 below 5.5M entries (torch releases round other
    ranks differently: 2.13 to float32, 2.15 not); elsewhere within float rounding of float64's torch.quantile.
    Computing it reads nothing back to the host, which torch.quantile does in torch 2.11 (the GPU machine's
    release: a captured loop could not record it)."""
    from tape import Tape

    from p2p_engine.scheduler import proximal_delta

    def with_torch(delta, q, precision=None):
        thr = torch.quantile(delta.abs().flatten().to(precision or delta.dtype), q).to(delta.dtype)
        return delta - delta.clamp(-thr, thr)

    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (2,), (5, 3), (2, 4, 16, 16), (3, 4, 8, 8)]:
        delta = torch.randn(shape, generator=g, dtype=dtype)
        delta[..., 0] = 0.0  # ties with sign flips: both sorted neighbours may be equal
        for q in [0.75, 0.5, 1.0, 0.25, 0.125]:  # ranks exact in float32 at these sizes
            assert torch.equal(proximal_delta(delta, q), with_torch(delta, q)), (shape, q)
        for q in [1 / 3, 0.1, 0.999, 1e-7]:
            got, want = proximal_delta(delta, q), with_torch(delta, q, torch.float64)
            torch.testing.assert_close(got, want, rtol=0, atol=2 * torch.finfo(dtype).eps * delta.abs().max())
    delta = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
    with Tape() as tape:
        proximal_delta(delta, 0.75)
    assert not tape.syncs, tape.describe_syncs()
    with pytest.raises(TypeError, match="float32 or float64"):
        proximal_delta(delta.half(), 0.75)


def test_proximal_quantile_defaults_to_three_quarters(tiny_pipe):
    """`edit(..., proximal="l0")` without a quantile thresholds at the reference's 0.75 (PIE-Bench's run):
    bit for bit the edit given 0.75, and not the one given 0.5 (the quantile reaches the result)."""
    prompts = ["a cat riding a bicycle", "a dog riding a bicycle"]
    kw = {"steps": 3, "proximal": "l0", "store": False, "progress": False, "decode_images": False}
    default = tiny_pipe.edit(prompts, p2p.Replace(), **kw).latents
    assert torch.equal(default, tiny_pipe.edit(prompts, p2p.Replace(), quantile=0.75, **kw).latents)
    half = tiny_pipe.edit(prompts, p2p.Replace(), quantile=0.5, **kw).latents
    assert (half - default).abs().max() > 1e-3 * default.abs().max()


@pytest.mark.parametrize("s, mu, engine_better", [(0.5, 0.0, True), (1.0, 0.3, True), (2.0, 0.0, True),
                                                  (0.2, 1.0, False)])
def test_v_prediction_inversion_is_the_noise_models(s, mu, engine_better):
    """DDIM inversion of a v-prediction model reads the output predicted at t as noise at t's level (`DDIM.
    inversion_step`: eps = sqrt(a_t) v + sqrt(1 - a_t) z), as the sampler reads it at t. With the exact
    posterior-mean model of data N(mu, s^2) (float64), v inversion + DDIM sampling is then the noise model's
    step for step. diffusers' DDIMInverseScheduler reads v at the current level t - stride instead; measured,
    |rec - z0| / |z0| at 10 steps (50 steps), engine vs diffusers: s 0.5: 0.197 vs 0.295 (0.037 vs 0.067);
    s 1, mu 0.3: 0.055 vs 0.221 (0.013 vs 0.051); s 2: 0.081 vs 0.275 (0.020 vs 0.063); but a narrow offset
    distribution, s 0.2, mu 1: 0.126 vs 0.119 (0.039 vs 0.036). (The random tiny-v checkpoint, where neither
    reconstructs: tests/test_inversion.py::test_v_prediction_ddim_inversion.)"""
    from diffusers import DDIMInverseScheduler

    steps = 10
    scheds = {pt: DDIM(SchedulerConfig(prediction_type=pt)) for pt in ("epsilon", "v_prediction")}
    alphas = scheds["epsilon"].alphas_cumprod.double()

    def model(pt, z, t):
        a = alphas[t]
        x0 = mu + a.sqrt() * s ** 2 / (a * s ** 2 + 1 - a) * (z - a.sqrt() * mu)  # E[x0 | z_t]
        eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if pt == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    inverse = DDIMInverseScheduler(**SD, prediction_type="v_prediction", steps_offset=1, timestep_spacing="leading")
    inverse.set_timesteps(steps)
    z0 = mu + s * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = scheds["epsilon"].timesteps(steps)
    assert inverse.timesteps.tolist() == ts[::-1]
    recs, zTs = {}, {}
    for name, pt in (("eps", "epsilon"), ("v", "v_prediction"), ("diffusers", "v_prediction")):
        z = z0
        for t in reversed(ts):
            out = model(pt, z, t)
            z = inverse.step(out, t, z).prev_sample if name == "diffusers" else scheds[pt].inversion_step(
                out, t, z, steps)
        zTs[name] = z
        for t in ts:
            z = scheds[pt].step(model(pt, z, t), t, z, steps)
        recs[name] = ((z - z0).norm() / z0.norm()).item()
    # the schedule's coefficients are float32 (rounding 3e-8 here): equal to that, far from diffusers'
    torch.testing.assert_close(zTs["v"], zTs["eps"], rtol=1e-6, atol=1e-6)
    assert abs(recs["v"] - recs["eps"]) < 1e-6
    assert (zTs["diffusers"] - zTs["v"]).abs().max() > 1e-2
    assert (recs["v"] < recs["diffusers"]) == engine_better, recs
