import numpy as np
import pytest

from edgeq.errors import InputError
from edgeq.specs import TensorSpec, check_feed, check_feeds


def test_parse_roundtrip_and_dynamic_axes():
    s = TensorSpec.parse("input_ids:int64[batch, sequence]")
    assert s == TensorSpec("input_ids", ("batch", "sequence"), "int64")
    assert s.dynamic_axes == {0: "batch", 1: "sequence"}
    img = TensorSpec.parse("image:float32[batch,3,224,224]")
    assert img.shape == ("batch", 3, 224, 224)
    assert TensorSpec.parse(str(img)) == img
    assert img.concrete_shape({"batch": 5}) == (5, 3, 224, 224)


@pytest.mark.parametrize("text", ["x", "x:float32", "x:float32(1,2)", ":float32[1]", "x:float33[1]", "x:int64[1,-2]"])
def test_parse_rejects_bad_specs_with_a_hint(text):
    with pytest.raises(InputError) as e:
        TensorSpec.parse(text)
    assert "x" in str(e.value) or text in str(e.value)


def test_random_respects_ranges_and_dtype():
    rng = np.random.default_rng(0)
    ids = TensorSpec("ids", ("batch", 7), "int64", low=5, high=9).random(rng, {"batch": 3})
    assert ids.shape == (3, 7) and ids.dtype == np.int64 and ids.min() >= 5 and ids.max() < 9
    mask = TensorSpec("m", (2, 3), "int64", low=1, high=2).random(rng)
    assert (mask == 1).all()


def test_check_feed_names_dtypes_shapes_and_shared_axes():
    specs = [TensorSpec("a", ("batch", 3)), TensorSpec("b", ("batch",), "int64")]
    ok = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.int64)}
    check_feed(ok, specs)
    cases = [
        ({"a": ok["a"]}, "missing b"),
        ({**ok, "c": ok["b"]}, "unexpected c"),
        ({**ok, "a": ok["a"].astype(np.float64)}, "dtype float64"),
        ({**ok, "a": np.zeros((2, 4), np.float32)}, "axis 1 must be 3"),
        ({**ok, "a": np.zeros((2, 3, 1), np.float32)}, "expects 2 dimensions"),
        ({**ok, "b": np.zeros(5, np.int64)}, "axis 'batch' is 2"),
        ({**ok, "a": [[1.0, 2.0, 3.0]]}, "not a numpy array"),
    ]
    for feed, msg in cases:
        with pytest.raises(InputError, match=msg):
            check_feed(feed, specs, where="f.npz")


def test_check_feeds_names_the_source_and_rejects_empty():
    specs = [TensorSpec("a", (2,))]
    with pytest.raises(InputError, match="data.npz"):
        check_feeds([{"a": np.zeros(3, np.float32), "__source__": "data.npz"}], specs, source="x")
    with pytest.raises(InputError, match="no inputs"):
        check_feeds([], specs, source="empty")
