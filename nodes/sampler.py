"""Forgedit Sampler: the γ (× α) × seed edit sweep in batched sampling runs, with a labelled grid (Forgedit §6)."""
import inspect

import comfy.k_diffusion.sampling as k_sampling
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..forgedit_ops.images import labelled_grid
from ..forgedit_ops.interpolation import interpolate
from ..forgedit_ops.schedule import ddim_final_scale, ddim_noise_scale, reference_sigmas
from ..forgedit_ops.score import SweepData
from ..forgedit_ops.sweep import MAX_IMAGES, MODES, read_sweep
from .common import CATEGORY, Result, given, queue_check, sdpa_on_cpu, target_embedding
from .edit import ALPHA_TOOLTIP, GAMMA_TOOLTIP, MODE_TOOLTIP, carries_result
from .score import SWEEP_TOOLTIP, Sweep
from .v3 import io

REFERENCE = "forgedit_reference"
# Samplers whose own noise is by default a Brownian tree (k-diffusion's SDE solvers); their _gpu twins keep it on the GPU.
BROWNIAN = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")
# dpm_adaptive accepts or rejects each step on an error norm over the whole batch, so an image depends on its neighbours.
ONE_IMAGE_PER_RUN = ("dpm_adaptive",)


def require_known_sampler(sampler_name: str, scheduler: str) -> None:
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise ValueError(f"sampler_name {sampler_name!r} is not a ComfyUI sampler; choose one of "
                         f"{', '.join(comfy.samplers.KSampler.SAMPLERS)}")
    if scheduler not in (REFERENCE, *comfy.samplers.KSampler.SCHEDULERS):
        raise ValueError(f"scheduler {scheduler!r} is not {REFERENCE} or a ComfyUI scheduler "
                         f"({', '.join(comfy.samplers.KSampler.SCHEDULERS)})")


def read_inputs(mode: str, gammas: str, alphas: str, seeds: str, sampler_name: str, scheduler: str):
    """Every check of the sampler's inputs that needs no tensor, at queue time and again at run time; the sweep plan."""
    require_known_sampler(sampler_name, scheduler)
    return read_sweep(mode, gammas, alphas, seeds)


def sweep_sigmas(model, sampler_name: str, scheduler: str, steps: int) -> torch.Tensor:
    """The reference's leading DDIM sigmas, or the very sigmas core KSampler uses for this sampler and scheduler."""
    sampling = model.get_model_object("model_sampling")
    if scheduler == REFERENCE:
        return reference_sigmas(sampling.sigmas, steps)
    discard = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps + discard).float()
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def sweep_noise(shape, seeds: list[int]) -> torch.Tensor:
    """Each image's initial noise as ComfyUI's KSampler draws it for that seed alone; every (α, γ) of a seed shares it."""
    return torch.cat([comfy.sample.prepare_noise(torch.zeros(shape), s) for s in seeds])


def cell_noise_sampler(sampler_name: str, x: torch.Tensor, sigmas: torch.Tensor, seeds: list[int]):
    """The sampler's own noise, item by item what core KSampler would draw for that one image at its seed."""
    if sampler_name.removesuffix("_gpu") in BROWNIAN:
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        cpu = not sampler_name.endswith("_gpu")
        items = [k_sampling.BrownianTreeNoiseSampler(x[i:i + 1], sigma_min, sigma_max, seed=s, cpu=cpu)
                 for i, s in enumerate(seeds)]
    else:
        items = [k_sampling.default_noise_sampler(x[i:i + 1], seed=s) for i, s in enumerate(seeds)]
    return lambda sigma, sigma_next: torch.cat([item(sigma, sigma_next) for item in items])


def cell_sampler(sampler_name: str, seeds: list[int]):
    """sampler_object(sampler_name) drawing each image's noise from its own seed, so a cell is the same image at any
    batch position (Forgedit §6 sweeps). Samplers that take no noise_sampler draw no noise of their own (dpm_fast and
    dpm_adaptive scale theirs by eta = 0)."""
    sampler = comfy.samplers.sampler_object(sampler_name)
    function = sampler.sampler_function
    if "noise_sampler" not in inspect.signature(function).parameters:
        return sampler

    def with_cell_noise(model, x, sigmas, *args, **kwargs):
        return function(model, x, sigmas, *args, noise_sampler=cell_noise_sampler(sampler_name, x, sigmas, seeds),
                        **kwargs)
    return comfy.samplers.KSAMPLER(with_cell_noise, sampler.extra_options, sampler.inpaint_options)


class ForgeditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditSampler",
            display_name="Forgedit Sampler",
            category=CATEGORY,
            description="Samples every gamma (x alpha) x seed edit in batched runs; every gamma of one seed starts from the "
                        "same noise, and each image is the one core KSampler makes alone at its seed, with any sampler "
                        "and batch size. Default: the reference DDIM, 50 steps, CFG 7.5, empty-prompt negative.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Forgedit Forget (learned weights applied)."),
                Result.Input("result", tooltip="From Forgedit Fine-tune or Forgedit Load."),
                io.Conditioning.Input("target", tooltip="CLIP Text Encode of the target prompt."),
                io.Vae.Input("vae", tooltip="Decodes the sweep into images and the grid."),
                io.Combo.Input("mode", options=list(MODES), default="vs", tooltip=MODE_TOOLTIP),
                io.String.Input("gammas", default="0.5, 0.6, 0.7", tooltip=GAMMA_TOOLTIP),
                io.String.Input("alphas", default="0.7", tooltip=ALPHA_TOOLTIP),
                io.String.Input("seeds", default="0, 1, 2, 3",
                                tooltip="Sampling seeds: whole numbers, e.g. '0, 1, 2, 3' or '0:3:1' (reference: 4 images "
                                        f"per setting). At most {MAX_IMAGES} images (gammas x alphas x seeds) per sweep; "
                                        "each image equals core KSampler's at its seed, whatever its batch."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Sampling steps (reference: 50)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1, tooltip="Classifier-free guidance scale (reference: 7.5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddim",
                               tooltip="Any ComfyUI sampler; ddim (= Euler on these sigmas) with forgedit_reference is the reference DDIM(eta=0)."),
                io.Combo.Input("scheduler", options=[REFERENCE, *comfy.samplers.KSampler.SCHEDULERS], default=REFERENCE,
                               tooltip="forgedit_reference: diffusers DDIM 'leading' timesteps 980, 960, ..., 0 as in the "
                                       "paper's code; or any ComfyUI scheduler."),
                io.Int.Input("batch_size", default=8, min=1, max=256,
                             tooltip="Images per sampling run; lower it if memory runs out. It never changes an image."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Optional negative prompt (one CLIP Text Encode, at most 75 tokens); by "
                                              "default the empty prompt, as the reference."),
            ],
            outputs=[io.Latent.Output(display_name="latent"), io.Image.Output(display_name="images"),
                     io.Image.Output(display_name="grid"), Sweep.Output(display_name="sweep", tooltip=SWEEP_TOOLTIP)],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, mode=None, gammas=None, alphas=None, seeds=None, sampler_name=None,
                        scheduler=None) -> bool | str:
        """Queue-time check of the lists, the sweep size (§6) and the combos (ComfyUI 0.3.64 checks no V3 combo);
        linked ones are checked when the node runs."""
        return queue_check(read_inputs, given(mode, "vs"), given(gammas, "0"), given(alphas, "0"), given(seeds, "0"),
                           given(sampler_name, "ddim"), given(scheduler, REFERENCE))

    @classmethod
    def execute(cls, model, result, target, vae, mode, gammas, alphas, seeds, steps, cfg, sampler_name, scheduler,
                batch_size, negative=None) -> io.NodeOutput:
        plan = read_inputs(mode, gammas, alphas, seeds, sampler_name, scheduler)
        e_t = target_embedding(target, result)
        uncond = result.uncond_embedding if negative is None else target_embedding(negative, result, "negative")
        if not carries_result(model, result):
            raise ValueError("model does not carry this fine-tuned result: connect the MODEL output of Forgedit Forget")
        model = sdpa_on_cpu(model)
        cells = plan.cells
        e = interpolate(result.source_embedding, e_t, mode, [g for _, g in plan.columns], [a for a, _ in plan.columns])
        e = e[[c.col for c in cells]]
        seed_of = [c.seed for c in cells]
        shape = (1, 4, result.metadata["height"] // 8, result.metadata["width"] // 8)
        noise = sweep_noise(shape, seed_of)
        sigmas = sweep_sigmas(model, sampler_name, scheduler, steps)
        if scheduler == REFERENCE:
            noise = noise * ddim_noise_scale(float(sigmas[0]), float(model.get_model_object("model_sampling").sigma_max))
        size = 1 if sampler_name in ONE_IMAGE_PER_RUN else batch_size
        runs = [slice(i, i + size) for i in range(0, len(cells), size)]
        pbar = comfy.utils.ProgressBar((len(sigmas) - 1) * len(runs), node_id=cls.hidden.unique_id)
        samples = torch.cat([comfy.sample.sample_custom(
            model, noise[r], cfg, cell_sampler(sampler_name, seed_of[r]), sigmas, [[e[r], {}]], [[uncond, {}]],
            torch.zeros_like(noise[r]), callback=lambda *_: pbar.update(1), disable_pbar=True, seed=seed_of[r][0])
            for r in runs])
        if scheduler == REFERENCE:
            samples = samples * ddim_final_scale(float(sigmas[-1]))
        images = vae.decode(samples)
        grid = labelled_grid(images, len(plan.seeds), len(plan.columns), plan.row_labels, plan.col_labels)
        sweep = SweepData(images, [c.gamma for c in cells], [c.alpha for c in cells], list(seed_of), mode)
        return io.NodeOutput({"samples": samples}, images, grid, sweep)
