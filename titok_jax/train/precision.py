"""Gradients summed in float32 when the model computes in bfloat16.

With params in float32 and a bfloat16 compute dtype, a weight gradient is a sum over the batch,
``dW = sum_b x_b^T dy_b``, computed by a bfloat16 ``dot_general`` (or convolution, or ``reduce_sum``
for a bias or a norm scale) and only cast to float32 where it meets the float32 param. Under the
SPMD partitioner the batch is split over devices, so the cross-device part of that sum (the
all-reduce / reduce-scatter inserted right after the op) runs in the op's output dtype: bfloat16.
Even on one device a bias's gradient summed over ``B x H x W`` positions in bfloat16 is mostly
rounding error.

``float32_reductions(fn)`` traces ``fn`` - the backward pass: ``loss_grads`` passes the VJP
function, so the forward pass is not touched - to a jaxpr and rewrites every summing op whose
low-precision result is cast up to float32 downstream (a weight, bias or norm-scale gradient on
its way to its float32 param; found by a backward pass over the jaxpr, ``_wanted``):
``dot_general`` and ``conv_general_dilated`` get ``preferred_element_type=float32`` (bfloat16
operands, float32 accumulation and result, what the matrix units do anyway) and ``reduce_sum``
sums a float32 copy of its operand. The partitioner then places the cross-device sums on float32
values. The float32 result keeps going - through layout, slicing and adding ops (``_PASS_THROUGH``:
transposes, reshapes, broadcasts, pads, ``add_any`` of cotangent contributions) - to where the
program casts up, which takes it instead, so the gradient reaches the param unrounded; the rounded bfloat16 value is still
computed for any other use (else XLA drops it). Activation gradients and every other op keep their
dtypes. Sub-jaxprs (``scan``, ``while``, ``cond``, ``remat``, nested ``jit``) are rewritten
too. A float32 model has nothing to rewrite: its jaxpr runs as traced, the same program."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

LOW_PRECISION = (np.dtype(jnp.bfloat16), np.dtype(np.float16))
_ACCUMULATING = (prims.dot_general_p, prims.conv_general_dilated_p)
# Ops that move, pick or add values without a dtype of their own: a wanted result is computed on
# the float32 twins of its inputs as well (``_rewrite_jaxpr``). ``add_any`` sums cotangent
# contributions; ``broadcast_in_dim`` / ``pad`` / ``slice`` are how transposed broadcasts and
# slices of params reach them.
_PASS_THROUGH = (prims.transpose_p, prims.reshape_p, prims.squeeze_p, prims.copy_p,
                 prims.broadcast_in_dim_p, prims.add_jaxvals_p, prims.pad_p, prims.concatenate_p,
                 prims.slice_p, prims.dynamic_slice_p, prims.dynamic_update_slice_p, prims.select_n_p,
                 prims.rev_p, prims.add_p, prims.sub_p, prims.neg_p)


def _is_low(aval: Any) -> bool:
    return getattr(aval, "dtype", None) in LOW_PRECISION


def _var(v: Any) -> bool:
    return isinstance(v, jcore.Var) and not isinstance(v, jcore.DropVar)


def _sub_jaxprs(params: dict) -> list[tuple[str, int | None, Any]]:
    """``(param name, index in a tuple or None, Jaxpr or ClosedJaxpr)`` of an eqn's sub-jaxprs."""
    out = []
    for key, value in params.items():
        if isinstance(value, tuple):
            out += [(key, i, v) for i, v in enumerate(value)
                    if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr))]
        elif isinstance(value, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            out.append((key, None, value))
    return out


def _open(j: Any) -> Any:
    return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def _wanted(jaxpr: Any, dtype: np.dtype, out_wanted: list[bool]) -> dict:
    """Low-precision variables of ``jaxpr`` to compute in ``dtype``: ``{var: direct}``. A value is
    wanted when it is cast up to ``dtype`` downstream, directly or through ``_PASS_THROUGH`` ops
    (``direct``), or summed by a ``reduce_sum`` that is wanted (not ``direct``: a
    dot feeding it stays as it is, only sums feeding sums are widened - the rounding of each
    element is harmless, the bfloat16 accumulation is not); or where ``out_wanted`` says the
    caller casts an output up. A sub-jaxpr whose inputs match its eqn's one to one (``jit``,
    ``remat``, ``scan``, custom rules) passes its wanted inputs out; the others (``while``,
    ``cond``) are only rewritten on their own."""
    wanted: dict = {v: True for v, w in zip(jaxpr.outvars, out_wanted)
                    if w and _var(v) and _is_low(v.aval)}

    def want(v, direct):
        if _var(v) and _is_low(v.aval):
            wanted[v] = wanted.get(v, False) or direct

    for eqn in reversed(jaxpr.eqns):
        prim, outs = eqn.primitive, eqn.outvars
        hit = [wanted[o] for o in outs if _var(o) and o in wanted]
        if prim is prims.convert_element_type_p:
            if outs[0].aval.dtype == dtype:
                want(eqn.invars[0], True)
        elif prim in _PASS_THROUGH:
            if hit:
                for v in eqn.invars:
                    want(v, any(hit))
        elif prim is prims.reduce_sum_p:
            if hit:
                want(eqn.invars[0], False)
        else:
            subs = _sub_jaxprs(eqn.params)
            if len(subs) == 1 and len(_open(subs[0][2]).invars) == len(eqn.invars) \
                    and len(_open(subs[0][2]).outvars) == len(outs):
                inner = _open(subs[0][2])
                inner_wanted = _wanted(inner, dtype, [_var(o) and o in wanted for o in outs])
                for v, iv in zip(eqn.invars, inner.invars):
                    if iv in inner_wanted:
                        want(v, inner_wanted[iv])
    return wanted


def _convert_eqn(src: Any, dst: Any, eqn: Any) -> Any:
    params = dict(new_dtype=dst.aval.dtype, weak_type=bool(getattr(dst.aval, "weak_type", False)),
                  sharding=None)
    return jcore.new_jaxpr_eqn([src], [dst], prims.convert_element_type_p, params,
                               jcore.no_effects, eqn.source_info, eqn.ctx)


def _rewrite_jaxpr(jaxpr: Any, dtype: np.dtype, upcast: bool = False,
                   out_wanted: list[bool] | None = None) -> tuple[Any, bool]:
    """``jaxpr`` with its wanted (``_wanted``) low-precision summing ops accumulating in
    ``dtype``, and whether anything changed; every existing variable keeps its type.

    Each rewritten result gets a wide twin; ``_PASS_THROUGH`` ops of twinned inputs are repeated
    on the twins, and a cast of a twinned value up to ``dtype`` becomes the twin.
    ``upcast``: a dot or convolution casts its operands to ``dtype`` instead of asking for a
    ``dtype`` result from low-precision operands (the CPU runtime has no bf16 x bf16 -> f32 dot;
    it computes bf16 dots in float32 anyway). ``out_wanted``: which outputs the caller casts up."""
    out_wanted = out_wanted or [False] * len(jaxpr.outvars)
    wanted = _wanted(jaxpr, dtype, out_wanted)
    eqns, changed = [], False
    twin: dict = {}     # low-precision var -> its value in `dtype` (before rounding)
    rename: dict = {}   # var -> the var that replaces it

    def sub(v):
        return rename.get(v, v) if isinstance(v, jcore.Var) else v

    def twin_of(v):
        return twin.get(v) if isinstance(v, jcore.Var) else None

    def wide_var(v):
        return jcore.Var(v.aval.update(dtype=dtype, weak_type=False))

    for eqn in jaxpr.eqns:
        if any(isinstance(v, jcore.Var) and v in rename for v in eqn.invars):
            eqn = eqn.replace(invars=[sub(v) for v in eqn.invars])
        subs = _sub_jaxprs(eqn.params)
        if subs:
            flags = [_var(o) and o in wanted for o in eqn.outvars]
            params, sub_changed = dict(eqn.params), False
            for key, index, j in subs:
                inner = _open(j)
                match = len(inner.outvars) == len(eqn.outvars)
                new, c = _rewrite_jaxpr(inner, dtype, upcast, flags if match else None)
                if c:
                    new = jcore.ClosedJaxpr(new, j.consts) if isinstance(j, jcore.ClosedJaxpr) else new
                    if index is None:
                        params[key] = new
                    else:
                        params[key] = params[key][:index] + (new,) + params[key][index + 1:]
                    sub_changed = True
            if sub_changed:
                eqn, changed = eqn.replace(params=params), True
        prim, outs = eqn.primitive, eqn.outvars
        out = outs[0] if len(outs) == 1 and _var(outs[0]) else None
        if out is None:
            eqns.append(eqn)
            continue
        x = eqn.invars[0] if eqn.invars else None
        if prim is prims.convert_element_type_p and out.aval.dtype == dtype and twin_of(x) is not None:
            rename[out] = twin_of(x)                    # a cast up of a rewritten value: its twin
            changed = True
            continue
        if out not in wanted:
            eqns.append(eqn)
            continue
        wide = wide_var(out)
        if prim in _ACCUMULATING and wanted[out]:
            ins = list(eqn.invars)
            if upcast:
                for i, v in enumerate(ins):
                    if _is_low(v.aval):
                        ins[i] = wide_var(v)
                        eqns.append(_convert_eqn(v, ins[i], eqn))
            eqns.append(eqn.replace(invars=ins, outvars=[wide],
                                    params=dict(eqn.params, preferred_element_type=dtype)))
            eqns.append(_convert_eqn(wide, out, eqn))
        elif prim is prims.reduce_sum_p:
            up = twin_of(x)
            if up is None:
                up = wide_var(x)
                eqns.append(_convert_eqn(x, up, eqn))
            eqns.append(eqn.replace(invars=[up], outvars=[wide]))
            eqns.append(_convert_eqn(wide, out, eqn))
        elif prim in _PASS_THROUGH and any(twin_of(v) is not None for v in eqn.invars):
            eqns.append(eqn)                                    # the low value, as before
            wide_in = []
            for v in eqn.invars:                # low floats: a twin, or the value widened
                w = twin_of(v)
                if w is None and _is_low(v.aval):
                    w = wide_var(v)
                    eqns.append(_convert_eqn(v, w, eqn))
                wide_in.append(v if w is None else w)
            eqns.append(eqn.replace(invars=wide_in, outvars=[wide]))
        else:
            eqns.append(eqn)
            continue
        twin[out] = wide
        changed = True
    if not changed:
        return jaxpr, False
    return jaxpr.replace(eqns=eqns, outvars=[sub(v) for v in jaxpr.outvars]), True


def float32_reductions(fn: Callable, dtype: Any = np.float32) -> Callable:
    """``fn`` (the VJP of a loss, or ``jax.grad(loss)``) with every low-precision ``dot_general``,
    convolution and ``reduce_sum`` whose result is cast up to ``dtype`` accumulating in ``dtype``
    (see the module docstring); the outputs keep their dtypes. Call it inside ``jit``: it traces
    ``fn`` once per call. On the CPU backend dots and convolutions upcast their operands."""
    dtype = np.dtype(dtype)

    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        jaxpr, changed = _rewrite_jaxpr(closed.jaxpr, dtype, upcast=jax.default_backend() == "cpu")
        if changed:
            closed = jcore.ClosedJaxpr(jaxpr, closed.consts)
        flat = jcore.jaxpr_as_fun(closed)(*jax.tree.leaves(args))  # one trace of fn, not two
        return jax.tree.unflatten(jax.tree.structure(out_shape), flat)

    return wrapped
