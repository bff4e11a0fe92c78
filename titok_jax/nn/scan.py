"""A stack of ``depth`` identical layers, unrolled in Python or as one ``nn.scan``, with
rematerialisation by policy name; and the converters between the two param layouts.

A layer is a function ``layer(ctx, carry, *inputs) -> carry`` called from a compact method: it
builds its submodules with ``name=ctx.name("transformer")`` and, to rematerialise them when the
stack is unrolled, through ``ctx.module(TransformerBlock)``. ``layer_stack`` runs it ``depth``
times::

    unrolled (scan=False): carry = layer(ctx_i, carry, *inputs)  for i in 0..depth-1
                           submodules "<base>_{i}" of the caller (transformer_0, transformer_1, ...)
    scanned  (scan=True):  one submodule "layers" whose params carry a leading axis of size depth
                           (logical name "layers"): layers/<base>/... [depth, ...]

Both compute the same function: per-layer params (a TiTok token-prior bias ``token_prior_{i}``)
live inside the layer, so the scan stacks them too, and ``ctx.index`` (a Python int unrolled, a
traced int32 scanned) picks per-layer behaviour (``ctx.keep_at``: FlexTok's REPA features after one
block). ``inputs`` are the same for every layer (a mask, a time embedding); the carry is any pytree.
The scanned stack is traced once whatever the depth, so its compile time does not grow with depth.

Remat policies (``REMAT_POLICIES``; the backward pass recomputes what the policy does not save):
``"none"`` (no remat), ``"full"`` (saves nothing: ``jax.checkpoint_policies.nothing_saveable``),
``"dots"`` (saves matmul outputs without batch dimensions, i.e. the projections and MLP, not the
``[B, H, Q, K]`` attention logits: ``dots_with_no_batch_dims_saveable``), ``"dots_saveable"``
(every matmul output). Models take ``remat: bool`` and ``remat_policy: str`` (``""``: ``"full"``
when ``remat`` else ``"none"``): :func:`resolve_remat`.

Layouts: :func:`stack_layers` / :func:`unstack_layers` turn ``{"transformer_0": t0, ...}`` into
``{"layers": {"transformer": stack(t0, ...)}}`` and back (host numpy); :func:`match_layers` puts a
tree in the layout of a target tree (the importers and anything reading weights of the other
layout use it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SCAN_NAME = "layers"      # the scanned submodule and the logical name of its leading axis
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def resolve_remat(remat: bool, remat_policy: str | None = "") -> str:
    """The policy name of a model's ``remat`` / ``remat_policy`` fields: ``remat_policy`` when set,
    else ``"full"`` if ``remat`` else ``"none"``. One-line ``ValueError`` for an unknown name."""
    policy = remat_policy or ("full" if remat else "none")
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return policy


def remat(cls: Any, policy: str, **kwargs: Any) -> Any:
    """``nn.remat(cls)`` under the named policy (``cls`` itself for ``"none"``). ``"full"`` is
    ``nn.remat``'s default (save nothing)."""
    if resolve_remat(False, policy) == "none":   # also checks the name
        return cls
    return nn.remat(cls, policy=None if policy == "full" else REMAT_POLICIES[policy], **kwargs)


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What a layer function is told: its ``index`` (int unrolled, traced int32 scanned), whether
    it is ``scanned`` and the remat ``policy`` of the stack."""

    index: Any
    scanned: bool
    policy: str = "none"

    def name(self, base: str) -> str:
        """A submodule's name: ``base`` inside the scan, ``f"{base}_{index}"`` unrolled."""
        return base if self.scanned else f"{base}_{self.index}"

    def module(self, cls: Any, **remat_kwargs: Any) -> Any:
        """``cls`` rematerialised by the policy when unrolled (the scan remats the whole layer);
        ``remat_kwargs`` go to ``nn.remat`` (``static_argnums`` counting ``self`` as 0)."""
        return cls if self.scanned else remat(cls, self.policy, **remat_kwargs)

    def keep_at(self, index: int, value: Any, kept: Any) -> Any:
        """``value`` at layer ``index``, else ``kept`` (a carried per-layer output)."""
        if not self.scanned:
            return value if self.index == index else kept
        return jax.tree.map(lambda v, k: jnp.where(self.index == index, v, k), value, kept)


