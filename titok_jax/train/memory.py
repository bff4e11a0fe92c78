"""Per-device memory, FLOPs and collective traffic of the compiled train step, and the dry run.

``compiled_report`` reads an AOT-compiled step (``jax.jit(step).lower(...).compile()``):
``memory_analysis()`` gives the per-device argument / output / aliased (donated) / temporary bytes,
``cost_analysis()`` the per-device FLOPs, and the compiled HLO text the collectives. The train
state's own per-device bytes come from its shardings: ``sum(leaf bytes / shards of the leaf)``, next
to the ideal ``total / device count``. ``step_report(parts)`` builds and compiles the step from
abstract arguments (nothing is allocated, no step runs); ``dry_run(config, workdir)`` does it for a
run config without touching the workdir - with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
and ``JAX_PLATFORMS=cpu`` set before JAX is imported it sizes a pod's mesh on one CPU host.

Every number is per device and per step except ``device_count``. ``collective_bytes_per_step`` is
the sum of the operand sizes of every all-reduce / all-gather / reduce-scatter / all-to-all /
collective-permute the compiled program runs: one inside a loop body (a scan over layers, the
gradient-accumulation scan) counts once per iteration of the loop.

``plan_report(config, n)`` is the part that needs no compile and no devices: the train state's
shardings on a ``jax.sharding.AbstractMesh`` of ``n`` devices (``sharding.abstract_mesh``), hence
its per-device bytes against the ideal, for any pod size on any host in seconds."""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.train import sharding as sharding_lib
from titok_jax.train.optimizer import make_optimizer
from titok_jax.train.parts import RunParts, build_parts, with_shardings
from titok_jax.train.state import TrainState, abstract_and_shardings
from titok_jax.train.step import build_step, step_options

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")


def _dtype_bytes(name: str) -> float:
    if name in _BYTES:
        return _BYTES[name]
    if name.startswith("f8") or name.startswith("s8") or name.startswith("u8"):
        return 1
    bits = re.match(r"[a-z]+(\d+)", name)
    return int(bits.group(1)) / 8 if bits else 0


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO type string: ``f32[128,64]{1,0}`` -> 32768; a tuple
    ``(f32[], bf16[8]{0})`` sums its elements."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        total += _dtype_bytes(dtype) * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def collective_bytes(hlo_text: str) -> int:
    """Bytes the collectives (``COLLECTIVES``, sync or ``-start``) of a compiled HLO module's text
    move in one execution: the sum of their operand sizes (operands printed by name are looked up
    in the module), each counted as often as it runs - a collective in the body of a ``while`` with
    a ``known_trip_count`` (a scan over layers, the accumulation scan) counts that many times, one in
    any other called computation once per call (every branch of a conditional counts)."""
    shapes: dict[str, str] = {}
    own: dict[str | None, list[str]] = {None: []}
    called: dict[str | None, list[tuple[str, int]]] = {None: []}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            header = _COMPUTATION.match(line)
            if header:
                current = header.group(2)
                own[current], called[current] = [], []
                if header.group(1):
                    entry = current
            continue
        name, shape, op, rest = m.groups()
        shapes[name] = shape
        base = op[:-len("-start")] if op.endswith("-start") else op
        if base in COLLECTIVES:
            own[current].append(rest)
        trips = _TRIP.search(rest) if op == "while" else None
        for key, value in _CALLED.findall(rest):
            if key == "condition":
                continue
            times = int(trips.group(1)) if trips and key == "body" else 1
            for callee in re.findall(r"%?([\w.\-]+)", value):
                called[current].append((callee, times))

    def operand_bytes(rest: str) -> int:
        total = 0
        for arg in _operands(rest):
            inline = _SHAPE.search(arg)
            ref = re.search(r"%?([\w.\-]+)\s*$", arg)
            if inline:
                total += shape_bytes(arg[:ref.start()] if ref else arg)
            elif ref and ref.group(1) in shapes:
                total += shape_bytes(shapes[ref.group(1)])
        return total

    memo: dict[str | None, int] = {}

    def computation_bytes(comp: str | None) -> int:
        if comp not in memo:
            memo[comp] = 0   # a cycle (never in valid HLO) counts once
            memo[comp] = (sum(operand_bytes(r) for r in own.get(comp, ())) +
                          sum(t * computation_bytes(c) for c, t in called.get(comp, ()) if c in own))
        return memo[comp]

    if entry is None:   # a fragment without an ENTRY computation: every collective once
        return sum(operand_bytes(r) for rests in own.values() for r in rests)
    return computation_bytes(entry)


