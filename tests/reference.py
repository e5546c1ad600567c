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
