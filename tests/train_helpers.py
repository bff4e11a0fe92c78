"""Shared helpers for the tests: a very small TiTok config, a digest of a directory's bytes, the
one-line-error check of the CLI."""
import hashlib
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
    c = load_config_module("titok").get_config("tiny_vq")
    c.model.update(dict(image_size=32, patch_size=8, encoder_width=32, encoder_depth=1,
                        encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
                        num_latent_tokens=8, token_size=8))
    c.model.quantizer.codebook_size = 32
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


def fresh_state(config, mesh_spec=None, devices=None, ema=False, seed=0):
    """``(task, state, optimizer, shardings, mesh)`` of a config: the trainer's sharded init on a
    mesh (default: one device)."""
    import jax

    from titok_jax.tasks import get_task
    from titok_jax.train import sharding as sharding_lib
    from titok_jax.train.optimizer import make_optimizer
    from titok_jax.train.state import abstract_and_shardings, create_state

    mesh = sharding_lib.make_mesh(mesh_spec or {"data": 1}, devices or jax.devices()[:1])
    task = get_task(config)
    _, shardings, optimizer = abstract_and_shardings(task.init, lambda p: make_optimizer(config, p),
                                                     ema, mesh, sharding_lib.DEFAULT_RULES)
    state = create_state(task.init, optimizer, ema, shardings, seed)
    return task, state, optimizer, shardings, mesh


def tree_digest(path):
    """``{relative path: sha256}`` of every file under ``path`` (to prove nothing was touched)."""
    digest = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                digest[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def one_line_error(capsys):
    """The CLI's stderr, asserted to be exactly one line without a traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[:2000]
    return err
