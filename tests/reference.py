"""Re-statements of the reference implementation (google/prompt-to-prompt) shared by several tests.

Written from the reference's semantics (../shared/REFERENCE.md), independently of the engine's code, so
that a test comparing the engine with them can fail. The controllers materialise the probabilities in an
attention processor of diffusers' UNet and edit them the way the notebooks do (layer counting, cur_step per
UNet call, in-place edits of the stored maps).
"""
import torch
import torch.nn.functional as F


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


# -- Prompt-to-Prompt's controllers, on diffusers' UNet through an attention processor -----------------

class Proc:
    def __init__(self, ctrl, place):
        self.ctrl, self.place = ctrl, place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        is_cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if is_cross else hidden_states
        q, k, v = (attn.head_to_batch_dim(f(x)) for f, x in
                   ((attn.to_q, hidden_states), (attn.to_k, ctx), (attn.to_v, ctx)))
        p = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (B*h, N, T)
        p = self.ctrl(p, is_cross, self.place)
        out = attn.batch_to_head_dim(p @ v)
        return attn.to_out[1](attn.to_out[0](out))


def register(unet, ctrl):
    procs, n = {}, 0
    for name in unet.attn_processors:
        place = "down" if name.startswith("down") else "up" if name.startswith("up") else "mid"
        procs[name] = Proc(ctrl, place)
        n += 1
    unet.set_attn_processor(procs)
    ctrl.num_att_layers = n


