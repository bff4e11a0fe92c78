"""Masked video generation (issue 18 section 3): MaskGIT over a video tokenizer's 3D latent grid
(factorised 3D position embeddings), class-conditional sampling and frame prediction (the first
latent frame given, never re-masked), and the tiny pipeline end to end through the CLI: a causal
MAGVIT-v2 workdir -> `tokenize --data sample_video` shards -> `train configs/maskgit.py:video_tiny`
(2 steps) -> `generate` GIFs and a frame grid, with and without `--first_frame`."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax import cli
from titok_jax.generators import masking
from titok_jax.generators.maskgit import GridPositionEmbedding, MaskGITTransformer, generate_tokens

from train_helpers import load_config_module

pytestmark = pytest.mark.usefixtures("fast_compile")

GRID = (3, 4, 4)   # T', h, w
SMALL = dict(codebook_size=16, num_tokens=48, grid_shape=GRID, num_classes=3, width=16, depth=1,
             num_heads=2, dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def grid_model():
    model = MaskGITTransformer(**SMALL)
    from flax import linen as nn
    variables = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 48), jnp.int32),
                                    jnp.zeros((1,), jnp.int32)))
    return model, variables


def test_grid_position_embedding_is_factorised_3d(grid_model):
    model, variables = grid_model
    pos = variables["params"]["position_embeddings"]
    shapes = {k: tuple(v.shape) for k, v in pos.items()}
    assert shapes == {"axis_0": (3, 16), "axis_1": (4, 16), "axis_2": (4, 16), "class_position": (1, 16)}
    table = GridPositionEmbedding(GRID, 16).apply({"params": pos}, method="table")
    assert table.shape == (1 + 48, 16)
    p = {k: np.asarray(v) for k, v in pos.items()}
    np.testing.assert_allclose(table[0], p["class_position"][0])
    for t, i, j in ((0, 0, 0), (1, 2, 3), (2, 3, 1)):
        np.testing.assert_allclose(table[1 + t * 16 + i * 4 + j],
                                   p["axis_0"][t] + p["axis_1"][i] + p["axis_2"][j], rtol=1e-6)
    assert model.frame_tokens == 16
    with pytest.raises(ValueError, match="grid"):
        model.apply(variables, jnp.zeros((1, 40), jnp.int32), jnp.zeros((1,), jnp.int32))
    # the image model keeps its one learned [N+1, D] table
    image = MaskGITTransformer(**{**SMALL, "grid_shape": None})
    from flax import linen as nn
    shapes = nn.unbox(jax.eval_shape(image.init, jax.random.key(0), jnp.zeros((1, 48), jnp.int32),
                                     jnp.zeros((1,), jnp.int32)))["params"]["position_embeddings"]
    assert {k: v.shape for k, v in shapes.items()} == {"embedding": (49, 16)}


def test_class_conditional_sampling_gives_grid_ids(grid_model):
    model, variables = grid_model
    labels = jnp.asarray([0, 2, 3], jnp.int32)   # 3 = the null class
    ids = np.asarray(generate_tokens(model, variables, labels, jax.random.key(1), steps=4,
                                     guidance_scale=1.5, guidance_schedule="linear"))
    assert ids.shape == (3, 48) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < 16
    assert ids.reshape(3, *GRID).shape == (3, 3, 4, 4)


def test_first_frame_is_kept_exactly(grid_model):
    model, variables = grid_model
    first = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 16)), jnp.int32)
    labels = jnp.asarray([1, 3], jnp.int32)
    for kw in (dict(), dict(guidance_scale=2.0, guidance_schedule="linear")):
        ids = np.asarray(generate_tokens(model, variables, labels, jax.random.key(2), steps=3,
                                         randomize_temperature=4.0, first_frame=first, **kw))
        np.testing.assert_array_equal(ids[:, :16], np.asarray(first))
        assert ids.min() >= 0 and ids.max() < 16   # everything decoded, no mask id left
    from titok_jax.generators.maskgit_sampling import maskgit_sample, mask_counts
    # the schedule runs over the free tokens: after step s, counts(32)[s] stay masked
    init = jnp.full((2, 48), model.mask_id, jnp.int32).at[:, :16].set(first)
    _, trace = maskgit_sample(lambda t, u: model.apply(variables, t, labels), jax.random.key(3), 2,
                              48, model.mask_id, steps=3, init_tokens=init, num_fixed=16,
                              return_trace=True)
    np.testing.assert_array_equal(np.asarray(trace["num_masked"])[:, 0], mask_counts(32, 3))
    with pytest.raises(ValueError, match="first_frame"):
        generate_tokens(model, variables, labels, jax.random.key(2), steps=2, first_frame=first[:, :8])


def test_training_mask_keeps_the_condition_frame():
    keep = jnp.zeros((64, 48), bool).at[::2, :16].set(True)
    mask = np.asarray(masking.training_mask(jax.random.key(0), 64, 48, keep=keep))
    assert not mask[::2, :16].any()                  # the given first frame is never masked
    assert mask.sum(axis=1).min() >= 1 and mask[::2].sum(axis=1).max() <= 32
    assert mask[1::2, :16].any()                     # unconditioned rows mask anywhere
    np.testing.assert_array_equal(                   # keep=None: the official mask, bit for bit
        np.asarray(masking.training_mask(jax.random.key(5), 4, 48)),
        np.asarray(masking.random_mask(jax.random.split(jax.random.key(5))[1], masking.num_masked(
            jax.random.uniform(jax.random.split(jax.random.key(5))[0], (4,)), 48), 48)))


def test_video_tiny_config_and_refusals():
    mg = load_config_module("maskgit")
    c = mg.get_config("video_tiny")
    assert tuple(c.model.grid_shape) == (3, 8, 8) and c.model.num_tokens == 192
    assert c.model.codebook_size == 1024 and c.generator.first_frame_prob == 0.25
    from titok_jax.tasks import get_task
    task = get_task(c)
    assert task.generator_spec.grid_shape == (3, 8, 8)
    with pytest.raises(ValueError, match="latent grid"):   # image token shards do not fit
        task.check_token_data({"codebook_size": 1024, "num_tokens": 192})
    with pytest.raises(ValueError, match="grid_shape"):
        task.check_token_data({"codebook_size": 1024, "num_tokens": 192, "latent_shape": [2, 8, 12]})
    image = mg.get_config("tiny")
    image.generator.first_frame_prob = 0.5
    with pytest.raises(ValueError, match="grid_shape"):
        get_task(image)


# ----------------------------------------------------------------------------- end to end
SIZE = 16


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A random-init tiny causal MAGVIT-v2 workdir (16 px, latent 3 x 8 x 8 of 2^10 codes), token
    shards of the 3 held-out sample_video clips, and a video_tiny generator trained 2 steps on them."""
    from flax import linen as nn

    from titok_jax.checkpoint import inference_state, write_workdir
    from titok_jax.tasks import get_task
    root = tmp_path_factory.mktemp("video_gen")
    c = load_config_module("magvit2_video").get_config("tiny")
    c.model.image_size = c.data.image_size = SIZE
    c.model.ch_mult, c.model.temporal_downsample = (1, 2), (True,)
    c.optimizer.ema_decay = 0.0   # an inference-state workdir: params, no EMA
    task = get_task(c)
    params, state = nn.unbox(jax.jit(task.init)(jax.random.key(0)))
    tok = str(root / "tok")
    write_workdir(tok, c.to_dict(), inference_state(params["model"], state["model"]))
    shards = str(root / "shards")
    assert cli.main(["tokenize", "--workdir", tok, "--data", "sample_video", "--split", "eval",
                     "--augment=false", "--output", shards]) == 0
    gen = str(root / "gen")
    assert cli.main([
        "train", "--config", "configs/maskgit.py:video_tiny", "--workdir", gen,
        f"--config.data.source=tokens:{shards}", "--config.model.width=32", "--config.model.depth=1",
        "--config.batch_size=8", "--config.total_steps=2", "--config.log_every_steps=1",
        "--config.eval_every_steps=0", "--config.checkpoint.every_steps=2",
        "--config.checkpoint.async_save=false", "--config.generator.first_frame_prob=0.5",
        "--progress=false"]) == 0
    return tok, shards, gen, root


