"""The one flow of every per-image fine-tune (Forgedit §3, Imagic §3.1, Forgedit §7-8): the training copy, the table
of methods, the precision choice, the metadata schema and the disk cache around it."""
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import comfy.model_management
import comfy.utils
import torch

from ..forgedit_ops.finetune import (FinetuneConfig, checkpoint_modules, deltas_in_place, dreambooth_finetune,
                                     joint_finetune, sequential_finetune, trainable_copy)
from ..forgedit_ops.forgetting import is_trained, missing_blocks, whole_unet
from ..forgedit_ops.images import stretch_resize
from ..forgedit_ops.precision import RunSize, choose_options
from ..forgedit_ops.result import ForgeditResult
from ..forgedit_ops.schedule import alphas_cumprod
from .common import encode_prompt, family, prediction_type, require_one_image, unet_fingerprint
from .host import RUNTIME_HANDLES, free_memory, low_precision, materialized, sdpa_transformer_options
from .storage import cached_or_trained
from .text_encoder import trainable_text_encoder
from .training_inputs import WIDGETS


@dataclass
class TrainingCopy:
    """A trainable copy of the MODEL's UNet: unet(x, t, c[, transformer_options]) (its raw output, ε or v), the
    transformer_options it runs with by default, its fp32 master parameters, ᾱ, the device, the per-step tick
    (progress, Cancel) and the loaded base UNet the deltas are taken against."""
    unet: Callable
    options: dict
    params: dict
    abar: torch.Tensor
    device: torch.device
    tick: Callable[[int, float], None]
    base: torch.nn.Module


def progress(total: int, node_id) -> Callable:
    """A ProgressBar tick that Cancel interrupts."""
    pbar = comfy.utils.ProgressBar(total, node_id=node_id)

    def tick(*_):
        pbar.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return tick


@contextlib.contextmanager
def training_copy(model, trains: Callable[[str], bool], cfg: FinetuneConfig, steps: int, node_id=None,
                  callback: Optional[Callable[[int, float], None]] = None):
    """Grad-enabled training on a structural copy of the MODEL's UNet, materialised with its patches on its own load
    device, whose `trains` tensors are fp32 masters; a progress bar of `steps` that Cancel interrupts. The copy and its
    memory go on exit; the MODEL is never modified."""
    patcher = materialized(model)
    unet, device = patcher.model.diffusion_model, patcher.load_device
    options = sdpa_transformer_options(patcher)
    advance = progress(steps, node_id)

    def tick(step, loss):
        advance()
        if callback is not None:
            callback(step, loss)

    student, params = None, {}
    try:
        with torch.inference_mode(False), torch.enable_grad():
            student, params = trainable_copy(unet, trains, device, cfg.compute_dtype, RUNTIME_HANDLES)
            if cfg.checkpointing:
                checkpoint_modules(layer for blocks in (student.input_blocks, [student.middle_block], student.output_blocks)
                                   for block in blocks for layer in block)
            yield TrainingCopy(lambda x, t, c, to=options: student(x, t, c, transformer_options=to), options, params,
                               alphas_cumprod(model.get_model_object("model_sampling").sigmas), device, tick, unet)
    finally:
        student = None  # the unet closure's reference: frees the copy even while the caller still holds the TrainingCopy
        params.clear()
        comfy.model_management.soft_empty_cache()


@dataclass
class Job:
    """What a method trains from, prepared before the copy exists: the CLIP, the latent z0, the initial embedding,
    the configuration and the node's settings."""
    clip: object
    z0: torch.Tensor
    e_init: torch.Tensor
    cfg: FinetuneConfig
    settings: dict


@dataclass
class Trained:
    """What a method returns: the source embedding, the loss per applied step, and optionally the negative embedding,
    text-encoder deltas and method-specific metadata."""
    embedding: torch.Tensor
    losses: list
    uncond: Optional[torch.Tensor] = None
    text_deltas: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def train_joint(job: Job, run: TrainingCopy) -> Trained:
    e_opt, losses = joint_finetune(run.unet, run.params, job.e_init, job.z0.to(run.device), run.abar, job.cfg, run.tick)
    return Trained(e_opt.cpu(), losses)


def train_sequential(job: Job, run: TrainingCopy) -> Trained:
    e_opt, text_losses, unet_losses = sequential_finetune(
        run.unet, run.params, job.e_init, job.z0.to(run.device), run.abar, job.cfg, job.settings["text_steps"],
        job.settings["unet_steps"], run.tick)
    return Trained(e_opt.cpu(), unet_losses, metadata={"text_losses": text_losses})


def train_dreambooth(job: Job, run: TrainingCopy) -> Trained:
    clip, prompt = job.clip, job.settings["source_prompt"]
    source, empty = clip.tokenize(prompt), clip.tokenize("")
    with trainable_text_encoder(clip, run.device) as (encoder, text_params, deltas):
        losses = dreambooth_finetune(run.unet, run.params, lambda: encoder.encode_token_weights(source)[0].to(run.device),
                                     text_params, job.z0.to(run.device), run.abar, job.cfg, run.tick)
        with torch.no_grad():
            e_src, uncond = (encoder.encode_token_weights(tokens)[0].float().cpu() for tokens in (source, empty))
        text_deltas = deltas()
    return Trained(e_src, losses, uncond, text_deltas)


