"""Optimizers from the config: AdamW with linear warmup and cosine (or step) decay, a weight-decay
mask by parameter name, global-norm clipping, frozen parameters, one optimizer per parameter group
(``model``, ``disc``, ...), and the EMA of the model parameters.

Config (``config.optimizer``; a group ``G`` other than ``model`` reads ``config.optimizers.G`` and falls
back to the model's values):
  lr, end_lr, warmup_steps, b1, b2, eps, weight_decay, grad_clip (0 = off),
  schedule ("cosine", the default: warmup + cosine decay to end_lr; or "step": warmup, then lr times
  decay_factor at each train step of the increasing list decay_steps; :func:`schedule`),
  no_decay (regex on the '/'-joined parameter path; plus every parameter with ndim < 2),
  fix_norms (regex; matching weights (ndim >= 2) are rescaled to their initial Frobenius norm
  after every update, FlowMo's weight normalisation),
  where "ndim" and "norm" are per layer for the stacked params of a scanned stack (a path through
  the ``nn.scan`` submodule ``layers``, leading layer axis; ``layer_ndim``),
  frozen (regex; matching parameters get no update at all; with frozen_from_step = N > 0 they train
  for the first N updates and are frozen from then on), ema_decay (0 = no EMA).
Values that cannot train (a negative or non-finite rate, betas outside [0, 1), a negative step
count, a regex that does not compile) are a one-line ``ConfigError`` naming the key
(:func:`check_group_config`), raised when the optimizer is built, before the run starts.

The ``disc`` group starts at ``config.losses.gan_start_step`` (the step from which the task gives
the discriminator a gradient): before it the group gets no update and its optimizer state does not
move (Adam's moments and count stay at their initial values), and its schedule counts from it (warmup
from ``gan_start_step``, cosine decay to ``end_lr`` at ``total_steps``; a step schedule's boundaries
stay train steps), so its first update is a fresh optimizer's first update.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from titok_jax.errors import ConfigError
from titok_jax.nn.scan import SCAN_NAME

# Norm scales/biases, biases, embeddings, position tables, latent and mask tokens, codebooks.
DEFAULT_NO_DECAY = (r"(^|/)(bias|scale)$|norm|ln_|embed|posemb|pos_emb|position|latent_tokens|"
                    r"mask_token|class_token|cls|codebook")
# config.optimizer.schedule: warmup + cosine decay (the default), or warmup + step decay (schedule())
SCHEDULES = ("cosine", "step")


def path_keys(path: tuple) -> tuple[str, ...]:
    """The key names of a pytree key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return tuple(parts)


def path_str(path: tuple) -> str:
    """'/'-joined key path of a pytree leaf."""
    return "/".join(path_keys(path))


def is_stacked(path: tuple) -> bool:
    """Whether a param sits in a scanned layer stack (``nn.scan.layer_stack``: its leading axis
    is the layer)."""
    return SCAN_NAME in path_keys(path)


def layer_ndim(path: tuple, x: Any) -> int:
    """The rank of one layer's slice of a param: ``ndim`` less the layer axis of a stacked one."""
    return int(jnp.ndim(x)) - (1 if is_stacked(path) else 0)


def decay_mask(params: Any, no_decay: str = DEFAULT_NO_DECAY) -> Any:
    """True where weight decay applies: ndim >= 2 per layer and the path does not match
    ``no_decay``."""
    pattern = re.compile(no_decay) if no_decay else None
    return jax.tree_util.tree_map_with_path(
        lambda path, x: bool(layer_ndim(path, x) >= 2
                             and not (pattern and pattern.search(path_str(path)))),
        params)