class RefStore:
    def __init__(self):
        self.cur_step, self.cur_att_layer, self.num_att_layers = 0, 0, -1
        self.step_store, self.attention_store = self.empty(), {}

    @staticmethod
    def empty():
        return {f"{p}_{k}": [] for p in ("down", "mid", "up") for k in ("cross", "self")}

    def __call__(self, attn, is_cross, place):
        h = attn.shape[0]
        attn[h // 2:] = self.forward(attn[h // 2:], is_cross, place)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn

    def forward(self, attn, is_cross, place):
        if attn.shape[1] <= 32 ** 2:
            self.step_store[f"{place}_{'cross' if is_cross else 'self'}"].append(attn)
        return attn

    def between_steps(self):
        if not self.attention_store:
            self.attention_store = self.step_store
        else:
            for key in self.attention_store:
                for i in range(len(self.attention_store[key])):
                    self.attention_store[key][i] += self.step_store[key][i]
        self.step_store = self.empty()

    def step_callback(self, x):
        return x


def ref_alpha(prompts, steps, bounds):
    a = torch.zeros(steps + 1, len(prompts) - 1, 1, 1, 77)
    s, e = (0.0, bounds) if isinstance(bounds, float) else bounds
    a[int(s * (steps + 1)):int(e * (steps + 1))] = 1
    return a


class RefEdit(RefStore):
    """AttentionControlEdit; self maps replaced in layers with at most `self_max` queries (16 x 16 in the stable
    notebook, 32 x 32 in the null-text notebook and PnPInversion)."""

    def __init__(self, prompts, steps, cross, self_steps, blend=None, self_max=16 ** 2):
        super().__init__()
        self.P, self.self_max = len(prompts), self_max
        self.alpha = ref_alpha(prompts, steps, cross)
        s = (0.0, self_steps) if isinstance(self_steps, float) else self_steps
        self.self_window = int(steps * s[0]), int(steps * s[1])
        self.blend = blend

    def step_callback(self, x):
        return self.blend(x, self.attention_store) if self.blend is not None else x

    def forward(self, attn, is_cross, place):
        super().forward(attn, is_cross, place)
        if is_cross or self.self_window[0] <= self.cur_step < self.self_window[1]:
            h = attn.shape[0] // self.P
            attn = attn.reshape(self.P, h, *attn.shape[1:])
            base, rep = attn[0], attn[1:]
            if is_cross:
                a = self.alpha[self.cur_step]
                attn[1:] = self.replace_cross(base, rep) * a + (1 - a) * rep
            elif rep.shape[2] <= self.self_max:
                attn[1:] = base.unsqueeze(0).expand(rep.shape[0], *base.shape)
            attn = attn.reshape(self.P * h, *attn.shape[2:])
        return attn


class RefReplace(RefEdit):
    def __init__(self, mapper, *a, **k):
        super().__init__(*a, **k)
        self.mapper = mapper

    def replace_cross(self, base, rep):
        return torch.einsum("hpw,bwn->bhpn", base, self.mapper)


class RefRefine(RefEdit):
    def __init__(self, mapper, alphas, *a, **k):
        super().__init__(*a, **k)
        self.mapper, self.alphas = mapper, alphas.reshape(alphas.shape[0], 1, 1, alphas.shape[1])

    def replace_cross(self, base, rep):
        return base[:, :, self.mapper].permute(2, 0, 1, 3) * self.alphas + rep * (1 - self.alphas)


class RefReweight(RefEdit):
    def __init__(self, equalizer, prev, *a, **k):
        super().__init__(*a, **k)
        self.equalizer, self.prev = equalizer, prev

    def replace_cross(self, base, rep):
        if self.prev is not None:
            base = self.prev.replace_cross(base, rep)
        return base[None] * self.equalizer[:, None, None, :]


class RefBlend:
    """The stable notebook's LocalBlend (P = 2), with the null-text notebook's start counter."""

    def __init__(self, alpha_layers, res, start, th=0.3):
        self.alpha_layers, self.res, self.start, self.th, self.counter = alpha_layers, res, start, th, 0

    def __call__(self, x_t, store):
        self.counter += 1
        if self.counter <= self.start:
            return x_t
        maps = [m for m in store["down_cross"] + store["up_cross"] if m.shape[1] == self.res ** 2]
        maps = torch.cat([m.reshape(self.alpha_layers.shape[0], -1, 1, self.res, self.res, 77) for m in maps], 1)
        maps = (maps * self.alpha_layers).sum(-1).mean(1)
        mask = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = F.interpolate(mask, size=x_t.shape[2:])
        mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        mask = mask.gt(self.th)
        mask = (mask[:1] + mask[1:]).float()
        return x_t[:1] + mask * (x_t - x_t[:1])


class RefNullBlend:
    """The null-text notebook's LocalBlend (null_text_w_ptp.ipynb): every prompt's mask united with the source's,
    an optional second word set subtracted (its own threshold, no pooling), blending after `start` callbacks.
    alpha_layers, substruct_layers: (P, 1, 1, 1, 1, 77) 0/1. The notebook reads down_cross[2:4] + up_cross[:3]
    (SD's 16 x 16 layers); here every down/up cross layer of `res` x `res`, as RefBlend. `masks` keeps the last
    blend's (P, 1, h, w) mask. union=False drops the union (each prompt its own mask), only for tests to show
    that the union matters."""

    def __init__(self, alpha_layers, res, start, th=(0.3, 0.3), substruct_layers=None, union=True):
        self.alpha_layers, self.substruct_layers, self.res = alpha_layers, substruct_layers, res
        self.start, self.th, self.counter, self.masks, self.union = start, th, 0, None, union

    def get_mask(self, x_t, maps, alpha, use_pool):
        maps = (maps * alpha).sum(-1).mean(1)
        if use_pool:
            maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = F.interpolate(maps, size=x_t.shape[2:])
        mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        mask = mask.gt(self.th[1 - int(use_pool)])
        if self.union:
            mask = mask[:1] + mask
        return mask

    def __call__(self, x_t, store):
        self.counter += 1
        if self.counter > self.start:
            maps = [m for m in store["down_cross"] + store["up_cross"] if m.shape[1] == self.res ** 2]
            maps = [m.reshape(self.alpha_layers.shape[0], -1, 1, self.res, self.res, 77) for m in maps]
            maps = torch.cat(maps, dim=1)
            mask = self.get_mask(x_t, maps, self.alpha_layers, True)
            if self.substruct_layers is not None:
                maps_sub = ~self.get_mask(x_t, maps, self.substruct_layers, False)
                mask = mask * maps_sub
            mask = mask.float()
            self.masks = mask
            x_t = x_t[:1] + mask * (x_t - x_t[:1])
        return x_t


def mappers(pipe, prompts):
    """(replace mapper or None, (refine mapper, alphas)) from the aligner, which has its own tests."""
    from p2p_engine import words
    try:
        rep = torch.as_tensor(words.replace_mappers(prompts, pipe.tokenizer), dtype=torch.float32)
    except ValueError:  # different word counts: only Refine applies
        rep = None
    return rep, words.refine_mappers(prompts, pipe.tokenizer)


def equalizer(pipe, prompt, word, c):
    eq = torch.ones(1, 77)
    eq[:, ref_word_inds(prompt, word, pipe.tokenizer)] = c
    return eq


def ref_mask_decode(encoded_mask, image_shape=(512, 512)):
    """PnPInversion's mask_decode (run_editing_p2p.py, evaluation/evaluate.py), restated loop for loop."""
    import numpy as np
    length = image_shape[0] * image_shape[1]
    mask_array = np.zeros((length,))
    for i in range(0, len(encoded_mask), 2):
        splice_len = min(encoded_mask[i + 1], length - encoded_mask[i])
        for j in range(splice_len):
            mask_array[encoded_mask[i] + j] = 1
    mask_array = mask_array.reshape(image_shape[0], image_shape[1])
    mask_array[0, :] = 1
    mask_array[-1, :] = 1
    mask_array[:, 0] = 1
    mask_array[:, -1] = 1
    return mask_array


# -- MasaCtrl and Plug-and-Play (cure-lab/PnPInversion: run_editing_masactrl.py with models/masactrl/,
# run_editing_pnp.py), on diffusers' UNet through an attention processor that hands over q, k, v --------------

class QKVProc:
    """Hands q, k, v (B, N, C) of one attention call to `ctrl(q, k, v, is_cross, heads, scale, name)`, which
    returns the attention's output (B, N, C) before to_out."""

    def __init__(self, ctrl, name):
        self.ctrl, self.name = ctrl, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        is_cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if is_cross else hidden_states
        out = self.ctrl(attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx), is_cross, attn.heads, attn.scale,
                        self.name)
        return attn.to_out[1](attn.to_out[0](out))