@dataclass(frozen=True)
class Method:
    """One per-image fine-tune: its name in the result's metadata, the UNet tensors it trains, the prompt its embedding
    starts from, and the forgedit_ops entry point that trains it."""
    name: str
    trains: Callable[[str], bool]
    init: str
    train: Callable[[Job, TrainingCopy], Trained]


METHODS = {m.name: m for m in (
    Method("forgedit", is_trained, "source", train_joint),
    Method("imagic", whole_unet, "target", train_sequential),
    Method("forgedit-imagic", is_trained, "source", train_sequential),
    Method("dreambooth-forgedit", whole_unet, "source", train_dreambooth),
)}


def declared_settings(node_cls, values: dict) -> dict:
    """The node's widget values by its declared inputs (defaults for optional ones left out), disk_cache excluded: what
    identifies a training run in the cache and the metadata."""
    return {i.id: values.get(i.id, i.default) for i in node_cls.define_schema().inputs
            if isinstance(i, WIDGETS) and i.id != "disk_cache"}


def run_size(model, method: Method, batch: int, width: int, height: int) -> RunSize:
    """What sets this fine-tune's memory (forgedit_ops.precision.training_bytes)."""
    unet = model.model.diffusion_model
    trained = sum(p.numel() for k, p in unet.named_parameters() if method.trains(k))
    return RunSize(trained=trained, frozen=sum(p.numel() for p in unet.parameters()) - trained, batch=batch,
                   latent_pixels=(width // 8) * (height // 8),
                   channels=model.model.model_config.unet_config["model_channels"])


def training_options(precision: str, model, size: RunSize) -> dict:
    """The precision preset's options on the MODEL's device; `auto` compares this run's estimated memory with the free
    memory there (RAM on a CPU, VRAM on a GPU)."""
    device = model.load_device
    return choose_options(precision, low_precision(device), size, free_memory(model, device))


def require_trainable(model, method: Method) -> str:
    """An SD 1.x / 2.x model whose UNet has every block the method trains (a one-level UNet would train nothing); what
    it predicts ("eps" or "v")."""
    prediction = prediction_type(model)
    missing = missing_blocks(k for k, _ in model.model.diffusion_model.named_parameters())
    if missing and method.trains is is_trained:
        raise ValueError(f"this UNet lacks {', '.join(missing)}, which {method.name} fine-tunes (Forgedit §3: encoder "
                         "and decoder blocks 1-3 of the SD 1.x / 2.x layout): use a full SD 1.x or 2.x checkpoint")
    return prediction


def warn_below_native_size(model, prediction: str, width: int, height: int) -> None:
    """SD 2.x v-prediction checkpoints (2.0-v, 2.1-v) learned at 768²: smaller sizes fine-tune and sample worse."""
    if prediction == "v" and family(model) == "SD 2.x" and min(width, height) < 768:
        logging.warning("Forgedit: this SD 2.x v-prediction model was trained at 768x768; %dx%d fine-tunes and samples "
                        "worse: set width and height to 768", width, height)


def training_latent(model, vae, image, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image stretched to width x height and its model-space latent z0 (fp32)."""
    image = stretch_resize(image[..., :3], width, height)
    return image, model.model.process_latent_in(vae.encode(image)).float()


def train_method(method: Method, job: Job, model, steps: int, node_id=None, callback=None):
    """Run the method on a training copy of the MODEL; returns (what it trained, the UNet deltas, base fingerprint)."""
    with training_copy(model, method.trains, job.cfg, steps, node_id, callback) as run:
        trained = method.train(job, run)
        base = unet_fingerprint(run.base)
        deltas = deltas_in_place(run.params, run.base)
    return trained, deltas, base


def fine_tune(method: Method, model, clip, vae, image, settings: dict, cfg_fields: dict, steps: int, node_id=None,
              disk_cache: bool = False) -> ForgeditResult:
    """Train `method` on one image and return its result; with disk_cache, reuse a stored result of the same inputs."""
    prediction = require_trainable(model, method)
    require_one_image(image)
    width, height = settings["width"], settings["height"]
    warn_below_native_size(model, prediction, width, height)
    size = run_size(model, method, cfg_fields.get("batch_size", 1), width, height)
    cfg = FinetuneConfig(**cfg_fields, **training_options(settings["precision"], model, size), prediction=prediction)
    e_init = encode_prompt(clip, settings[f"{method.init}_prompt"], f"{method.init}_prompt")
    uncond = encode_prompt(clip, "", "negative")
    image, z0 = training_latent(model, vae, image, width, height)

    def train() -> ForgeditResult:
        start = time.perf_counter()
        trained, deltas, base = train_method(method, Job(clip, z0, e_init, cfg, settings), model, steps, node_id)
        seconds = time.perf_counter() - start
        logging.info("Forgedit %s: %d steps in %.1f s (%s)", method.name, len(trained.losses), seconds, cfg.precision)
        metadata = {"method": method.name, "base_fingerprint": base, **settings, "precision": cfg.precision,
                    "prediction": prediction, "steps": len(trained.losses), "losses": trained.losses,
                    "seconds": round(seconds, 2), **trained.metadata}
        uncond_out = uncond.cpu() if trained.uncond is None else trained.uncond
        return ForgeditResult(deltas, trained.embedding, uncond_out, metadata, trained.text_deltas)

    return cached_or_trained(disk_cache, model, {**settings, **vars(cfg)}, image, z0, e_init, train)

