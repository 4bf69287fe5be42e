"""StyleDiffusion (Li et al. 2023) against an independent oracle written from the reference semantics (design §3, §8.1):
the official mapping-network layout, one training iteration and the inversion's attention targets, ComfyUI UNet
(through the node's training copy and attention control) vs a diffusers UNet with the same weights whose
cross-attention is the reference's: keys from the text, values c⊙γ + β, an explicit fp32 softmax, and the cond maps
of the five 16²-level layers (at 512²) recorded. Tolerances: parity-notes.md (about 10x over what was measured)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from test_parity import comfy_twin, diffusers_unet, rel
from torch import nn

WIDTH, CONTEXT, TOKENS, IMAGE_TOKENS, GUIDANCE = 64, 32, 77, 197, 7.5
# diffusers' names of the attention-loss layers in the order a UNet call reaches them (ComfyUI input 7, 8, output 3-5)
ORACLE_LAYERS = ("down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "up_blocks.1.attentions.0",
                 "up_blocks.1.attentions.1", "up_blocks.1.attentions.2")
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
INERT = ("conv_start.bias", "conv_block.0.0.bias")  # biases right before the per-row norm


def official_mapping(image_tokens: int = IMAGE_TOKENS) -> nn.ModuleDict:
    """M_t as the official code builds it: 1×1 Conv1d 197→154, one conv block (Conv1d, BatchNorm1d, LeakyReLU .01),
    Conv1d 154→154; BatchNorm always in training mode."""
    rows = 2 * TOKENS
    block = nn.Sequential(nn.Conv1d(rows, rows, 1), nn.BatchNorm1d(rows), nn.LeakyReLU(0.01))
    return nn.ModuleDict({"conv_start": nn.Conv1d(image_tokens, rows, 1), "conv_block": nn.Sequential(block),
                          "conv_end": nn.Conv1d(rows, rows, 1)}).train()


def official_gamma_beta(m: nn.ModuleDict, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = m["conv_end"](m["conv_block"](m["conv_start"](features)))
    return out[:, :TOKENS], out[:, TOKENS:]


def learned(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(RUNNING_STATS)}


class ReferenceCrossAttention:
    """The reference's cross-attention (design §1.1 B5, §3): q = W_q h, k = W_k c, v = W_v c̃ with c̃ = c⊙γ + β when
    the call is mapped (else c), probabilities by an explicit fp32 softmax over (batch·heads) rows; the probabilities
    of the attention-loss layers are kept, graph included."""

    def __init__(self, oracle, layer: str):
        self.oracle, self.layer = oracle, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        h, c = hidden_states, encoder_hidden_states
        values = c if self.oracle.film is None else c * self.oracle.film[0] + self.oracle.film[1]
        q, k, v = attn.to_q(h), attn.to_k(c), attn.to_v(values)
        b, n, inner = q.shape
        heads, d = attn.heads, inner // attn.heads
        fold = lambda x: x.reshape(b, x.shape[1], heads, d).permute(0, 2, 1, 3).reshape(b * heads, x.shape[1], d)
        sim = torch.einsum("bid,bjd->bij", fold(q).float(), fold(k).float()) * d ** -0.5
        probs = sim.softmax(dim=-1)
        if self.oracle.maps is not None and self.layer in ORACLE_LAYERS:
            self.oracle.maps.append((self.layer, probs.reshape(b, heads, n, -1)))
        out = torch.einsum("bij,bjd->bid", probs, fold(v))
        out = out.reshape(b, heads, n, d).permute(0, 2, 1, 3).reshape(b, n, inner)
        return attn.to_out[1](attn.to_out[0](out))


class Oracle:
    """A diffusers UNet with the reference cross-attention in all 16 cross layers; self-attention is diffusers' own."""

    def __init__(self, unet):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet, self.film, self.maps = unet, None, None
        unet.set_attn_processor({name: ReferenceCrossAttention(self, name.split(".transformer_blocks")[0])
                                 if ".attn2." in name else AttnProcessor2_0() for name in unet.attn_processors})

    def __call__(self, z, t, context, film=None, record=False):
        self.film, self.maps = film, ([] if record else None)
        try:
            eps = self.unet(z, torch.tensor(t), encoder_hidden_states=context).sample
            maps = self.maps or []
        finally:
            self.film, self.maps = None, None
        assert [name for name, _ in maps] == (list(ORACLE_LAYERS) if record else [])
        return eps, [m for _, m in maps]