def register_qkv(unet, ctrl):
    procs = {name: QKVProc(ctrl, name) for name in unet.attn_processors}
    ctrl.num_att_layers = len(procs)  # before diffusers empties the dict
    unet.set_attn_processor(procs)


def uncontrolled(unet):
    """diffusers' own attention in every layer (what the references run while inverting)."""
    from diffusers.models.attention_processor import AttnProcessor
    unet.set_attn_processor(AttnProcessor())


def split_heads(x, heads):
    """(B, N, heads * d) -> "(b h) n d", as einops' rearrange in masactrl_utils.py."""
    B, N, C = x.shape
    return x.reshape(B, N, heads, C // heads).permute(0, 2, 1, 3).reshape(B * heads, N, C // heads)


def merge_heads(x, heads):
    """"(b h) n d" -> (B, N, heads * d)."""
    Bh, N, d = x.shape
    return x.reshape(Bh // heads, heads, N, d).permute(0, 2, 1, 3).reshape(Bh // heads, N, heads * d)


def embed(pipe, text, n=1):
    """n rows of a prompt's embedding: `text` a prompt, or an embedding (1, 77, D) given as it is (an inversion's
    stored unconditional embedding, which the engine's edit reads)."""
    e = pipe.encode_prompt([text]) if isinstance(text, str) else text
    return e.expand(n, -1, -1)


def attend(q, k, v, scale):
    return (q @ k.transpose(-1, -2) * scale).softmax(-1) @ v


class RefMasaCtrl:
    """MutualSelfAttentionControl (models/masactrl/masactrl.py) on AttentionBase (masactrl_utils.py): every
    attention call counts (cur_att_layer; cur_step after the last of a UNet call); a self call whose
    cur_att_layer // 2 is in layer_idx at a cur_step in step_idx attends, per guidance half, with all of the
    half's queries over the half's first row's keys and values (attn_batch: "(b h) n d -> h (b n) d")."""

    def __init__(self, start_step=4, start_layer=10, total_steps=50, total_layers=16):
        self.step_idx = list(range(start_step, total_steps))
        self.layer_idx = list(range(start_layer, total_layers))
        self.cur_step, self.cur_att_layer, self.num_att_layers = 0, 0, -1

    @staticmethod
    def attn_batch(q, k, v, heads, scale):
        b = q.shape[0] // heads

        def fold(t):  # "(b h) n d -> h (b n) d"
            return t.reshape(-1, heads, *t.shape[1:]).transpose(0, 1).reshape(heads, -1, t.shape[-1])

        out = attend(fold(q), fold(k), fold(v), scale)  # (h, b n, d)
        return out.reshape(heads, b, -1, out.shape[-1]).transpose(0, 1).reshape(b * heads, -1, out.shape[-1])

    def __call__(self, q, k, v, is_cross, heads, scale, name):
        q, k, v = (split_heads(t, heads) for t in (q, k, v))
        if is_cross or self.cur_step not in self.step_idx or self.cur_att_layer // 2 not in self.layer_idx:
            out = attend(q, k, v, scale)
        else:
            (qu, qc), (ku, kc), (vu, vc) = q.chunk(2), k.chunk(2), v.chunk(2)
            out = torch.cat([self.attn_batch(qu, ku[:heads], vu[:heads], heads, scale),
                             self.attn_batch(qc, kc[:heads], vc[:heads], heads, scale)])
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
        return merge_heads(out, heads)


def ref_masactrl_invert(pipe, unet, sched, z0, prompt, guidance=7.5):
    """MasaCtrlPipeline.invert (models/masactrl/diffuser_utils.py): DDIM inversion with guidance on the batch
    [uncond "", cond prompt]; returns the latents z0 .. zT."""
    context = torch.cat([pipe.encode_prompt([""]), pipe.encode_prompt([prompt])])
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    latents, z = [z0], z0
    with torch.no_grad():
        for t in reversed(sched.timesteps.tolist()):
            u, c = unet(torch.cat([z] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            eps = u + guidance * (c - u)
            t_cur = min(t - stride, 999)
            a = sched.alphas_cumprod[t_cur] if t_cur >= 0 else sched.final_alpha_cumprod
            a_next = sched.alphas_cumprod[t]
            x0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5
            z = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
            latents.append(z)
    return latents


def ref_masactrl_sample(pipe, unet, sched, start, prompts, ctrl, guidance=7.5, noise_loss_list=None, uncond=""):
    """MasaCtrlPipeline.__call__: CFG over [uncond "" x P, cond x P] with its own DDIM step (alpha_prev the
    final alpha where prev_timestep <= 0) and, with Direct Inversion, noise_loss_list[i][:1] added to row 0."""
    register_qkv(unet, ctrl)
    P = len(prompts)
    context = torch.cat([embed(pipe, uncond, P), pipe.encode_prompt(prompts)])
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    latents = start.expand(P, -1, -1, -1).clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps.tolist()):
            u, c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            eps = u + guidance * (c - u)
            a = sched.alphas_cumprod[t]
            a_prev = sched.alphas_cumprod[t - stride] if t - stride > 0 else sched.final_alpha_cumprod
            x0 = (latents - (1 - a) ** 0.5 * eps) / a ** 0.5
            latents = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            if noise_loss_list is not None:
                latents = torch.cat([latents[:1] + noise_loss_list[i][:1], latents[1:]])
    return latents


def ref_direct_offsets(pipe, unet, sched, pivots, prompts, guidance=7.5, uncond=""):
    """DirectInversion.offset_calculate (models/p2p/inversion.py), uncontrolled (no editor is registered while
    the reference inverts): per step, z*_{t-1} minus the guided DDIM step from the tracked latent."""
    P = len(prompts)
    context = torch.cat([embed(pipe, uncond, P), pipe.encode_prompt(prompts)])
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    offsets, cur = [], pivots[-1].expand(P, -1, -1, -1)
    uncontrolled(unet)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps.tolist()):
            prev = pivots[len(pivots) - i - 2].expand(P, -1, -1, -1)
            u, c = unet(torch.cat([cur] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            eps = u + guidance * (c - u)
            a = sched.alphas_cumprod[t]
            a_prev = sched.alphas_cumprod[t - stride] if t - stride >= 0 else sched.final_alpha_cumprod
            x0 = (cur - (1 - a) ** 0.5 * eps) / a ** 0.5
            rec = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            offsets.append(prev - rec)
            cur = rec + offsets[-1]
    return offsets


class RefPnP:
    """run_editing_pnp.py's register_attention_control_efficient and register_conv_control_efficient on the
    batch [source branch, uncond, cond] (one source row): while the registered timestep t is among the first
    `attn_t` timesteps, the self attention of up_blocks[1].attentions[1, 2] and up_blocks[2, 3].attentions[0 .. 2]
    (transformer block 0's attn1) copies the source's q and k into the other two thirds of the batch; while it is
    among the first `conv_t`, up_blocks[1].resnets[1] copies the source's residual branch (after conv2) likewise.
    `attention`/`resnet` override which modules, for tests that the choice matters."""

    ATTENTION = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}

    def __init__(self, unet, timesteps, conv_t, attn_t, attention=None, resnet=(1, 1)):
        self.qk_steps, self.conv_steps, self.t = list(timesteps[:attn_t]), list(timesteps[:conv_t]), None
        self.names = {f"up_blocks.{r}.attentions.{b}.transformer_blocks.0.attn1.processor"
                      for r, blocks in (attention or self.ATTENTION).items() for b in blocks}
        conv = unet.up_blocks[resnet[0]].resnets[resnet[1]].conv2
        self.hook = conv.register_forward_hook(self.conv_forward)

    def conv_forward(self, module, args, hidden_states):
        if self.t in self.conv_steps:
            sbs = hidden_states.shape[0] // 3
            hidden_states = hidden_states.clone()
            hidden_states[sbs:2 * sbs] = hidden_states[:sbs]
            hidden_states[2 * sbs:] = hidden_states[:sbs]
        return hidden_states

    def __call__(self, q, k, v, is_cross, heads, scale, name):
        if not is_cross and name in self.names and self.t in self.qk_steps:
            sbs = q.shape[0] // 3
            q, k = q.clone(), k.clone()
            for t in (q, k):
                t[sbs:2 * sbs] = t[:sbs]
                t[2 * sbs:] = t[:sbs]
        return merge_heads(attend(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), scale), heads)


def ref_pnp_invert(pipe, unet, sched, z0, prompt):
    """Preprocess.ddim_inversion: the source prompt's conditional branch only; returns [z0, .., zT]."""
    cond = pipe.encode_prompt([prompt])
    timesteps = list(reversed(sched.timesteps.tolist()))
    latents, z = [z0], z0
    uncontrolled(unet)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            a = sched.alphas_cumprod[t]
            a_prev = sched.alphas_cumprod[timesteps[i - 1]] if i > 0 else sched.final_alpha_cumprod
            eps = unet(z, t, encoder_hidden_states=cond).sample
            x0 = (z - (1 - a_prev) ** 0.5 * eps) / a_prev ** 0.5
            z = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
            latents.append(z)
    return latents


def ref_pnp_reconstruct(pipe, unet, sched, zT, prompt):
    """Preprocess.ddim_sample from zT with the source prompt at guidance 1: the latents after each step."""
    cond = pipe.encode_prompt([prompt])
    timesteps = sched.timesteps.tolist()
    out, x = [], zT
    uncontrolled(unet)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            a = sched.alphas_cumprod[t]
            a_prev = sched.alphas_cumprod[timesteps[i + 1]] if i < len(timesteps) - 1 else sched.final_alpha_cumprod
            eps = unet(x, t, encoder_hidden_states=cond).sample
            x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
            x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            out.append(x)
    return out


def ref_pnp_edit(pipe, unet, sched, feed, start, target, ctrl, guidance=7.5, negative="ugly, blurry, black, low res, "
                 "unrealistic", branch=""):
    """PNP.run_pnp's sample_loop: from `start`, each step denoises [feed(i), x, x] with the texts [branch (the
    empty prompt), negative, target] (denoise_step), the source branch's own prediction dropped; feed(i) the
    source branch's latent of step i."""
    register_qkv(unet, ctrl)
    text = torch.cat([embed(pipe, branch), embed(pipe, negative), embed(pipe, target)])
    x = start
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps.tolist()):
            ctrl.t = t
            _, u, c = unet(torch.cat([feed(i), x, x]), t, encoder_hidden_states=text).sample.chunk(3)
            x = sched.step(u + guidance * (c - u), t, x).prev_sample
    ctrl.hook.remove()
    return x