def schedule(cfg: Mapping[str, Any], total_steps: int, start: int = 0) -> optax.Schedule:
    """A group's learning rate as a function of its own update count ``t`` (the group's first
    update, at train step ``start``, is ``t = 0``), by ``cfg["schedule"]`` (:data:`SCHEDULES`):

    - ``"cosine"`` (the default): linear warmup 0 -> lr over ``warmup_steps``, then cosine decay
      to ``end_lr`` at ``t = total_steps``;
    - ``"step"``: linear warmup 0 -> lr over ``warmup_steps``, then
      ``lr * decay_factor ** #{b in decay_steps: start + t >= b}`` (``end_lr`` unused). The
      boundaries are train steps, so every group drops at the same step whatever its start;
      Open-MAGVIT2's ``lr_drop_epoch`` (x0.1 once the listed epochs have ended, for the model and
      the discriminator alike) is ``decay_steps = [epoch * steps_per_epoch, ...]``.

    An unknown name is a ``ConfigError`` (a ``ValueError``)."""
    kind = str(cfg.get("schedule", "cosine") or "cosine")
    lr, warmup = float(cfg["lr"]), int(cfg.get("warmup_steps", 0))
    if kind == "cosine":
        decay_steps = max(int(total_steps), warmup + 1)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps,
                                                  float(cfg.get("end_lr", 0.0)))
    if kind == "step":
        # boundaries on the group's own count t
        boundaries = [int(b) - int(start) for b in (cfg.get("decay_steps") or ())]
        factor = float(cfg.get("decay_factor", 0.1))

        def step_schedule(t):
            t = jnp.asarray(t)
            ramp = jnp.minimum(1.0, t.astype(jnp.float32) / warmup) if warmup > 0 else 1.0
            drops = sum((t >= b).astype(jnp.int32) for b in boundaries)
            return lr * ramp * jnp.float32(factor) ** drops
        return step_schedule
    raise ConfigError(f"unknown learning-rate schedule {kind!r}; expected one of {SCHEDULES}")


def fix_initial_norms(pattern: str) -> optax.GradientTransformation:
    """After each update, rescale every parameter matching ``pattern`` (path regex, ndim >= 2) to
    its Frobenius norm at initialisation: ``p_new <- p_new * |p_0| / |p_new|`` (FlowMo's
    ``fix_initial_norms`` with ``fix_norm_mode: l2``, EDM2-style). Chain it last: it turns the
    update into ``rescaled(p + u) - p``. A stacked param of a scanned stack keeps each layer's norm
    (the same update as the unrolled blocks). State: the initial norms (a float32 scalar per leaf,
    ``[layers]`` for a stacked one)."""
    rx = re.compile(pattern)

    def matched(path, x) -> bool:
        return layer_ndim(path, x) >= 2 and bool(rx.search(path_str(path)))

    def norm(path, x) -> jax.Array:
        axes = tuple(range(1, x.ndim)) if is_stacked(path) else None
        return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes))

    def init(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: norm(path, x) if matched(path, x) else jnp.zeros((), jnp.float32),
            params)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("fix_initial_norms needs the params")

        def fix(path, u, p, n):
            if not matched(path, p):
                return u
            new = p.astype(jnp.float32) + u.astype(jnp.float32)
            scale = n / jnp.maximum(norm(path, new), 1e-12)
            scale = jnp.reshape(scale, scale.shape + (1,) * (new.ndim - scale.ndim))
            return (new * scale - p.astype(jnp.float32)).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(fix, updates, params, state), state

    return optax.GradientTransformation(init, update)


class StartAtState(NamedTuple):
    seen: jax.Array  # updates seen, saturating at the start step (int32)
    inner: Any


def start_at(inner: optax.GradientTransformation, start_step: int) -> optax.GradientTransformation:
    """``inner`` from update number ``start_step`` on (0-based, one update per train step); before it
    the update is zero and ``inner``'s state is left as it is, so ``inner`` runs as if it were created
    at ``start_step`` (its step count, and a schedule driven by it, count from there). Only the chosen
    branch runs (``lax.cond``)."""
    start = int(start_step)
    if start <= 0:
        return inner

    def init(params):
        return StartAtState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        def hold(_):
            return jax.tree.map(jnp.zeros_like, updates), state.inner

        def run(_):
            new, inner_state = inner.update(updates, state.inner, params)
            return jax.tree.map(lambda n, u: n.astype(u.dtype), new, updates), inner_state

        new, inner_state = jax.lax.cond(state.seen >= start, run, hold, None)
        return new, StartAtState(jnp.minimum(state.seen + 1, start), inner_state)

    return optax.GradientTransformation(init, update)


