"""What the training code needs from the ComfyUI it runs in, across versions: fully materialised weights, the device,
free memory, the attention override and the precision the device trains fast in (ComfyUI 0.3.64 to the DynamicVRAM
versions of 2026)."""
import comfy.ldm.modules.attention as attention
import comfy.model_management
import torch

# Attributes DynamicVRAM (the NVIDIA default of ComfyUI since 2026) hangs on modules: device-memory handles, pinned host buffers and
# per-op patch functions. Some hold ctypes callbacks that cannot be deep-copied; none belongs in a training copy.
RUNTIME_HANDLES = ("_v", "_pin_state", "_pins", "_prefetch", "weight_lowvram_function", "bias_lowvram_function",
                   "_v_weight", "_v_bias", "_v_signature", "_v_block")


def materialized(patcher):
    """A patcher fully loaded on its device whose module parameters hold exactly this MODEL's (or CLIP's) weights with
    its patches applied. Under DynamicVRAM the loaded module never holds the patched weights: its non-dynamic delegate,
    rebuilt by the loader, does."""
    if getattr(patcher, "is_dynamic", lambda: False)():
        try:
            patcher = patcher.get_non_dynamic_delegate()
        except (AttributeError, RuntimeError) as e:
            raise ValueError("this MODEL/CLIP cannot be trained under ComfyUI's DynamicVRAM: it does not come from a core "
                             f"loader that can rebuild it fully loaded ({e}). Load the checkpoint with Load Checkpoint.") from None
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return patcher


def free_memory(patcher, device) -> int:
    """Free bytes on `device` as the patcher counts them (it includes memory ComfyUI can reclaim), else ComfyUI's."""
    if hasattr(patcher, "get_free_memory"):
        return patcher.get_free_memory(device)
    return comfy.model_management.get_free_memory(device)


def sdpa(_, *args, **kwargs):
    """PyTorch SDPA whatever ComfyUI chose: it has a backward on every device (sage/flash inference kernels may not)."""
    return attention.attention_pytorch(*args, **kwargs)


def with_sdpa(model):
    """A clone of the MODEL whose attention is PyTorch SDPA (ComfyUI's own setter where it has one)."""
    model = model.clone()
    if hasattr(model, "set_model_optimized_attention"):
        model.set_model_optimized_attention(attention.attention_pytorch)
    else:
        model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = sdpa
    return model


def sdpa_transformer_options(model) -> dict:
    """transformer_options for calling a copy of the MODEL's UNet directly with SDPA attention."""
    return dict(with_sdpa(model).model_options["transformer_options"])


def low_precision(device) -> str:
    """The autocast dtype `device` trains fast in: none under --force-fp32; ComfyUI's bf16/fp16 choice on accelerators;
    bf16 on CPUs with native bf16 (ComfyUI infers in fp32 there, but bf16 autocast trains 2x faster, README)."""
    mm = comfy.model_management
    if mm.FORCE_FP32:
        return "fp32"
    if mm.is_device_cpu(device):
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    if mm.should_use_bf16(device, prioritize_performance=False):
        return "bf16"
    return "fp16" if mm.should_use_fp16(device, prioritize_performance=False) else "fp32"
