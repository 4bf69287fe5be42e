"""Forgedit Fine-tune: joint optimisation of the source embedding and the UNet on one image (Forgedit §2-3)."""
from .common import CATEGORY, Result
from .storage import disk_cache_input
from .training import METHODS, declared_settings, fine_tune
from .training_inputs import (SOURCE_PROMPT, check_training_settings, photo_inputs, precision_input, seed_input,
                              size_inputs, validate_sampled_inputs)
from .v3 import io



class ForgeditFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ForgeditFinetune",
            display_name="Forgedit Fine-tune",
            category=CATEGORY,
            description="Learns one image: fine-tunes the source-prompt embedding and the UNet's encoder/decoder blocks "
                        "1-3 jointly (Forgedit §3). Train once; interpolation, forgetting and sampling re-run cheaply.",
            inputs=[
                *photo_inputs("encodes the source prompt and the empty negative.",
                              "the BLIP caption in the paper (Forgedit Caption), or type it. At most 75 tokens."),
                *size_inputs("paper: 512, 768 for the storytelling demo"),
                io.Int.Input("samples", default=400, min=1, max=100000,
                             tooltip="Training samples; iterations = samples / batch_size (paper: 400 = 40 x 10)."),
                io.Int.Input("batch_size", default=10, min=1, max=64,
                             tooltip="Copies of the one latent per step, each with its own noise and timestep (paper: 10)."),
                io.Float.Input("unet_lr", default=6e-5, min=0.0, max=1e-2, step=1e-6,
                               tooltip="Adam learning rate of the UNet blocks (paper: 6e-5)."),
                io.Float.Input("text_lr", default=1e-3, min=0.0, max=1e-1, step=1e-5,
                               tooltip="Adam learning rate of the source embedding (paper: 1e-3)."),
                seed_input("Seeds the training noise and timesteps. Change it to retrain on purpose; the same seed and "
                           "inputs reuse the cached result."),
                io.Boolean.Input("early_stop", default=False,
                                 tooltip="The reference's early stop: end when a batch loss falls below 0.03 after 350 samples."),
                precision_input(),
                disk_cache_input(),
            ],
            outputs=[Result.Output(display_name="result")],
            hidden=[io.Hidden.unique_id],
        )

    validate_inputs = classmethod(validate_sampled_inputs)

    @classmethod
    def execute(cls, model, clip, vae, image, disk_cache=False, **widgets) -> io.NodeOutput:
        settings = declared_settings(cls, widgets)
        check_training_settings(cls, settings, SOURCE_PROMPT)
        cfg = {k: settings[k] for k in ("samples", "batch_size", "unet_lr", "text_lr", "seed", "early_stop")}
        result = fine_tune(METHODS["forgedit"], model, clip, vae, image, settings, cfg,
                           settings["samples"] // settings["batch_size"], cls.hidden.unique_id, disk_cache)
        return io.NodeOutput(result)