def group_start(config: Any, group: str) -> int:
    """The step from which a group trains: ``losses.gan_start_step`` for ``disc``, else 0."""
    return max(int(config.losses.gan_start_step), 0) if group == "disc" else 0


def _group_optimizer(cfg: Mapping[str, Any], total_steps: int,
                     start: int = 0) -> optax.GradientTransformation:
    """One group's optimizer (``start``: the train step of its first update). Masks and labels are
    functions of the params they are given, since ``multi_transform`` hands each group the whole tree with the other groups masked out."""
    parts = []
    if float(cfg.get("grad_clip", 0.0)) > 0:
        parts.append(optax.clip_by_global_norm(float(cfg["grad_clip"])))
    no_decay = cfg.get("no_decay") or DEFAULT_NO_DECAY
    parts.append(optax.adamw(schedule(cfg, total_steps, start), b1=float(cfg.get("b1", 0.9)),
                             b2=float(cfg.get("b2", 0.999)), eps=float(cfg.get("eps", 1e-8)),
                             weight_decay=float(cfg.get("weight_decay", 0.0)),
                             mask=lambda p: decay_mask(p, no_decay)))
    if cfg.get("fix_norms", ""):
        parts.append(fix_initial_norms(str(cfg["fix_norms"])))
    tx = optax.chain(*parts)
    frozen = cfg.get("frozen", "")
    frozen_from = int(cfg.get("frozen_from_step", 0) or 0)
    if frozen and frozen_from > 0:
        # Trained like the rest for the first `frozen_from_step` updates, then no update at all.
        pattern = re.compile(frozen)
        mask = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: bool(pattern.search(path_str(path))), p)
        off = optax.scale_by_schedule(lambda n: (n < frozen_from).astype(jnp.float32))
        return optax.chain(tx, optax.masked(off, mask))
    if frozen:
        pattern = re.compile(frozen)
        labels = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: "frozen" if pattern.search(path_str(path)) else "train", p)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def group_config(config: Any, group: str) -> dict:
    """The optimizer settings of a parameter group (``model`` reads ``config.optimizer``)."""
    base = dict(config.optimizer)
    if group != "model":
        extra = config.get("optimizers", {}) or {}
        base.update(dict(extra.get(group, {})))
    return base


def config_key(config: Any, group: str, key: str) -> str:
    """The dotted config key a group's setting comes from: ``optimizers.G.key`` when the group
    sets it itself, else ``optimizer.key``."""
    if group != "model":
        own = (config.get("optimizers", {}) or {}).get(group, {}) or {}
        if key in own:
            return f"optimizers.{group}.{key}"
    return f"optimizer.{key}"


# (key, what it is, lowest, highest, whether the highest is allowed): rates, decays and clips that
# must be finite numbers in [lowest, highest]; None = unbounded. eps > 0: Adam divides by it where
# a parameter has no gradient yet.
_NUMBERS = (("lr", "the learning rate", 0.0, None, False),
            ("end_lr", "the final learning rate", 0.0, None, False),
            ("weight_decay", "the weight decay", 0.0, None, False),
            ("grad_clip", "the gradient-norm clip (0 = off)", 0.0, None, False),
            ("b1", "Adam's b1", 0.0, 1.0, False),
            ("b2", "Adam's b2", 0.0, 1.0, False),
            ("ema_decay", "the EMA decay (0 = no EMA)", 0.0, 1.0, True))
_COUNTS = (("warmup_steps", "the warm-up length in steps"),
           ("frozen_from_step", "the step from which `frozen` applies (0 = always)"))
_REGEXES = ("no_decay", "frozen", "fix_norms")