class _ScannedLayer(nn.Module):
    """One layer as a scan body: ``(carry, index, inputs) -> (carry, None)``."""

    layer: Callable[..., Any]
    policy: str = "none"

    @nn.compact
    def __call__(self, carry: Any, index: jax.Array, inputs: tuple) -> tuple[Any, None]:
        return self.layer(LayerContext(index, True, self.policy), carry, *inputs), None


def layer_stack(layer: Callable[..., Any], carry: Any, *inputs: Any, depth: int, scan: bool = False,
                remat_policy: str = "none", name: str = SCAN_NAME) -> Any:
    """Run ``layer(ctx, carry, *inputs) -> carry`` ``depth`` times from a compact method (module
    docstring): unrolled (submodules ``<base>_{i}``) or scanned (one submodule ``name`` with
    stacked params, leading logical axis ``"layers"``), rematerialised by ``remat_policy``.
    Static settings go into ``layer`` (``functools.partial``); ``inputs`` are pytrees of arrays
    shared by every layer."""
    policy = resolve_remat(False, remat_policy)
    if not scan:
        for i in range(depth):
            carry = layer(LayerContext(i, False, policy), carry, *inputs)
        return carry
    if depth == 0:
        return carry
    body = remat(_ScannedLayer, policy, prevent_cse=False)
    scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast), length=depth,
                      metadata_params={nn.PARTITION_NAME: SCAN_NAME})
    carry, _ = scanned(layer, policy, name=name)(carry, jnp.arange(depth, dtype=jnp.int32), inputs)
    return carry


# ----------------------------------------------------------------------------- layouts
def _leading(tree: Any) -> int:
    return int(np.shape(jax.tree.leaves(tree)[0])[0])


def stack_layers(node: Mapping[str, Any], bases: Any, depth: int, name: str = SCAN_NAME) -> dict:
    """``{f"{b}_{i}": t_bi}`` (``b`` in ``bases``, ``i < depth``) -> ``{name: {b: stack_i t_bi}}``
    (``np.stack`` of every leaf along a new axis 0); other keys are kept. ``KeyError`` for a
    missing layer."""
    out = dict(node)
    stacked = {}
    for b in bases:
        layers = [out.pop(f"{b}_{i}") for i in range(depth)]
        stacked[b] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
    out[name] = stacked
    return out


def unstack_layers(node: Mapping[str, Any], name: str = SCAN_NAME) -> dict:
    """The inverse of :func:`stack_layers`: ``{name: {b: t_b [L, ...]}}`` -> ``{f"{b}_{i}": t_b[i]}``."""
    out = {k: v for k, v in node.items() if k != name}
    for b, sub in node[name].items():
        for i in range(_leading(sub)):
            key = f"{b}_{i}"
            if key in out:
                raise ValueError(f"unstacking {name}/{b}: {key!r} exists already")
            out[key] = jax.tree.map(lambda x: np.asarray(x)[i], sub)
    return out


def match_layers(tree: Any, like: Any, name: str = SCAN_NAME) -> Any:
    """``tree`` (nested dicts of arrays) in the layer layout of ``like`` (the target model's params,
    arrays or ``jax.ShapeDtypeStruct`` s): where ``like`` has a ``name`` node that ``tree`` holds
    unrolled (``<base>_{i}``), those are stacked; where ``tree`` has a ``name`` node that ``like``
    holds unrolled, it is unstacked. Anything else is returned as it is (a tree of another model
    still fails the usual shape check, naming a path)."""
    if not isinstance(tree, Mapping) or not isinstance(like, Mapping):
        return tree
    node = dict(tree)
    if isinstance(like.get(name), Mapping) and name not in node:
        bases, depth = list(like[name]), _leading(like[name])
        if all(f"{b}_{i}" in node for b in bases for i in range(depth)):
            node = stack_layers(node, bases, depth, name)
    elif isinstance(node.get(name), Mapping) and name not in like:
        bases = list(node[name])
        if any(f"{b}_0" in like for b in bases):
            node = unstack_layers(node, name)
    return {k: (v if k == name else match_layers(v, like.get(k), name)) for k, v in node.items()}
