"""The reference executor on iOS 18 stateful programs: ``read_state``, ``write_state`` (saved from
coremltools' ``coreml_update_state``) and ``slice_update``, with the state carried across runs.

Programs are built with coremltools' MIL builder and saved with ``ct.convert`` (as edgeq's lowering
does), then read back from the ``.mlpackage``: what runs is what Core ML would load. Expected values
are computed in numpy from the ops' definitions (float16 values are exact here: small integers).
"""

import numpy as np
import pytest

from edgeq.errors import InputError
from targets.coreml.executor import Executor, read_program

CACHE = (1, 2, 8, 4)  # [batch, heads, max positions, head dim]


def _save(prog, path):
    import coremltools as ct

    from edgeq._quiet import quiet

    with quiet():
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                        compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.CLEANUP,
                        skip_model_load=True)
        ml.save(str(path))
    return path


@pytest.fixture(scope="module")
def cache_package(tmp_path_factory):
    """A KV-cache-like program: writes ``new`` [1, 2, n, 4] into the state at position ``pos`` and
    returns the sum over the valid prefix [0, pos + n) of the updated cache, plus a second state that
    counts calls (a whole-tensor write)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.program import get_new_symbol

    n = get_new_symbol()

    @mb.program(input_specs=[mb.TensorSpec((1, 2, n, 4), dtype=types.fp16), mb.TensorSpec((1,), dtype=types.int32),
                             mb.StateTensorSpec(CACHE, dtype=types.fp16),
                             mb.StateTensorSpec((1,), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(new, pos, cache, calls):
        length = mb.slice_by_index(x=mb.shape(x=new), begin=[2], end=[3])
        zero = np.array([0], np.int32)
        begin = mb.concat(values=[zero, zero, pos, zero], axis=0)
        stop = mb.add(x=pos, y=length)
        end = mb.concat(values=[np.array([1, 2], np.int32), stop, np.array([4], np.int32)], axis=0)
        updated = mb.slice_update(x=mb.read_state(input=cache), update=new, begin=begin, end=end)
        updated = mb.coreml_update_state(state=cache, value=updated)
        prefix = mb.slice_by_index(x=updated, begin=[0, 0, 0, 0], end=end)
        total = mb.reduce_sum(x=prefix, axes=[2], keep_dims=False, name="prefix_sum")
        count = mb.coreml_update_state(state=calls, value=mb.add(x=mb.read_state(input=calls), y=np.float16(1)))
        return total, mb.identity(x=count, name="calls_so_far")

    return _save(prog, tmp_path_factory.mktemp("state") / "cache.mlpackage")


def _chunks(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(-8, 9, (1, 2, k, 4)).astype(np.float16) for k in (3, 1, 1, 2)]


def test_saved_program_declares_states_and_write_state(cache_package):
    prog, _ = read_program(cache_package)
    states = {n: (v.mil_dtype, v.shape) for n, v in prog.inputs.items() if v.state}
    assert states == {"cache": ("FLOAT16", CACHE), "calls": ("FLOAT16", (1,))}
    ops = [op.op_type for op in prog.operations]
    assert "write_state" in ops and "read_state" in ops and "slice_update" in ops
    assert "coreml_update_state" not in ops  # saved as write_state + read_state


@pytest.mark.parametrize("fast", [True, False])
def test_state_is_carried_across_runs(cache_package, fast):
    ex = Executor.from_package(cache_package, fast=fast)
    assert ex.stateful and set(ex.input_dtypes) == {"new", "pos"}
    state = ex.make_state()
    assert not state.read("cache").any()  # Core ML: new state buffers are zeros
    want = np.zeros(CACHE, np.float32)
    pos = 0
    for i, chunk in enumerate(_chunks()):
        out = ex.run({"new": chunk, "pos": np.array([pos], np.int32)}, state=state)
        want[:, :, pos:pos + chunk.shape[2]] = chunk
        pos += chunk.shape[2]
        np.testing.assert_array_equal(state.read("cache"), want.astype(np.float16))
        np.testing.assert_array_equal(out["prefix_sum"], want[:, :, :pos].sum(axis=2).astype(np.float16))
        assert out["calls_so_far"].tolist() == [i + 1]
    # a new state starts again from zeros; the old one is untouched by runs with the new one
    fresh = ex.make_state()
    out = ex.run({"new": _chunks()[1], "pos": np.array([0], np.int32)}, state=fresh)
    assert out["calls_so_far"].tolist() == [1]
    np.testing.assert_array_equal(state.read("cache"), want.astype(np.float16))


def test_fast_and_plain_paths_give_identical_bits(cache_package):
    runs = []
    for fast in (True, False):
        ex = Executor.from_package(cache_package, fast=fast)
        state, pos, outs = ex.make_state(), 0, []
        for chunk in _chunks(seed=1):
            outs.append(ex.run({"new": chunk * np.float16(0.37), "pos": np.array([pos], np.int32)}, state=state))
            pos += chunk.shape[2]
        runs.append((outs, state.read("cache")))
    (a, ca), (b, cb) = runs
    assert ca.dtype == cb.dtype == np.float16 and ca.tobytes() == cb.tobytes()
    for x, y in zip(a, b):
        assert all(x[k].tobytes() == y[k].tobytes() for k in x)


def test_state_written_by_the_caller_is_read(cache_package):
    ex = Executor.from_package(cache_package)
    state = ex.make_state()
    preset = np.arange(np.prod(CACHE), dtype=np.float16).reshape(CACHE)
    state.write("cache", preset)
    chunk = _chunks()[1]
    out = ex.run({"new": chunk, "pos": np.array([2], np.int32)}, state=state)
    want = preset.astype(np.float32)
    want[:, :, 2:3] = chunk
    np.testing.assert_array_equal(out["prefix_sum"], want[:, :, :3].sum(axis=2).astype(np.float16))


def test_stateful_program_needs_a_state(cache_package, tmp_path):
    ex = Executor.from_package(cache_package)
    feeds = {"new": _chunks()[1], "pos": np.array([0], np.int32)}
    with pytest.raises(InputError, match="keeps state"):
        ex.run(feeds)
    with pytest.raises(InputError, match="no state 'kv'"):
        ex.make_state().read("kv")
    with pytest.raises(InputError, match="shape"):
        ex.make_state().write("cache", np.zeros((1, 2, 4, 4), np.float16))


@pytest.mark.parametrize("case", [
    {"begin": [0, 1, 2], "end": [2, 3, 6], "stride": [1, 1, 2]},
    {"begin": [1, 0, 0], "end": [0, 0, 3], "begin_mask": [False, True, True], "end_mask": [True, True, False]},
    {"begin": [1, 0, 0], "end": [2, 4, 6], "squeeze_mask": [True, False, False]},
    {"begin": [0, -3, 1], "end": [3, -1, 5]},
])
def test_slice_update_matches_numpy_slice_assignment(case, tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from targets.coreml.executor.ops_tensor import _slice_by_index

    x = np.arange(72, dtype=np.float32).reshape(3, 4, 6)
    shape = _slice_by_index(x, **case).shape
    update = -np.arange(1, 1 + int(np.prod(shape)), dtype=np.float32).reshape(shape)
    args = {k: np.array(v, np.int32 if k in ("begin", "end", "stride") else bool) for k, v in case.items()}

    @mb.program(input_specs=[mb.TensorSpec(x.shape, dtype=types.fp32), mb.TensorSpec(shape, dtype=types.fp32)],
                opset_version=ct.target.iOS18)
    def prog(x, update):
        return mb.slice_update(x=x, update=update, **args, name="out")

    ex = Executor.from_package(_save(prog, tmp_path / "su.mlpackage"))
    want = x.copy()
    _slice_by_index(want, **case)[...] = update  # a view: numpy's own slice assignment
    got = ex.run({"x": x, "update": update})["out"]
    np.testing.assert_array_equal(got, want)
