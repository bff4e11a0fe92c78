"""The value types of the task contract (``tasks/base.py``): evaluation context and result, and the
token / generator specs."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluation needs from the caller: the run config, the mesh the params live on, the
    step being evaluated, ``max_images`` (0 = the whole held-out split) and the task's constants
    (already computed by the trainer, or None: the task computes them if it needs them)."""

    config: Any
    mesh: Any
    step: int = 0
    max_images: int = 0
    constants: Any = None


@dataclasses.dataclass
class EvalResult:
    """``metrics``: floats/ints for ``eval.jsonl``; ``images``: ``{name: HxWx3 uint8 grid}``, written
    by the trainer as ``samples/{name}_{step:09d}.png`` (e.g. ``reconstructions``, ``generated``)."""

    metrics: dict
    images: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """What a tokenizer's tokens are. ``codebook_size`` is None for continuous tokens (then
    ``token_dim`` is their channel count); ``num_codebooks`` is ``k`` for a multi-index quantizer
    (``fq`` factors / ``rq`` levels: ids ``[B, N, k]``, each in ``[0, codebook_size)``), else 1
    (ids ``[B, N]``); ``flow_decoder`` tokenizers decode with a sampler
    (``default_steps`` / ``default_guidance``) from noise of shape ``(B, *noise_shape)`` (NHWC;
    t = 1 is noise); ``variable_length`` ones decode any prefix; ``decoder_visible`` ones also decode
    with some patches given (``decode(..., visible=images, visible_mask=bool [B, P])``)."""

    image_size: int
    num_tokens: int
    codebook_size: int | None
    token_dim: int | None
    quantizer: str
    flow_decoder: bool = False
    variable_length: bool = False
    default_steps: int = 0
    default_guidance: float = 1.0
    noise_shape: tuple[int, ...] | None = None  # one example's initial sampler noise (flow decoders)
    decoder_visible: bool = False   # decode also takes visible patches (completion from tokens)
    num_codebooks: int = 1          # k ids per token (fq / rq): ids [B, N, k]
    # video tokenizers: the nominal clip length T (0 = an image tokenizer) and the latent grid
    # (T', h, w) of the nominal clip [T, image_size, image_size]; ids [B, T', h, w]
    num_frames: int = 0
    latent_shape: tuple[int, ...] | None = None

    @property
    def is_video(self) -> bool:
        """True for a video tokenizer (clips ``[B, T, H, W, 3]`` in, ids ``[B, T', h, w]`` out)."""
        return self.num_frames > 0

    @property
    def continuous(self) -> bool:
        return self.codebook_size is None

    @property
    def ids_shape(self) -> tuple[int, ...]:
        """One image's ids: ``(num_tokens,)`` or ``(num_tokens, num_codebooks)`` (a video
        tokenizer: one nominal clip's ``(T', h, w)``, plus ``(num_codebooks,)`` when > 1)."""
        if self.latent_shape is not None:
            return tuple(self.latent_shape) + ((self.num_codebooks,) if self.num_codebooks > 1 else ())
        return (self.num_tokens,) if self.num_codebooks == 1 else (self.num_tokens, self.num_codebooks)

    @property
    def codebook_sizes(self) -> int | tuple[int, ...] | None:
        """What codebook counters take (``evaluation.codebook``): ``codebook_size``, or one size
        per id of a multi-index token (counts ``[k, K]``, one row per factor / level)."""
        if self.codebook_size is None or self.num_codebooks == 1:
            return self.codebook_size
        return (int(self.codebook_size),) * self.num_codebooks

    @property
    def bits_per_token(self) -> float | None:
        """``num_codebooks * log2(codebook_size)``; None for continuous tokens."""
        import math
        return None if self.codebook_size is None else self.num_codebooks * math.log2(self.codebook_size)


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
    """A generator's vocabulary: ``num_tokens`` ids per image from ``codebook_size`` codes and
    ``num_classes`` classes (label ``num_classes`` = unconditional); ``sampler``: its default
    sampler settings; ``sampler_keys``: the settings ``sample`` accepts; ``mask_token_id``: the
    id of the ``[MASK]`` token ``logits`` accepts (MaskGIT), or None; ``num_codebooks``: ids per
    token (``k > 1``: an AR model's factorized head on fq / rq ids ``[B, N, k]``)."""

    num_tokens: int
    codebook_size: int
    num_classes: int
    sampler: dict
    sampler_keys: tuple[str, ...]
    mask_token_id: int | None = None
    num_codebooks: int = 1
    # a generator over a video tokenizer's latent grid (T', h, w) (ids [B, N] = the grid flattened,
    # time first); None for 1D / image tokens
    grid_shape: tuple[int, ...] | None = None
