"""Shared helpers for the trainer tests: a very small TiTok config."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_module(family: str):
    path = os.path.join(ROOT, "configs", f"{family}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{family}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def micro_config(**overrides):
    """`tiny` shrunk further: 32x32 images, width 32, one block each side; seconds per run."""
    c = load_config_module("titok").get_config("tiny")
    c.model.update(dict(image_size=32, patch_size=8, encoder_width=32, encoder_depth=1,
                        encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
                        num_latent_tokens=8, token_size=8, codebook_size=32))
    c.data.image_size = 32
    c.batch_size = 8
    c.total_steps = 6
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.checkpoint.every_steps = 3
    c.checkpoint.async_save = False
    c.optimizer.warmup_steps = 2
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c
