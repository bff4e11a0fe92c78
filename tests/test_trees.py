"""titok_jax.trees: flat <-> nested param trees and the one shape check every loader uses."""
import jax
import numpy as np
import pytest

from titok_jax.trees import check_tree_matches, flat_shapes, flatten, unflatten

ABSTRACT = {"enc": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 8), np.float32),
                             "bias": jax.ShapeDtypeStruct((8,), np.float32)}},
            "codebook": jax.ShapeDtypeStruct((16, 8), np.float32)}


def _tree():
    return {"enc": {"conv": {"kernel": np.zeros((3, 3, 4, 8)), "bias": np.zeros(8)}},
            "codebook": np.zeros((16, 8))}


def test_flat_and_nested_views_agree():
    flat = flatten(_tree())
    assert sorted(flat) == ["codebook", "enc/conv/bias", "enc/conv/kernel"]
    assert flat_shapes(ABSTRACT) == {k: v.shape for k, v in flat.items()}
    assert flat_shapes(unflatten(flat)) == flat_shapes(_tree())
    check_tree_matches(_tree(), ABSTRACT)
    check_tree_matches(flat, ABSTRACT)          # a flat file against a nested model
    with pytest.raises(ValueError, match="duplicate param 'a'"):
        unflatten({"a/b": 1, "a": 2})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["enc"]["conv"].pop("bias"), r"^src: missing param 'enc/conv/bias' \(shape \(8,\)\)$"),
    (lambda t: t["enc"]["conv"].update(kernel=np.zeros((3, 3, 8, 4))),
     r"^src: param 'enc/conv/kernel' has shape \(3, 3, 8, 4\), expected \(3, 3, 4, 8\)$"),
    (lambda t: t.update(extra=np.zeros(1), more=np.zeros(2)), r"^src: unexpected param 'extra' \(and 1 more\)$"),
])
def test_first_difference_is_one_line(edit, message):
    tree = _tree()
    edit(tree)
    with pytest.raises(ValueError, match=message):
        check_tree_matches(tree, ABSTRACT, source="src")


def test_dataclass_fields_name_the_path():
    import flax

    @flax.struct.dataclass
    class State:
        step: np.ndarray
        params: dict

    got = State(step=np.zeros(()), params={"w": np.zeros((2, 3))})
    want = State(step=jax.ShapeDtypeStruct((), np.int32), params={"w": jax.ShapeDtypeStruct((3, 2), np.float32)})
    with pytest.raises(ValueError, match=r"array 'params/w' has shape \(2, 3\), expected \(3, 2\)"):
        check_tree_matches(got, want, source="checkpoint 5", what="array")
