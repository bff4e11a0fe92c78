"""Generators on tokenizer ids: what MaskGIT and the AR task share (``TokenGeneratorTask``) and the
MaskGIT task.

MaskGIT, per batch (``tokens [B, N]`` int ids, ``labels [B]`` class ids or -1)::

    mask   = training_mask(N, schedule)         #masked = round(N * arccos(t) / (pi/2)) >= 1, t ~ U(0,1)
    labels = null class with prob. p_drop      (and wherever the label is unknown, -1)
    logits = model(where(mask, [MASK], tokens), labels)
    loss   = label-smoothed CE on every position, unmasked positions weighted w_unmasked

Tokens come either from pre-tokenized shards (``data.source = "tokens:DIR"``, written by
``titok-jax tokenize --data``) or are computed on the fly from images by the frozen tokenizer of
``config.tokenizer.workdir`` (any other ``data.source``; its params are a constant of the step).
Video (``model.grid_shape = (T', h, w)``, a video tokenizer's latent grid): the ids are the grid
flattened (time first; shards store ``[n, T' h w]`` with ``latent_shape`` in ``meta.json``), the
model adds factorised 3D position embeddings, and with ``generator.first_frame_prob = p`` a sample
is, with probability ``p``, conditioned on its first latent frame: those ``h w`` tokens are never
masked (``masking.training_mask(keep=...)``), and ``sample(first_frame=ids)`` keeps them fixed
(frame prediction from a first frame, which a causal MAGVIT-v2 encodes alone: MAGVIT v1's
``input->input`` condition mode on one latent frame, not its COMMIT). Decoded clips show
as film strips (the frames side by side) in the evaluation grids.

Evaluation reports the task's token metrics (MaskGIT: loss and accuracy on a fixed, seeded mask) on
the first eval batch and samples one image per class (or per null label) for the grid, decoded by
the tokenizer of ``config.tokenizer.workdir`` or of the token shards; ``titok-jax eval`` also
draws a few samples of a few classes (and, for AR on FlexTok tokens, each at 1, 2, 4, ..., N
tokens: ``tasks/eval_generation.py``).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.generators import masking
from titok_jax.generators.maskgit import MaskGITTransformer, generate_tokens
from titok_jax.models.registry import DTYPES, resolve_compute_dtype
from titok_jax.tasks.base import EvalContext, EvalResult, GeneratorSpec, GeneratorTaskBase, register_task
from titok_jax.tasks.eval_generation import TOKENS_PREFIX, evaluate_generation, tokenizer_workdir
from titok_jax.tasks.eval_reconstruction import prefix_lengths

DROPOUT_RNG = "dropout"
# MaskGIT's sampler settings (``sample`` / ``titok-jax generate`` overrides).
SAMPLER_KEYS = ("steps", "guidance_scale", "guidance_schedule", "guidance_power", "randomize_temperature",
                "softmax_temperature_annealing", "mask_schedule", "confidence")


def uses_token_shards(config: Any) -> bool:
    return str(config.data.source).startswith(TOKENS_PREFIX)


def refuse_multi_index(num_codebooks: Any, what: str, generator: str = "this generator") -> None:
    """A one-line ValueError for tokens of ``k > 1`` ids each (a factorized / residual quantizer,
    ``fq`` / ``rq``) where the generator predicts one id per token (MaskGIT; an AR model takes them
    with ``model.num_codebooks = k``, its factorized head: ``check_num_codebooks``)."""
    k = int(num_codebooks or 1)
    if k > 1:
        raise ValueError(f"{what} has {k} ids per token (a multi-index fq / rq tokenizer); "
                         f"{generator} models one id per token, so it cannot train on or decode "
                         f"them (use a tokenizer with one codebook: vq, fsq, lfq or bsq)")


def check_num_codebooks(num_codebooks: Any, model_codebooks: Any, what: str, generator: str) -> None:
    """A one-line ValueError unless ``what`` has the ``model_codebooks`` ids per token the generator
    models (``None``: a generator of one id per token, ``refuse_multi_index``)."""
    k = int(num_codebooks or 1)
    if model_codebooks is None or (int(model_codebooks) == 1 and k > 1):
        hint = "" if model_codebooks is None else (
            f"; an AR model takes them with its factorized head: --config.model.num_codebooks={k} "
            f"(configs/ar.py:tiny_factorized)")
        try:
            refuse_multi_index(k, what, generator)
        except ValueError as e:
            raise ValueError(f"{e}{hint}") from None
        return
    if k != int(model_codebooks):
        raise ValueError(f"{what} has {k} id(s) per token but {generator} models {int(model_codebooks)} "
                         f"(set --config.model.num_codebooks={k})")


class TokenGeneratorTask(GeneratorTaskBase):
    """The token data paths (shards or a frozen tokenizer), vocabulary checks, ``init``,
    ``constants``, ``evaluate``, ``logits`` and the spec; subclasses give ``model_class``, the loss,
    ``token_metrics`` and ``sample``."""

    model_class: Any = None
    sampler_keys: tuple[str, ...] = ()
    # A causal generator (AR): the first k tokens of a sample are a sample of k tokens.
    causal: ClassVar[bool] = False

    def __init__(self, config: Any, *, inference: bool = False):
        super().__init__(config, inference=inference)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config.model).items()}
        kwargs.pop("name", None)
        dtype = resolve_compute_dtype(config.compute_dtype)
        try:
            self.model = self.model_class(**kwargs, dtype=DTYPES[dtype])
        except TypeError as e:
            raise ValueError(f"model: {e}") from None
        self.class_dropout = float(config.generator.class_dropout)
        self.sampler = self.sampler_settings(dict(config.generator.sampler))
        self.on_the_fly = not uses_token_shards(config)
        self.batch_keys = ("image", "label") if self.on_the_fly else ("tokens", "label")
        self.tokenizer_workdir = str(config.tokenizer.workdir or "")
        self._tokenizer: Any = None
        self._decoder: Any = None
        self._decodes_prefixes = False  # the decoder's tokenizer decodes any prefix (FlexTok)
        if self.on_the_fly and not self.tokenizer_workdir and not inference:
            raise ValueError(f"data.source={config.data.source!r} is images, so the generator needs "
                             "--config.tokenizer.workdir=DIR (a tokenizer workdir), or pre-tokenized data: "
                             "--config.data.source=tokens:DIR from `titok-jax tokenize --data`")

    # ------------------------------------------------------------------ spec
    @property
    def generator_spec(self) -> GeneratorSpec:
        m = self.model
        grid = getattr(m, "grid_shape", None)
        return GeneratorSpec(num_tokens=int(m.num_tokens), codebook_size=int(m.codebook_size),
                             num_classes=int(m.num_classes), sampler=dict(self.sampler),
                             sampler_keys=tuple(self.sampler_keys),
                             mask_token_id=int(m.mask_id) if hasattr(m, "mask_id") else None,
                             num_codebooks=int(getattr(m, "num_codebooks", 1)),
                             grid_shape=tuple(int(d) for d in grid) if grid else None)

    def sampler_settings(self, settings: dict) -> dict:
        """Validated sampler settings (unknown names are an error)."""
        unknown = set(settings) - set(self.sampler_keys)
        if unknown:
            raise ValueError(f"unknown sampler settings {sorted(unknown)}; known: {sorted(self.sampler_keys)}")
        return dict(settings)

    # ------------------------------------------------------------------ the frozen tokenizer
    def tokenizer(self) -> Any:
        """The restored run (``tasks.runs.Run``) of ``config.tokenizer.workdir``, checked against
        the generator's vocabulary; loaded once."""
        if self._tokenizer is None:
            from titok_jax.tasks.runs import restore_run
            run = restore_run(self.tokenizer_workdir, kind="tokenizer", host=True)
            spec = run.task.token_spec
            self._check_vocab(spec.codebook_size, spec.num_tokens, f"tokenizer {self.tokenizer_workdir}",
                              spec.num_codebooks, spec.latent_shape)
            self._tokenizer = run
        return self._tokenizer

    def decoder(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """``ids [B, N] -> images [B, H, W, 3]`` by the tokenizer of this run (``config.tokenizer``
        or the one that wrote the token shards), or None when none is known."""
        if self._decoder is None:
            workdir = tokenizer_workdir(self.config)
            if not workdir:
                self._decoder = False
            else:
                from titok_jax.tasks.runs import restore_run
                run = restore_run(workdir, kind="tokenizer")
                fn = jax.jit(lambda p, s, t: run.task.decode(p, s, t, key=jax.random.key(0)))
                self._decoder = lambda ids: film_strips(
                    np.asarray(fn(run.params, run.model_state, jnp.asarray(ids))))
                self._decodes_prefixes = bool(run.task.token_spec.variable_length)
        return self._decoder or None

    def sample_lengths(self) -> list[int]:
        """The token counts ``1, 2, 4, ..., N`` evaluation shows a sample at: a causal generator
        whose tokenizer decodes prefixes (AR on FlexTok tokens); ``[]`` otherwise."""
        if not self.causal or self.decoder() is None or not self._decodes_prefixes:
            return []
        return prefix_lengths(self.model.num_tokens)

    def evaluate(self, model_params: Any, model_state: Any, ctx: EvalContext) -> EvalResult:
        """``evaluate_generation``; a task built for inference (``titok-jax eval``) adds the
        per-class sample grid and, where ``sample_lengths`` allows, the grid over token counts."""
        return evaluate_generation(self, model_params, ctx, pictures=self.inference,
                                   lengths=self.sample_lengths() if self.inference else ())

    def _check_vocab(self, codebook_size: Any, num_tokens: Any, what: str,
                     num_codebooks: Any = 1, latent_shape: Any = None) -> None:
        if codebook_size is None:
            raise ValueError(f"{what} is continuous (VAE); a generator needs discrete token ids")
        check_num_codebooks(num_codebooks, getattr(self.model, "num_codebooks", None), what,
                            type(self.model).__name__)
        if int(codebook_size) != self.model.codebook_size or int(num_tokens) != self.model.num_tokens:
            raise ValueError(f"{what} gives {num_tokens} tokens from {codebook_size} codes, but the generator "
                             f"is built for {self.model.num_tokens} tokens from {self.model.codebook_size} codes "
                             f"(set --config.model.num_tokens / codebook_size)")
        grid = getattr(self.model, "grid_shape", None)
        grid = tuple(int(d) for d in grid) if grid else None
        latent = tuple(int(d) for d in latent_shape) if latent_shape else None
        if grid is not None and latent is not None and grid != latent:
            raise ValueError(f"{what} gives a latent grid {latent} but the generator's grid_shape is "
                             f"{grid} (set --config.model.grid_shape)")
        if grid is not None and latent is None:
            raise ValueError(f"the generator models a video latent grid {grid} but {what} holds "
                             f"1D / image tokens (no latent_shape)")

    def check_token_data(self, meta: dict) -> None:
        self._check_vocab(meta.get("codebook_size"), meta.get("num_tokens"),
                          f"token data {self.config.data.source}", meta.get("num_codebooks", 1),
                          meta.get("latent_shape"))
        classes = int(meta.get("num_classes", 0) or 0)
        if classes > self.model.num_classes:
            raise ValueError(f"token data {self.config.data.source} has {classes} classes but the generator has "
                             f"{self.model.num_classes} (set --config.model.num_classes)")

    # ------------------------------------------------------------------ setup
    def init(self, key: jax.Array) -> tuple[dict, dict]:
        shape = getattr(self.model, "token_shape", (self.model.num_tokens,))
        variables = self.model.init({"params": key}, jnp.zeros((1, *shape), jnp.int32),
                                    jnp.zeros((1,), jnp.int32), train=False)
        return {"model": variables["params"]}, {"model": {}}

    def constants(self) -> dict:
        if not self.on_the_fly:
            from titok_jax.data.tokens import read_token_meta
            self.check_token_data(read_token_meta(str(self.config.data.source)[len(TOKENS_PREFIX):]))
            return {}
        run = self.tokenizer()
        return {"tokenizer": {"params": run.params, "state": run.model_state}}

    def batch_tokens(self, batch: dict, constants: dict) -> jax.Array:
        """The batch's token ids: the shards' ``tokens`` or the frozen tokenizer's ids of ``image``."""
        if not self.on_the_fly:
            return batch["tokens"].astype(jnp.int32)
        tok = constants["tokenizer"]
        run = self.tokenizer()
        ids = run.task.encode(tok["params"], tok["state"], batch["image"].astype(jnp.float32))
        if run.task.token_spec.is_video:   # [B, T', h, w] -> the grid flattened [B, N]
            ids = ids.reshape((ids.shape[0], -1))
        return jax.lax.stop_gradient(ids).astype(jnp.int32)

    # ------------------------------------------------------------------ evaluation and inference
    def _labels(self, labels: Any) -> jax.Array:
        labels = jnp.asarray(labels, jnp.int32)
        return jnp.where(labels < 0, self.model.num_classes, labels)

    def logits(self, model_params: Any, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        return self.model.apply({"params": model_params}, jnp.asarray(tokens, jnp.int32),
                                self._labels(labels), train=False)


def film_strips(images: np.ndarray) -> np.ndarray:
    """Decoded clips ``[B, T, H, W, 3]`` as film strips ``[B, H, T W, 3]`` (the frames side by side),
    so the image grids of evaluation show them; images ``[B, H, W, 3]`` unchanged."""
    if images.ndim != 5:
        return images
    b, t, h, w, c = images.shape
    return images.transpose(0, 2, 1, 3, 4).reshape(b, h, t * w, c)


def first_frame_keep(key: jax.Array, batch: int, num_tokens: int, frame_tokens: int, p: float
                     ) -> jax.Array:
    """Bool ``[batch, N]``: each row, with probability ``p``, True on its ``frame_tokens`` leading
    positions (the first latent frame given as the condition), else all False."""
    cond = jax.random.bernoulli(key, p, (batch,))
    return cond[:, None] & (jnp.arange(num_tokens) < frame_tokens)[None, :]


@register_task("maskgit")
class MaskGITTask(TokenGeneratorTask):
    model_class = MaskGITTransformer
    sampler_keys = SAMPLER_KEYS

    def __init__(self, config: Any, *, inference: bool = False):
        super().__init__(config, inference=inference)
        g = config.generator
        self.schedule = g.mask_schedule
        self.label_smoothing = float(g.label_smoothing)
        self.unmasked_weight = float(g.unmasked_weight)
        self.first_frame_prob = float(g.get("first_frame_prob", 0.0) or 0.0)
        if not 0.0 <= self.first_frame_prob <= 1.0:
            raise ValueError(f"generator.first_frame_prob must be in [0, 1], got {self.first_frame_prob}")
        if self.first_frame_prob > 0 and not self.model.frame_tokens:
            raise ValueError("generator.first_frame_prob > 0 needs a video generator: set "
                             "model.grid_shape to the tokenizer's latent grid (T', h, w)")

    # ------------------------------------------------------------------ training
    def loss(self, params: dict, state: dict, batch: dict, key: jax.Array, step: jax.Array,
             constants: dict) -> tuple[jax.Array, tuple[dict, dict]]:
        tokens = self.batch_tokens(batch, constants)
        k_mask, k_drop, k_dropout = jax.random.split(key, 3)
        b, n = tokens.shape
        keep = None
        if self.first_frame_prob > 0:   # video: the first latent frame given as the condition
            keep = first_frame_keep(jax.random.fold_in(k_mask, 1), b, n, self.model.frame_tokens,
                                    self.first_frame_prob)
        mask = masking.training_mask(k_mask, b, n, self.schedule, keep=keep)
        labels = masking.drop_classes(k_drop, batch["label"], self.class_dropout, self.model.num_classes)
        inputs = masking.apply_mask(tokens, mask, self.model.mask_id)
        logits = self.model.apply({"params": params["model"]}, inputs, labels, train=True,
                                  rngs={DROPOUT_RNG: k_dropout})
        loss, metrics = masking.maskgit_loss(logits, tokens, mask, self.label_smoothing, self.unmasked_weight)
        return loss, (state, dict(metrics, loss=loss, mask_ratio=jnp.mean(mask.astype(jnp.float32))))

    # ------------------------------------------------------------------ evaluation
    def token_metrics(self, model_params: Any, tokens: Any, labels: Any, seed: int = 0) -> dict:
        """Loss and accuracy on a seeded training-style mask (the same every evaluation)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        b, n = tokens.shape
        mask = masking.training_mask(jax.random.key(seed), b, n, self.schedule)
        logits = self.logits(model_params, masking.apply_mask(tokens, mask, self.model.mask_id), labels)
        loss, metrics = masking.maskgit_loss(logits, tokens, mask, self.label_smoothing, self.unmasked_weight)
        return {"loss": loss, **metrics}

    def sample(self, model_params: Any, labels: np.ndarray, seed: int, first_frame: Any = None,
               **overrides: Any) -> np.ndarray:
        """Token ids ``[B, N]`` for class ``labels`` (``num_classes`` = unconditional); a video
        generator also takes ``first_frame``: ids ``[B, h, w]`` (or ``[B, h w]``) of the first
        latent frame, kept as they are (frame prediction)."""
        kw = self.sampler_settings({**self.sampler, **overrides})
        if first_frame is not None:
            first_frame = jnp.asarray(np.asarray(first_frame).reshape(len(labels), -1), jnp.int32)
        return np.asarray(generate_tokens(self.model, {"params": model_params},
                                          jnp.asarray(labels, jnp.int32), jax.random.key(seed),
                                          first_frame=first_frame, **kw))
