"""Training presets: precision and memory savers chosen from what the device offers and an estimate of this run's
memory. None changes the method; all keep fp32 master weights (a 6e-5 step is about half a bf16 ulp of a weight)."""
from dataclasses import dataclass

PRESETS = ("auto", "exact", "fast", "low memory")

# Activations kept for backward, in elements per sample, per latent pixel and per UNet base channel: calibrated on the
# reference's fp32 Forgedit fine-tune (SD1.5, 320 channels, 512x512, batch 10: about 8 GB of its 20 GB peak are
# activations, the rest weights, gradients and Adam) and checked by benchmarks/finetune.py, which prints the estimate
# beside the measured peak.
ACTIVATIONS_PER_PIXEL_CHANNEL = 150
# Gradient checkpointing every UNet layer keeps each layer's input only.
CHECKPOINTED_FRACTION = 0.15
MOMENT_BYTES = {"fp32": 8, "bf16": 4, "8-bit": 3}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class RunSize:
    """What sets a fine-tune's memory: trained and frozen parameter counts, the batch, the latent pixels (h/8 · w/8)
    and the UNet's base channel count."""
    trained: int
    frozen: int
    batch: int
    latent_pixels: int
    channels: int


def preset_options(preset: str, low_precision: str) -> dict:
    """Training options of a preset. exact: the reference's fp32. fast: autocast to `low_precision` (bf16, or fp16 with
    a dynamic loss scale) over fp32 masters. low memory: fast + gradient checkpointing + Adam with an 8-bit first and a
    bf16 second moment, stepping each tensor inside backward (fp16 keeps the gradients, so an overflowed step is
    skipped whole)."""
    options = {"exact": dict(precision="fp32"), "fast": dict(precision=low_precision),
               "low memory": dict(precision=low_precision, checkpointing=True, fused_step=low_precision != "fp16",
                                  moments="8-bit")}
    if preset not in options:
        raise ValueError(f"unknown precision {preset!r}; choose one of {', '.join(PRESETS)}")
    return options[preset]


def training_bytes(size: RunSize, options: dict) -> int:
    """Estimated peak bytes of a fine-tune with these options beyond the loaded model: fp32 masters, their gradients
    (none when fused) and Adam moments, fp32 copies of the frozen weights (exact only: autocast reads them in place)
    and the activations kept for backward."""
    precision = options.get("precision", "fp32")
    gradients = 0 if options.get("fused_step") else 4
    trained = size.trained * (4 + gradients + MOMENT_BYTES[options.get("moments", "fp32")])
    frozen = size.frozen * 4 if precision == "fp32" else 0
    activations = (ACTIVATIONS_PER_PIXEL_CHANNEL * size.batch * size.latent_pixels * size.channels
                   * DTYPE_BYTES[precision] * (CHECKPOINTED_FRACTION if options.get("checkpointing") else 1))
    return int(trained + frozen + activations)


def choose_options(preset: str, low_precision: str, size: RunSize, free_bytes: float) -> dict:
    """`auto` is fast when this run's estimated memory fits the free memory, else low memory; other presets as named."""
    if preset == "auto":
        fast = preset_options("fast", low_precision)
        preset = "fast" if training_bytes(size, fast) <= free_bytes else "low memory"
    return preset_options(preset, low_precision)