def check_group_config(cfg: Mapping[str, Any], key: Callable[[str], str]) -> None:
    """A one-line ``ConfigError`` for a setting of one group's optimizer (``cfg``, as
    :func:`group_config` gives it) that cannot train; ``key(name)`` is the dotted config key the
    message names. ``lr`` must be given; the other settings are checked when present."""
    if cfg.get("lr") is None:
        raise ConfigError(f"config {key('lr')} is missing: the learning rate must be given")
    for name, what, low, high, high_ok in _NUMBERS:
        value = cfg.get(name)
        if value is None:
            continue
        fine = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        fine = fine and value >= low and (high is None or value < high or (high_ok and value == high))
        if not fine:
            bound = (f">= {low:g}" if high is None
                     else f"in [{low:g}, {high:g}{']' if high_ok else ')'}")
            raise ConfigError(f"config {key(name)} = {value!r}: {what} must be a finite number {bound}")
    eps = cfg.get("eps")
    if eps is not None and not (isinstance(eps, numbers.Real) and not isinstance(eps, bool)
                                and math.isfinite(eps) and eps > 0):
        raise ConfigError(f"config {key('eps')} = {eps!r}: Adam's eps must be a finite number > 0 "
                          "(it divides by it)")
    for name, what in _COUNTS:
        value = cfg.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                  or value < 0):
            raise ConfigError(f"config {key(name)} = {value!r}: {what} must be an integer >= 0")
    kind = cfg.get("schedule") or "cosine"
    if kind not in SCHEDULES:
        raise ConfigError(f"config {key('schedule')} = {kind!r}: unknown learning-rate schedule; "
                          f"expected one of {SCHEDULES}")
    steps = cfg.get("decay_steps")
    if steps is not None:
        fine = (isinstance(steps, (list, tuple))
                and all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= 0
                        for b in steps)
                and all(a < b for a, b in zip(steps, steps[1:])))
        if not fine:
            raise ConfigError(f"config {key('decay_steps')} = {steps!r}: the step schedule's "
                              "boundaries must be increasing integers >= 0 (train steps)")
    factor = cfg.get("decay_factor")
    if factor is not None and not (isinstance(factor, numbers.Real) and not isinstance(factor, bool)
                                   and math.isfinite(factor) and factor > 0):
        raise ConfigError(f"config {key('decay_factor')} = {factor!r}: the step schedule's factor "
                          "must be a finite number > 0")
    for name in _REGEXES:
        value = cfg.get(name)
        if not value:
            continue
        try:
            re.compile(str(value))
        except re.error as e:
            raise ConfigError(f"config {key(name)} = {value!r} is not a regular expression: {e}") from None


def make_optimizer(config: Any, params: Mapping[str, Any]) -> optax.GradientTransformation:
    """One optimizer per top-level group of ``params`` (``{'model': ..., 'disc': ...}``); every
    group's settings are checked first (:func:`check_group_config`)."""
    total = int(config.total_steps)
    for g in params:
        check_group_config(group_config(config, g), lambda name, g=g: config_key(config, g, name))
    transforms = {}
    for g in params:
        start = group_start(config, g)
        transforms[g] = start_at(_group_optimizer(group_config(config, g), total - start, start),
                                 start)
    labels = {g: jax.tree.map(lambda _, g=g: g, p) for g, p in params.items()}
    return optax.multi_transform(transforms, labels)


def learning_rates(config: Any, step: jax.Array, groups: Any) -> dict[str, jax.Array]:
    """The scheduled learning rate of each group at ``step`` (for logging): 0 before the group's
    start step, then its schedule counted from the start (see ``start_at``)."""
    out = {}
    for g in groups:
        start = group_start(config, g)
        lr = schedule(group_config(config, g), int(config.total_steps) - start, start)(step - start)
        out[f"lr/{g}"] = jnp.where(jnp.asarray(step) >= start, lr, 0.0) if start > 0 else lr
    return out


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """``ema <- d ema + (1 - d) params`` with the warmed-up ``d = min(decay, (1 + t) / (10 + t))``."""
    t = step.astype(jnp.float32)
    d = jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
