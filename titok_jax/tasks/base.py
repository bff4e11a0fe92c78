"""The task contract and its registry.

A task is the whole life cycle of one family, and the only thing the trainer, ``eval``, the
inference API and the generation tools know about it:

==================  ===========================================================================
``init(key)``       ``(params: {group: tree}, model_state: tree)``; trees may be logically boxed.
                    ``params["model"]`` is what inference uses (and the EMA follows).
``constants()``     frozen arrays every step receives (LPIPS weights, a teacher...), or ``{}``.
``loss(...)``       ``loss(params, model_state, batch, key, step, constants)
                    -> (scalar, (new model_state, metrics))``: ONE scalar whose gradient with
                    respect to each parameter group is that group's update direction (a GAN
                    adds the discriminator's loss with the generator's outputs stop-gradiented
                    and the discriminator's params stop-gradiented in the generator's term). The
                    trainer takes the gradient (``train.step.build_step``). ``metrics["loss"]``
                    is the number logged as the loss.
``batch_keys``      the batch entries the step needs (``("image",)``, ``("tokens", "label")``).
``evaluate(...)``   ``evaluate(model_params, model_state, ctx: EvalContext) -> EvalResult``:
                    held-out metrics and named image grids (the trainer writes both).
==================  ===========================================================================

Inference, by kind:

- tokenizers (``TokenizerTaskBase``): ``token_spec`` (a ``TokenSpec``), ``encode``, ``decode``,
  ``features`` and ``reconstruct`` (pure, jit-able functions of ``(model_params, model_state,
  ...)``);
- generators (``GeneratorTaskBase``): ``generator_spec`` (a ``GeneratorSpec``), ``sample`` and
  ``logits``.

Every task is built as ``TASKS[name](config, inference=...)``; with ``inference=True`` a task reads
no training-only file (teachers, VAE weights, LPIPS, ``init_from``): loading a run for inference
needs only its workdir. Registration refuses a class that does not implement the contract.
"""
from __future__ import annotations

import abc
import inspect
from typing import Any, Callable, ClassVar

import jax
import numpy as np

from titok_jax.tasks.eval_generation import evaluate_generation
from titok_jax.tasks.eval_reconstruction import evaluate_reconstruction
from titok_jax.tasks.types import EvalContext, EvalResult, GeneratorSpec, TokenSpec

TASKS: dict[str, type["Task"]] = {}
__all__ = ["TASKS", "Task", "TokenizerTaskBase", "GeneratorTaskBase", "EvalContext", "EvalResult",
           "TokenSpec", "GeneratorSpec", "register_task", "get_task"]


class Task(abc.ABC):
    """The contract (module docstring). Subclasses set ``kind`` and implement the abstract methods."""

    kind: ClassVar[str] = ""
    # A run of this task that cannot be loaded for inference says why (e.g. TiTok stage 1).
    inference_refusal: ClassVar[str | None] = None
    batch_keys: tuple[str, ...] = ("image",)

    def __init__(self, config: Any, *, inference: bool = False):
        self.config = config
        self.inference = bool(inference)

    @abc.abstractmethod
    def init(self, key: jax.Array) -> tuple[Any, Any]:
        ...

    def constants(self) -> Any:
        return {}

    @abc.abstractmethod
    def loss(self, params: Any, model_state: Any, batch: Any, key: jax.Array, step: jax.Array,
             constants: Any) -> tuple[jax.Array, tuple[Any, dict]]:
        ...

    @abc.abstractmethod
    def evaluate(self, model_params: Any, model_state: Any, ctx: EvalContext) -> EvalResult:
        ...


class TokenizerTaskBase(Task):
    """Images in, tokens out, images back. ``encode`` gives int32 ids ``[B, N]`` (``[B, N, k]``
    for the ``token_spec.num_codebooks = k`` ids per token of a multi-index quantizer, fq / rq;
    continuous tokenizers: float32 codes ``[B, N, C]``); ``decode`` takes them back to float32 images in [0, 1]
    (``key`` / ``steps`` / ``guidance`` for flow decoders); ``features`` the continuous codes
    ``[B, N, C]`` the decoder reads; ``reconstruct`` what evaluation scores."""

    kind: ClassVar[str] = "tokenizer"

    @property
    @abc.abstractmethod
    def token_spec(self) -> TokenSpec:
        ...

    @abc.abstractmethod
    def encode(self, model_params: Any, model_state: Any, images: jax.Array) -> jax.Array:
        ...

    @abc.abstractmethod
    def decode(self, model_params: Any, model_state: Any, tokens: jax.Array, *,
               key: jax.Array | None = None, steps: int | None = None,
               guidance: float | None = None, noise: jax.Array | None = None) -> jax.Array:
        """Tokens -> images in [0, 1]; flow decoders sample from ``noise`` (``(B, *noise_shape)``)
        or from noise drawn with ``key``; deterministic decoders refuse ``steps``/``guidance``/
        ``noise``."""

    @abc.abstractmethod
    def features(self, model_params: Any, model_state: Any, images: jax.Array) -> jax.Array:
        ...

    @abc.abstractmethod
    def reconstruct(self, model_params: Any, model_state: Any, images: jax.Array
                    ) -> tuple[jax.Array, Any]:
        """``(reconstructions [B, H, W, 3] in [0, 1], token ids or None)`` (deterministic)."""

    def evaluate(self, model_params: Any, model_state: Any, ctx: EvalContext) -> EvalResult:
        return evaluate_reconstruction(self, model_params, model_state, ctx)


class GeneratorTaskBase(Task):
    """Tokens in, tokens out: ``sample(model_params, labels, seed, **sampler) -> ids [B, n]`` and
    ``logits(model_params, tokens, labels) -> [B, N, K]`` (the training-mode forward, no dropout)."""

    kind: ClassVar[str] = "generator"

    @property
    @abc.abstractmethod
    def generator_spec(self) -> GeneratorSpec:
        ...

    @abc.abstractmethod
    def sample(self, model_params: Any, labels: np.ndarray, seed: int, **sampler: Any) -> np.ndarray:
        ...

    @abc.abstractmethod
    def logits(self, model_params: Any, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        ...

    @abc.abstractmethod
    def token_metrics(self, model_params: Any, tokens: Any, labels: Any) -> dict:
        """Held-out metrics of the model on ``tokens [B, N]`` / ``labels [B]`` (deterministic)."""

    def decoder(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """``ids -> images`` for the sample grid of ``evaluate``, or None (no grid)."""
        return None

    def evaluate(self, model_params: Any, model_state: Any, ctx: EvalContext) -> EvalResult:
        return evaluate_generation(self, model_params, ctx)


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: ``TASKS[name] = cls``, refusing anything that does not implement the
    contract (not a ``Task`` of a known kind, or abstract methods left)."""

    def deco(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, (TokenizerTaskBase, GeneratorTaskBase))):
            raise TypeError(f"task {name!r}: {cls!r} must subclass TokenizerTaskBase or GeneratorTaskBase")
        if inspect.isabstract(cls):
            missing = sorted(getattr(cls, "__abstractmethods__", ()))
            raise TypeError(f"task {name!r}: {cls.__name__} does not implement {', '.join(missing)}")
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is registered twice ({TASKS[name].__name__}, {cls.__name__})")
        cls.task_name = name
        TASKS[name] = cls
        return cls

    return deco


def get_task(config: Any, *, inference: bool = False) -> Task:
    """``TASKS[config.task.name](config, inference=inference)``; an unknown name is a ValueError."""
    task_section = config.get("task", None) or {}
    name = task_section.get("name") if hasattr(task_section, "get") else None
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](config, inference=inference)
