"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# A micro TiTok (32 px, 8 tokens, 32 codes) trained for 2 steps, and its token shards of the sample
# photographs: shared by the generator tests (MaskGIT and AR) so it is built once per session.
MICRO_TOKENIZER_ARGS = [
    "--config.data.image_size=32", "--config.model.image_size=32", "--config.model.encoder_width=32",
    "--config.model.decoder_width=32", "--config.model.encoder_depth=1", "--config.model.decoder_depth=1",
    "--config.model.num_latent_tokens=8", "--config.model.quantizer.codebook_size=32",
    "--config.batch_size=8", "--config.total_steps=2", "--config.log_every_steps=2", "--config.eval_every_steps=0",
    "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=false",
    "--config.data.eval_batch_size=4", "--progress=false"]


@pytest.fixture(scope="session")
def micro_tokenizer_dir(tmp_path_factory):
    from titok_jax import cli
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = str(tmp_path_factory.mktemp("micro_tok"))
    assert cli.main(["train", "--config", os.path.join(root, "configs", "titok.py") + ":tiny_vq",
                     "--workdir", workdir, *MICRO_TOKENIZER_ARGS]) == 0
    return workdir


@pytest.fixture(scope="session")
def micro_token_dir(micro_tokenizer_dir, tmp_path_factory):
    from titok_jax import cli
    out = str(tmp_path_factory.mktemp("micro_tokens") / "shards")
    assert cli.main(["tokenize", "--workdir", micro_tokenizer_dir, "--data", "sample", "--output", out]) == 0
    return out


@pytest.fixture(scope="session")
def vq_release_dir(tmp_path_factory):
    """The tiny TiTok release of tests/data (32 px, 8 tokens, 64 codes) imported as a workdir:
    seconds, where training one takes half a minute (shared by the CLI input tests)."""
    from titok_jax import cli
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path_factory.mktemp("vq_release") / "workdir")
    assert cli.main(["import-torch", "--input", os.path.join(root, "tests", "data", "titok", "vq"),
                     "--output", out]) == 0
    return out


@pytest.fixture(scope="module")
def fast_compile():
    """XLA's heavy optimisation passes off for a module of tiny programs (they cost more than the
    programs run); restored afterwards."""
    import jax
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