def test_video_token_shards(pipeline):
    from titok_jax.data.tokens import TokenSource
    _, shards, _, _ = pipeline
    src = TokenSource(shards)
    assert len(src) == 3 and src.meta["latent_shape"] == [3, 8, 8] and src.meta["num_frames"] == 5
    assert src[0]["tokens"].shape == (192,) and src.meta["num_classes"] == 3


def test_generate_videos_and_frame_prediction(pipeline):
    from PIL import Image

    import titok_jax
    tok_dir, _, gen_dir, root = pipeline
    with open(os.path.join(gen_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    out = root / "clips"
    assert cli.main(["generate", "--workdir", gen_dir, "--tokenizer", tok_dir, "--output", str(out),
                     "--num", "2", "--steps", "2"]) == 0
    with Image.open(out / "000001_class1.gif") as im:
        assert (im.n_frames, im.size) == (5, (SIZE, SIZE))
    from titok_jax.video_files import has_pyav
    assert os.path.isfile(out / "000000_class0.mp4") == has_pyav()   # mp4 too, with PyAV
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[:2] == (2 + 2 * (SIZE + 2), 2 + 5 * (SIZE + 2))   # a row of 5 frames per clip
    with np.load(out / "tokens.npz") as data:
        assert data["tokens"].shape == (2, 3, 8, 8) and list(data["labels"]) == [0, 1]
    # frame prediction: the first latent frame is the tokenizer's ids of the given image
    frame = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(frame).save(root / "first.png")
    pred = root / "pred"
    assert cli.main(["generate", "--workdir", gen_dir, "--tokenizer", tok_dir, "--output", str(pred),
                     "--num", "3", "--steps", "2", "--class_id", "6",
                     "--first_frame", str(root / "first.png")]) == 0
    tok = titok_jax.load_tokenizer(tok_dir)
    want = tok.encode(frame[None, None])[0, 0]
    with np.load(pred / "tokens.npz") as data:
        assert data["tokens"].shape == (3, 3, 8, 8)
        for row in data["tokens"]:
            np.testing.assert_array_equal(row[0], want)
    gen = titok_jax.load_generator(gen_dir)
    assert gen.grid_shape == (3, 8, 8)
    with pytest.raises(ValueError, match="first_frame"):
        gen.sample([0], first_frame=np.zeros((4, 4), np.int32))