def _operands(rest: str) -> list[str]:
    """The comma-separated operands of ``op(...)`` (``rest`` starts after the open parenthesis)."""
    depth, out, cur = 0, [], []
    for ch in rest:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    last = "".join(cur).strip()
    return out + ([last] if last else [])


def _leaf_bytes(leaf: Any) -> int:
    return int(math.prod(np.shape(leaf)) * np.dtype(leaf.dtype).itemsize)


def tree_bytes(tree: Any) -> int:
    """Total bytes of a tree of arrays / ``ShapeDtypeStruct`` s."""
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` placed with ``shardings``: each leaf's shard shape."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard = sh.shard_shape(tuple(np.shape(leaf)))
        total += int(math.prod(shard) * np.dtype(leaf.dtype).itemsize)
    return total


def device_memory_bytes(device: Any = None) -> int | None:
    """The device's memory (``memory_stats()['bytes_limit']``), or None where unknown (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def compiled_report(compiled: Any, parts: RunParts) -> dict:
    """The report of an AOT-compiled step of ``parts`` (see the module docstring); every value a
    number. Keys: ``device_count``, ``state_bytes_per_device``, ``ideal_state_bytes_per_device``,
    ``argument_bytes_per_device`` (state, batch and constants), ``output_bytes_per_device``,
    ``alias_bytes_per_device``, ``temp_bytes_per_device``, ``total_bytes_per_device`` (arguments
    + outputs - aliased + temporaries + code), ``flops_per_device``, ``collective_bytes_per_step``
    and, where the backend knows it, ``device_memory_bytes``."""
    devices = int(parts.mesh.devices.size)
    analysis = compiled.memory_analysis()  # None on a backend without it: zeros

    def mem(name):
        return int(getattr(analysis, name, 0) or 0)
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    report = {
        "device_count": devices,
        "state_bytes_per_device": bytes_per_device(parts.abstract, parts.shardings),
        "ideal_state_bytes_per_device": tree_bytes(parts.abstract) / devices,
        "argument_bytes_per_device": mem("argument_size_in_bytes"),
        "output_bytes_per_device": mem("output_size_in_bytes"),
        "alias_bytes_per_device": mem("alias_size_in_bytes"),
        "temp_bytes_per_device": mem("temp_size_in_bytes"),
        "total_bytes_per_device": (mem("argument_size_in_bytes") + mem("output_size_in_bytes")
                                   - mem("alias_size_in_bytes") + mem("temp_size_in_bytes")
                                   + mem("generated_code_size_in_bytes")),
        "flops_per_device": float((cost or {}).get("flops", 0.0)),
        "collective_bytes_per_step": collective_bytes(compiled.as_text()),
    }
    limit = device_memory_bytes()  # this process's first device (all devices of a mesh match)
    if limit is not None:
        report["device_memory_bytes"] = limit
    return report


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def report_line(report: dict) -> str:
    """One human line of a report (the trainer prints it before step 1)."""
    total = report["total_bytes_per_device"]
    limit = report.get("device_memory_bytes")
    of = (f" of {_human(limit)} ({100 * total / limit:.1f}%)" if limit else " (device memory unknown)")
    return (f"compiled step, per device ({report['device_count']} devices): arguments "
            f"{_human(report['argument_bytes_per_device'])} (train state "
            f"{_human(report['state_bytes_per_device'])}, ideal "
            f"{_human(report['ideal_state_bytes_per_device'])}), temporaries "
            f"{_human(report['temp_bytes_per_device'])}, total {_human(total)}{of}; "
            f"{report['flops_per_device'] / 1e9:.3g} GFLOP, collectives "
            f"{_human(report['collective_bytes_per_step'])} per step")


def abstract_constants(constants: Any, mesh: Any) -> Any:
    """``ShapeDtypeStruct`` s of a task's constants, sharded as the step takes them."""
    def struct(x):
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        return jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(dtype))
    structs = jax.tree.map(struct, constants)
    return with_shardings(structs, sharding_lib.constant_shardings(structs, mesh))


def abstract_batch(config: Any, task: Any, mesh: Any) -> dict:
    """``ShapeDtypeStruct`` s of the global batch the trainer feeds the step (``task.batch_keys``
    of the config's data pipeline), sharded over the batch axes; reads no data (a token data set's
    ``meta.json`` only, for its token count)."""
    b, size = int(config.batch_size), int(config.data.image_size)
    source = str(config.data.source)
    known = {"image": ((b, size, size, 3), np.float32), "label": ((b,), np.int32)}
    from titok_jax.data.video import DEFAULT_NUM_FRAMES, is_video_spec
    if is_video_spec(source):   # clips [B, T, S, S, 3] (data/video.py)
        t = int(config.data.get("num_frames", 0) or DEFAULT_NUM_FRAMES)
        known["image"] = ((b, t, size, size, 3), np.float32)
    if source.startswith("tokens:"):
        from titok_jax.data.tokens import read_token_meta, token_shape
        known["tokens"] = ((b, *token_shape(read_token_meta(source[len("tokens:"):]))), np.int32)
    missing = [k for k in task.batch_keys if k not in known]
    if missing:
        raise ValueError(f"no abstract batch entry for {missing} (data source {source!r})")
    sh = sharding_lib.batch_sharding(mesh)
    shards = sharding_lib.batch_shards(mesh)
    if b % shards:
        raise ValueError(f"global batch {b} is not divisible by the {shards} shards of mesh axes "
                         f"{sharding_lib.BATCH_AXES}")
    return {k: jax.ShapeDtypeStruct(known[k][0], known[k][1], sharding=sh) for k in task.batch_keys}


def step_report(parts: RunParts, constants: Any = None, batch: Any = None) -> dict:
    """AOT-compile the train step of ``parts`` on abstract arguments and report it
    (``compiled_report``). ``constants``: the task's host constants (default: ``task.constants()``,
    which reads the frozen networks' weight files); ``batch``: abstract batch (default:
    ``abstract_batch``). Allocates no state and runs no step."""
    if constants is None:
        constants = parts.task.constants()
    consts = abstract_constants(constants, parts.mesh)
    batch = abstract_batch(parts.config, parts.task, parts.mesh) if batch is None else batch
    jitted = build_step(parts.task, parts.optimizer, parts.shardings, parts.mesh, constants=consts,
                        **step_options(parts.config, parts.abstract.params))
    compiled = jitted.lower(parts.abstract_with_shardings(), batch, consts).compile()
    return compiled_report(compiled, parts)


def dry_run(config: Any, workdir: str | None = None) -> dict:
    """Build what the trainer builds for ``config`` (mesh, task, abstract sharded state, optimizer,
    the step with the task's constants) and report the AOT-compiled step (``step_report``) -
    without creating ``workdir``, writing a checkpoint or running a step. ``workdir`` is only the
    run's name here: nothing is read from or written to it."""
    del workdir  # the dry run never touches the workdir
    return step_report(build_parts(config))


def abstract_variables(task: Any) -> Any:
    """``jax.eval_shape(task.init)``: the boxed (logically named) abstract ``(params, model_state)``
    of a task - the one expensive step of a sharding plan, shared by every mesh size."""
    return jax.eval_shape(task.init, jax.random.key(0))


def plan_state(config: Any, num_devices: int, task: Any = None, variables: Any = None
               ) -> tuple[TrainState, TrainState]:
    """The abstract train state of ``config`` and its shardings on an ``AbstractMesh`` of
    ``num_devices`` devices laid out as ``config.mesh`` (``sharding.abstract_mesh``): what the
    trainer would build, without devices or a compile. ``task`` / ``variables``
    (``abstract_variables(task)``) may be passed in to plan several mesh sizes from one trace."""
    if task is None:
        from titok_jax.tasks import get_task
        task = get_task(config)
    if variables is None:
        variables = abstract_variables(task)
    mesh = sharding_lib.abstract_mesh(dict(config.mesh), num_devices)
    rules = sharding_lib.rules_from_config(config.get("logical_axis_rules"))
    use_ema = float(config.optimizer.get("ema_decay", 0.0) or 0.0) > 0

    def init(key):
        del key
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
    abstract, shardings, _ = abstract_and_shardings(init, lambda p: make_optimizer(config, p), use_ema,
                                                    mesh, rules)
    return abstract, shardings


def plan_report(config: Any, num_devices: int, task: Any = None, variables: Any = None) -> dict:
    """The sharding plan's numbers (``plan_state``): ``device_count``, ``state_bytes_per_device``,
    ``ideal_state_bytes_per_device`` (total / devices) and ``largest_leaf_bytes_per_device`` (the
    biggest shard one device holds of any state leaf)."""
    abstract, shardings = plan_state(config, num_devices, task, variables)
    largest = max((int(math.prod(sh.shard_shape(tuple(np.shape(x)))) * np.dtype(x.dtype).itemsize)
                   for x, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))), default=0)
    return {"device_count": int(num_devices),
            "state_bytes_per_device": bytes_per_device(abstract, shardings),
            "ideal_state_bytes_per_device": tree_bytes(abstract) / num_devices,
            "largest_leaf_bytes_per_device": largest}
