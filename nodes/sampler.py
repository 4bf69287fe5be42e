"""Forgedit Sampler: the γ (× α) × seed edit sweep in batched sampling runs, with a labelled grid (Forgedit §6)."""
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..forgedit_ops.images import labelled_grid
from ..forgedit_ops.interpolation import interpolate, parse_values
from ..forgedit_ops.schedule import ddim_final_scale, ddim_noise_scale, reference_sigmas
from .common import CATEGORY, Result, sdpa_on_cpu, target_embedding
from .edit import ALPHA_TOOLTIP, GAMMA_TOOLTIP, MODE_TOOLTIP

REFERENCE = "forgedit_reference"


def carries_result(model, result) -> bool:
    """Whether the MODEL holds this result's learned deltas as patches (it came through Forgedit Forget)."""
    ids = {id(d) for d in result.deltas.values()}
    return any(isinstance(p[1], tuple) and id(p[1][0]) in ids for plist in model.patches.values() for p in plist)


def sweep_sigmas(model, scheduler: str, steps: int) -> torch.Tensor:
    sampling = model.get_model_object("model_sampling")
    if scheduler == REFERENCE:
        return reference_sigmas(sampling.sigmas, steps)
    return comfy.samplers.calculate_sigmas(sampling, scheduler, steps).float()


def sweep_noise(shape, seeds: list[int], per_seed: int) -> torch.Tensor:
    """One noise per seed, shared by every (α, γ) of that seed, as ComfyUI's KSampler draws it."""
    return torch.cat([comfy.sample.prepare_noise(torch.zeros(shape), s).repeat(per_seed, 1, 1, 1) for s in seeds])


class ForgeditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditSampler",
            display_name="Forgedit Sampler",
            category=CATEGORY,
            description="Samples every gamma (x alpha) x seed edit in batched runs; every gamma of one seed starts from the "
                        "same noise. Default: the reference DDIM, 50 steps, CFG 7.5, empty-prompt negative.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Forgedit Forget (learned weights applied)."),
                Result.Input("result", tooltip="From Forgedit Fine-tune or Forgedit Load."),
                io.Conditioning.Input("target", tooltip="CLIP Text Encode of the target prompt."),
                io.Vae.Input("vae", tooltip="Decodes the sweep into images and the grid."),
                io.Combo.Input("mode", options=["vs", "vp"], default="vs", tooltip=MODE_TOOLTIP),
                io.String.Input("gammas", default="0.5, 0.6, 0.7", tooltip=GAMMA_TOOLTIP),
                io.String.Input("alphas", default="0.7", tooltip="vp only, a list like gammas. " + ALPHA_TOOLTIP),
                io.String.Input("seeds", default="0, 1, 2, 3", tooltip="Sampling seeds, e.g. '0, 1, 2, 3' (reference: 4 images per setting)."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Sampling steps (reference: 50)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1, tooltip="Classifier-free guidance scale (reference: 7.5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddim",
                               tooltip="Any ComfyUI sampler; ddim (= Euler on these sigmas) with forgedit_reference is the reference DDIM(eta=0)."),
                io.Combo.Input("scheduler", options=[REFERENCE, *comfy.samplers.KSampler.SCHEDULERS], default=REFERENCE,
                               tooltip="forgedit_reference: diffusers DDIM 'leading' timesteps 980, 960, ..., 0 as in the "
                                       "paper's code; or any ComfyUI scheduler."),
                io.Int.Input("batch_size", default=8, min=1, max=256, tooltip="Images per sampling run; lower it if memory runs out."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Optional negative prompt; by default the empty prompt, as the reference."),
            ],
            outputs=[io.Latent.Output(display_name="latent"), io.Image.Output(display_name="images"),
                     io.Image.Output(display_name="grid")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, result, target, vae, mode, gammas, alphas, seeds, steps, cfg, sampler_name, scheduler,
                batch_size, negative=None) -> io.NodeOutput:
        gamma_list = parse_values(gammas, "gammas")
        alpha_list = parse_values(alphas, "alphas") if mode == "vp" else [0.0]
        seed_list = [int(s) for s in parse_values(seeds, "seeds")]
        if not carries_result(model, result):
            raise ValueError("model does not carry this fine-tuned result: connect the MODEL output of Forgedit Forget")
        model = sdpa_on_cpu(model)
        pairs = [(a, g) for a in alpha_list for g in gamma_list]
        e = interpolate(result.source_embedding, target_embedding(target, result), mode,
                        [g for _, g in pairs], [a for a, _ in pairs]).repeat(len(seed_list), 1, 1)
        uncond = negative[0][0].float() if negative else result.uncond_embedding
        shape = (1, 4, result.metadata["height"] // 8, result.metadata["width"] // 8)
        noise = sweep_noise(shape, seed_list, len(pairs))
        sigmas = sweep_sigmas(model, scheduler, steps)
        if scheduler == REFERENCE:
            noise = noise * ddim_noise_scale(float(sigmas[0]), float(model.get_model_object("model_sampling").sigma_max))
        sampler = comfy.samplers.sampler_object(sampler_name)
        runs = range(0, len(noise), batch_size)
        pbar = comfy.utils.ProgressBar((len(sigmas) - 1) * len(runs), node_id=cls.hidden.unique_id)
        samples = torch.cat([comfy.sample.sample_custom(
            model, noise[i:i + batch_size], cfg, sampler, sigmas, [[e[i:i + batch_size], {}]], [[uncond, {}]],
            torch.zeros_like(noise[i:i + batch_size]), callback=lambda *_: pbar.update(1), disable_pbar=True,
            seed=seed_list[0]) for i in runs])
        if scheduler == REFERENCE:
            samples = samples * ddim_final_scale(float(sigmas[-1]))
        images = vae.decode(samples)
        col_labels = [f"gamma {g:g}" if mode == "vs" else f"beta {g:g}\nalpha {a:g}" for a, g in pairs]
        grid = labelled_grid(images, len(seed_list), len(pairs), [f"seed {s}" for s in seed_list], col_labels)
        return io.NodeOutput({"samples": samples}, images, grid)