def reference_scheduler(steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    sched.set_timesteps(steps)
    return sched


@pytest.fixture(scope="module")
def pair(comfy):
    unet_d = diffusers_unet(WIDTH, CONTEXT, seed=13).requires_grad_(False)
    model, _ = comfy_twin(unet_d, WIDTH, CONTEXT)
    heads = lambda unet: {m.heads for name, m in unet.named_modules() if name.endswith("attn2")}
    assert heads(unet_d) == heads(model.model.diffusion_model) == {8}  # diffusers' attention_head_dim=8 is the count
    return Oracle(unet_d), model


@pytest.fixture
def ours(comfy, pair):
    """attend() over the node's training copy of the ComfyUI twin (exact precision), and ᾱ, as the StyleDiffusion node
    runs it (nodes/inversion.py)."""
    run = comfy.pack.nodes.inversion_run
    cfg = comfy.pack.forgedit_ops.finetune.FinetuneConfig(precision="fp32")
    with comfy.pack.nodes.training.training_copy(pair[1], lambda name: False, cfg, 1) as copy_:
        yield run.copy_attend(copy_, cfg), copy_.abar


@pytest.mark.parametrize("width", [CONTEXT, 768])
def test_mapping_net_matches_the_official_layout(comfy, width):
    sd = comfy.pack.forgedit_ops.stylediffusion
    torch.manual_seed(width)
    official = official_mapping()
    with torch.no_grad():
        for m in official.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.copy_(1 + 0.5 * torch.randn_like(m.weight))
                m.bias.copy_(0.5 * torch.randn_like(m.bias))
    net = sd.MappingNet()
    net.load_state_dict(learned(official.state_dict()), strict=True)
    assert set(net.state_dict()) == set(learned(official.state_dict()))
    features = torch.randn(1, IMAGE_TOKENS, width)
    with torch.no_grad():
        gamma_ref, beta_ref = official_gamma_beta(official, features)
        gamma, beta = net(features)
    assert official.training and gamma.shape == beta.shape == (1, TOKENS, width)
    assert (gamma - gamma_ref).abs().max() <= 1e-5 and (beta - beta_ref).abs().max() <= 1e-5


@pytest.mark.parametrize("i", [0, 7])
def test_one_training_iteration_matches_diffusers(comfy, pair, ours, i):
    sd = comfy.pack.forgedit_ops.stylediffusion
    ddim = comfy.pack.forgedit_ops.ddim
    oracle, _ = pair
    attend, abar = ours
    steps, seed, lr = 30, 5 + i, 1e-2 * (1 - i / 100)
    g = torch.Generator().manual_seed(seed)
    z, z_k, target = (torch.randn(1, 4, 16, 16, generator=g) for _ in range(3))
    context, uncond = torch.randn(1, 77, CONTEXT, generator=g), torch.randn(1, 77, CONTEXT, generator=g)
    features = torch.randn(1, IMAGE_TOKENS, CONTEXT, generator=g)
    sched = reference_scheduler(steps)
    t = int(sched.timesteps[i])
    t_k = min(t + 33, 957)  # the inversion call whose maps step i is regularised to (â[T − i]; i = 0 reuses the last)
    assert t == 957 - 33 * i

    # the attention targets: the maps of an inversion call (raw values) on each side
    with torch.no_grad():
        _, maps_k_ref = oracle(z_k, t_k, context, None, True)
        _, maps_k = attend(z_k, t_k, context, None, True)
    assert [m.shape for m in maps_k] == [(1, 8, 16, 77)] * 5
    assert max(rel(a, b) for a, b in zip(maps_k, maps_k_ref)) <= 1e-5

    # ours: train_step for one iteration; the maps it records seen through the attend it calls
    mapping = sd.init_mapping(seed)
    start = {k: v.clone() for k, v in mapping.state_dict().items()}
    reference = official_mapping()
    missing, unexpected = reference.load_state_dict(start, strict=False)
    assert not unexpected and all(k.endswith(RUNNING_STATS) for k in missing)
    seen = []

    def spy(z_, t_, c_, state=None, record=False):
        eps, maps = attend(z_, t_, c_, state, record)
        if record:
            seen.append(maps)
        return eps, maps

    z_next, losses = sd.train_step(spy, z, t, abar[t], ddim.abar_before(abar, t, 1000 // steps), target, maps_k,
                                   context, uncond, features, mapping, i, GUIDANCE, iterations=1,
                                   use_attention_loss=True, early_stop=False)
    grads = {k: p.grad.clone() for k, p in mapping.named_parameters()}
    after = mapping.state_dict()
    with torch.no_grad():
        gamma, beta = mapping(features)

    # the oracle: the same iteration written out with diffusers' DDIM step and the official mapping layout
    with torch.no_grad():
        eps_u, _ = oracle(z, t, uncond)
    opt = torch.optim.Adam(reference.parameters(), lr=lr)
    eps_c, maps_ref = oracle(z, t, context, official_gamma_beta(reference, features), True)
    prev = sched.step(eps_u + GUIDANCE * (eps_c - eps_u), t, z).prev_sample
    loss = F.mse_loss(prev, target) + sum(F.mse_loss(m, a) for m, a in zip(maps_ref, maps_k_ref))
    loss.backward()
    opt.step()
    with torch.no_grad():
        gamma_ref, beta_ref = official_gamma_beta(reference, features)
        eps_c, _ = oracle(z, t, context, (gamma_ref, beta_ref))
        z_next_ref = sched.step(eps_u + GUIDANCE * (eps_c - eps_u), t, z).prev_sample

    assert len(losses) == 1 and len(seen) == 1 and len(seen[0]) == 5
    (_, l_rec, l_att), = losses
    assert l_att > 0 and abs(l_rec + l_att - loss.item()) <= 1e-5 * loss.item()
    assert max(rel(a, b) for a, b in zip(seen[0], maps_ref)) <= 1e-5

    # Gradients. conv_start's and the block conv's biases add a per-row constant that the per-row norm removes: their
    # gradient is exactly zero in exact arithmetic, round-off on both sides, so they are held to the global scale only.
    g_ref = {k: p.grad for k, p in reference.named_parameters()}
    g_max = max(g.abs().max() for g in g_ref.values())
    for k, g in g_ref.items():
        diff = (grads[k] - g).abs().max()
        assert diff <= 1e-5 * g_max, k
        if k in INERT:
            assert max(g.abs().max(), grads[k].abs().max()) <= 1e-6 * g_max, k
        else:
            assert diff <= 1e-5 * g.abs().max(), k

    # After the step. Adam's first update is about lr·sign(g), so where |g| is at round-off level (the inert biases and
    # a few weights, < 1% of the elements) it is noise of up to lr on either side (parity-notes §2): the updates agree
    # where the gradient is meaningful, and γ, β agree to 2e-5 once the round-off elements take our update on both
    # sides.
    strong = {k: g.abs() >= 1e-4 * g_max for k, g in g_ref.items()}
    assert sum((~m).sum().item() for m in strong.values()) <= 0.01 * sum(m.numel() for m in strong.values())
    for k, p in reference.named_parameters():
        delta_diff = ((after[k] - start[k]) - (p.detach() - start[k])).abs()
        assert (delta_diff * strong[k]).max() <= 1e-3 * lr, k
    hybrid = copy.deepcopy(reference)
    with torch.no_grad():
        for k, p in hybrid.named_parameters():
            p[~strong[k]] = after[k][~strong[k]]
        gamma_hybrid, beta_hybrid = official_gamma_beta(hybrid, features)
    assert rel(gamma, gamma_hybrid) <= 2e-5 and rel(beta, beta_hybrid) <= 2e-5
    assert rel(gamma, gamma_ref) <= 2e-3 and rel(beta, beta_ref) <= 2e-3  # the step itself moves them by rel > 1
    assert rel(z_next, z_next_ref) <= 2e-5


def test_inversion_maps_are_the_cond_cross_maps(comfy, pair, ours):
    from diffusers import DDIMInverseScheduler

    sd = comfy.pack.forgedit_ops.stylediffusion
    oracle, _ = pair
    attend, abar = ours
    g = torch.Generator().manual_seed(3)
    z0, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, CONTEXT, generator=g)
    with torch.no_grad():
        latents, maps = sd.invert_with_maps(attend, z0, context, abar, 4)

    sched = DDIMInverseScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                 set_alpha_to_one=False)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [0, 250, 500, 750]
    reference, maps_ref = [z0], []
    with torch.no_grad():
        for t in sched.timesteps.tolist():
            eps, recorded = oracle(reference[-1], t, context, None, True)
            maps_ref.append(recorded)
            reference.append(sched.step(eps, t, reference[-1]).prev_sample)

    assert len(latents) == 5 and len(maps) == 5 and all(len(m) == 5 for m in maps)
    assert all(torch.equal(a, b) for a, b in zip(maps[4], maps[3]))
    assert max(rel(a, b) for a, b in zip(latents, reference)) <= 1e-5
    assert max(rel(a, b) for k in range(4) for a, b in zip(maps[k], maps_ref[k])) <= 1e-5
