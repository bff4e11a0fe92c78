"""Every published config fits a pod: on meshes of fsdp 8, 64 and 256 devices the train state's
sharding plan (shardings on a ``jax.sharding.AbstractMesh``: no devices, no compile) keeps at most 1.2x
the ideal per device, no leaf over ``MAX_REPLICATED_ELEMENTS`` stays whole on a device, and the batch
is split over every device of the fsdp group (``fsdp`` x ``fsdp_sub``)."""
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from titok_jax.tasks import get_task
from titok_jax.train import memory
from titok_jax.train import sharding as sharding_lib
from titok_jax.train.sharding import MAX_REPLICATED_ELEMENTS

from train_helpers import load_config_module

FAMILIES = ("titok", "flextok", "flowmo", "maskgit", "ar", "vqgan", "extractor", "magvit2",
            "fqgan")
PUBLISHED = [(f, v) for f in FAMILIES for v in load_config_module(f).PUBLISHED]
DEVICES = (8, 64, 256)
MAX_STATE_OVER_IDEAL = 1.2


def _config(family, variant):
    """A published config whose frozen networks may be random: the plan needs shapes, not weights.
    FlexTok's REPA teacher (a constant, not train state) is left out rather than initialised."""
    config = load_config_module(family).get_config(variant)
    for section in ("vae", "teacher"):
        if section in config:
            config[section].allow_random = True
    if "repa" in config:
        config.repa.weight = 0.0
    if "teachers" in config:   # FQGAN's teachers: constants, as FlexTok's REPA teacher
        config.teachers = {}
    return config


_TRACES = {}


def _plan(family, variant, devices):
    config = _config(family, variant)
    config.mesh = {"data": 1, "fsdp": devices, "tensor": 1}
    if (family, variant) not in _TRACES:
        task = get_task(config)
        _TRACES[family, variant] = (task, memory.abstract_variables(task))
    task, variables = _TRACES[family, variant]
    return config, task, variables


@pytest.mark.parametrize("family,variant", PUBLISHED, ids=[f"{f}:{v}" for f, v in PUBLISHED])
def test_published_state_fits_every_pod_size(family, variant):
    for devices in DEVICES:
        config, task, variables = _plan(family, variant, devices)
        abstract, shardings = memory.plan_state(config, devices, task, variables)
        state = memory.bytes_per_device(abstract, shardings)
        ideal = memory.tree_bytes(abstract) / devices
        assert state <= MAX_STATE_OVER_IDEAL * ideal, (devices, state / ideal)
        if devices != 256:
            continue
        # nothing large stays whole on a device: it is split over every fsdp device, or (a leaf
        # no split of the group fits, e.g. a (1001, 1920) table) over enough of them that one
        # device's shard is at most MAX_REPLICATED_ELEMENTS
        flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
        for (path, leaf), sh in zip(flat, jax.tree.leaves(shardings)):
            elements = math.prod(leaf.shape)
            if elements <= MAX_REPLICATED_ELEMENTS:
                continue
            shard = math.prod(sh.shard_shape(leaf.shape))
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            assert shard < elements, (name, leaf.shape, sh.spec)
            assert shard * devices == elements or shard <= MAX_REPLICATED_ELEMENTS, \
                (name, leaf.shape, sh.spec)


def test_fsdp_splits_into_two_mesh_axes_beyond_128():
    assert sharding_lib.fsdp_split(8) == (8, 1)
    assert sharding_lib.fsdp_split(64) == (64, 1)
    assert sharding_lib.fsdp_split(128) == (128, 1)
    assert sharding_lib.fsdp_split(256) == (128, 2)
    assert sharding_lib.fsdp_split(512) == (128, 4)
    assert sharding_lib.fsdp_split(96) == (32, 3)
    assert sharding_lib.fsdp_split(256, 4) == (64, 4)
    with pytest.raises(ValueError, match="does not divide"):
        sharding_lib.fsdp_split(256, 3)
    mesh = sharding_lib.abstract_mesh({"data": 2, "fsdp": -1, "tensor": 2}, 1024)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 128, "fsdp_sub": 2, "tensor": 2}


def test_batch_is_split_over_the_whole_fsdp_group():
    mesh = sharding_lib.abstract_mesh({"data": 2, "fsdp": 256, "tensor": 2}, 1024)
    assert sharding_lib.batch_sharding(mesh).spec == P(("data", "fsdp", "fsdp_sub"))
    assert sharding_lib.batch_shards(mesh) == 512


def _fit(shape, spec, fsdp, fsdp_sub=None, name="w"):
    spec_ = {"data": 1, "fsdp": fsdp, "tensor": 1}
    if fsdp_sub is not None:
        spec_["fsdp_sub"] = fsdp_sub
    return sharding_lib._fit(spec, shape, sharding_lib.abstract_mesh(spec_, fsdp), name)


def test_the_fsdp_group_stays_whole_on_a_dimension_it_divides_and_splits_otherwise():
    # 1152 = 128 x 9: the group of 256 does not divide it; 128 goes there and 2 on the other width
    assert _fit((1152, 6, 1152), P("fsdp", None, "tensor"), 256) == P("fsdp", None, "fsdp_sub")
    assert _fit((1152, 4608), P("fsdp", "tensor"), 256) == P(None, ("fsdp", "fsdp_sub"))
    assert _fit((1024, 4608), P("fsdp", "tensor"), 256) == P(("fsdp", "fsdp_sub"), None)
    # up to 128 devices the mesh has one fsdp axis, and specs name it alone
    assert _fit((1152, 4608), P("fsdp", "tensor"), 64) == P("fsdp", None)


def test_leaves_their_names_leave_unsplit_are_split_over_fsdp():
    assert _fit((8192, 64), P(None, None), 256) == P(("fsdp", "fsdp_sub"), None)     # a codebook
    assert _fit((1152,), P(None), 256) == P("fsdp")                                   # 128 of 256
    assert _fit((300,), P(None), 256) == P(None)                  # under MIN_SHARDED_ELEMENTS


def test_a_partly_split_leaf_is_allowed_while_its_shard_is_small():
    # (1001, 1920): 1001 is odd and 1920 = 128 x 15, so no split of 256 fits; each device holds
    # 1/128 of it (15015 elements)
    assert _fit((1001, 1920), P(None, "fsdp"), 256) == P(None, "fsdp")
    with pytest.raises(ValueError) as err:
        _fit((4100, 2050), P("fsdp", None), 8, fsdp_sub=8, name="model/table")
    msg = str(err.value)
    assert "\n" not in msg and "model/table (4100, 2050)" in msg and "fsdp_sub=2 would fit it" in msg
    with pytest.raises(ValueError, match="no split of fsdp 8 into fsdp x fsdp_sub fits it"):
        _fit((2050, 2050), P("fsdp", None), 8)


def test_plan_report_agrees_with_the_plan():
    config, task, variables = _plan("vqgan", "maskgit_f16_256", 64)
    report = memory.plan_report(config, 64, task, variables)
    abstract, shardings = memory.plan_state(config, 64, task, variables)
    assert report["state_bytes_per_device"] == memory.bytes_per_device(abstract, shardings)
    assert report["ideal_state_bytes_per_device"] == pytest.approx(memory.tree_bytes(abstract) / 64)
    assert 0 < report["largest_leaf_bytes_per_device"] <= report["state_bytes_per_device"]
    assert np.isfinite(report["ideal_state_bytes_per_device"])


def test_collectives_in_a_loop_count_once_per_iteration():
    hlo = """
HloModule m

%body (p: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %p = (s32[], f32[64,64]{1,0}) parameter(0)
  %w = f32[64,64]{1,0} get-tuple-element(%p), index=1
  %ag = f32[512,64]{1,0} all-gather(%w), channel_id=1, dimensions={0}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[64,64]{1,0}) tuple(%i, %w)
}

%cond (p.1: (s32[], f32[64,64])) -> pred[] {
  %p.1 = (s32[], f32[64,64]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[64,64]) -> f32[64,64] {
  %a = f32[64,64]{1,0} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], f32[64,64]{1,0}) tuple(%z, %a)
  %loop = (s32[], f32[64,64]{1,0}) while(%init), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"24"}}
  %ar = f32[64,64]{1,0} all-reduce(%a), channel_id=2, to_apply=%cond
  ROOT %out = f32[64,64]{1,0} get-tuple-element(%loop), index=1
}
"""
    assert memory.collective_bytes(hlo) == 24 * 64 * 64 * 4 + 64 * 64 * 4
