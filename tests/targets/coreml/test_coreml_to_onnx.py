"""The reference executor's program translated to one ONNX Runtime graph (executor.to_onnx) against
the numpy executor, and the runner's fallback to numpy for what does not translate.

Per-op agreement is checked where every op case is already packaged: test_coreml_ops (fp32,
≥ 120 dB) and test_coreml_executor (fp16, within one fp16 step on at most 1 % of elements;
measured: bit-identical on every translated case). Here: the rounding itself, whole small programs
(attention block, W8A8 CNN with its quantize/dequantize pairs computed in float) and the fallback.

Across several ops the one-step differences propagate (a matmul of inputs that differ by a step
in 0.1 % of elements differs in 1 %), so a whole fp16 program is held to SQNR ≥ 70 dB against
the numpy executor (measured on the attention block: 81 dB at its output; fp16 storage of one
tensor is ~66 dB of noise against exact values).
"""

import numpy as np
import onnx
import pytest
from coreml_models import cnn_feeds, package_and_load, rng_array, single_op, tiny_cnn
from test_coreml_executor import ATTENTION, _fp16_edges, _same_bits, assert_within_fp16_ulp

from edgeq import api
from edgeq.errors import UnsupportedError
from edgeq.validate.metrics import sqnr_db
from targets.coreml.executor.to_onnx import OrtProgram, translate
from targets.coreml.runner import MLPackageRunner


def test_ort_keeps_the_cast_pair_and_rounds_like_a_float16_cast():
    """Cast(float16) → Cast(float) in a session made as OrtProgram makes it: every float16 value, midpoint
    and neighbour, and random bit patterns, rounded bit for bit as numpy's float16 cast (so ORT did not
    drop the pair as a no-op cast chain)."""
    from onnx import TensorProto, helper

    from edgeq.runtime import ort_session

    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "round", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    sess = ort_session(model.SerializeToString(), config={"optimization.enable_cast_chain_elimination": "0"})
    rng = np.random.default_rng(0)
    x = np.concatenate([_fp16_edges(), rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    assert _same_bits(sess.run(None, {"x": x})[0], want)


def _attention_package(tmp_path):
    rng = np.random.default_rng(3)
    fmt = lambda *shape: ", ".join(f"{v:.4f}" for v in rng.standard_normal(shape).ravel() * 0.2)
    text = ATTENTION % (fmt(64, 64), fmt(64, 64), fmt(64, 256), fmt(256, 64), fmt(64))
    text = text.replace("{\n    n =", "{\n    qs = Constant <value = int64[4] {0, 0, 4, 16}> ()\n"
                                      "    xs = Constant <value = int64[3] {0, 0, 64}> ()\n    n =")
    _, _, _, pkg = package_and_load(onnx.parser.parse_model(text), tmp_path, compute="fp16")
    bias = np.zeros((3, 1, 1, 7), np.float32)
    bias[1, ..., 5:] = -3.4e38
    return pkg, {"x": rng_array((3, 7, 64), 4) * 3, "bias": bias}


def test_attention_block_translated_at_70_db(tmp_path):
    pkg, feed = _attention_package(tmp_path)
    runner = MLPackageRunner(pkg)
    assert runner.engine == "onnxruntime" and "note" not in runner.describe()
    want = runner.executor.run(runner.coreml_feeds(feed))
    got = runner.fast.run(runner.coreml_feeds(feed))
    for name in want:
        assert got[name].dtype == want[name].dtype and sqnr_db(want[name], got[name]) >= 70
    np.testing.assert_array_equal(runner.run(feed)["y"], got[runner.executor.output_names[0]].astype(np.float32))


def test_w8a8_cnn_translated_codes_and_outputs(tmp_path):
    """Activation quantize → dequantize pairs run as one float expression (fused) and, where the codes are
    also read elsewhere (kept here), as quantize and dequantize: both give the numpy executor's codes and
    values (measured: bit-identical; allowed: one fp16 step on 1 % of elements)."""
    qdq = tmp_path / "cnn.w8a8.onnx"
    api.quantize(tiny_cnn(tmp_path / "cnn.onnx"), qdq, "w8a8", profile="ios18", calib=cnn_feeds())
    ex, _, _, _ = package_and_load(onnx.load(str(qdq)), tmp_path, compute="fp16")
    codes = [s.outs[0][0] for s in ex._steps if s.op.op_type == "quantize"]
    values = [s.outs[0][0] for s in ex._steps if s.op.op_type in ("dequantize", "conv")]
    assert codes and values
    from edgeq.runtime import ort_session

    fused = OrtProgram(ex)
    unfused = ort_session(translate(ex, keep=codes + values).SerializeToString())
    ops = [n.op_type for n in translate(ex).graph.node]
    # every pair fused when nothing else reads the codes (an integer matmul takes the fused pair's codes)
    assert ops.count("Round") == len(codes) and ops.count("MatMulInteger") == 1
    for feed in cnn_feeds(2, seed=5):
        want = ex.run(feed, keep=set(codes + values))
        got = dict(zip([o.name for o in unfused.get_outputs()], unfused.run(None, feed)))
        for n in codes:
            assert np.array_equal(want[n], got[f"out:{n}"]), n
        for n in values:
            assert_within_fp16_ulp(want[n], got[f"out:{n}"].astype(np.float16))
        for n, v in fused.run(feed).items():
            assert_within_fp16_ulp(want[n], v)


def test_untranslatable_program_falls_back_to_numpy_and_says_why(tmp_path):
    model, feed = single_op("ConvTranspose", {"x": ("input", rng_array((1, 2, 5, 5), 1)),
                                              "w": ("const", rng_array((2, 3, 3, 3), 2))}, {"strides": [2, 2]})
    _, _, _, pkg = package_and_load(model, tmp_path, compute="fp16")
    runner = MLPackageRunner(pkg)
    assert runner.engine == "numpy" and runner.fast is None
    assert "conv_transpose" in runner.describe()["note"]
    np.testing.assert_array_equal(runner.run(feed)["y"], runner.executor.run(feed)["y"].astype(np.float32))
    computed = sorted(runner.executor.computed)
    got = runner.run_program(feed, keep=set(computed), fp16_as_float32=True)  # numpy runs kept values too
    want = runner.executor.run(feed, keep=set(computed))
    assert all(np.array_equal(got[n], want[n].astype(got[n].dtype)) for n in computed)
    assert {got[n].dtype for n in computed if want[n].dtype == np.float16} == {np.dtype(np.float32)}
    with pytest.raises(UnsupportedError, match="conv_transpose"):
        MLPackageRunner(pkg, engine="onnxruntime")
    assert MLPackageRunner(pkg, engine="numpy").describe().get("note") is None


def test_matmul_with_transposed_computed_operands(tmp_path):
    """MIL matmul with transpose_x / transpose_y on computed operands (ORT's FusedMatMul), fp32: ≥ 120 dB
    against the numpy executor (measured: bit-identical or float32 summation order apart)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from edgeq._quiet import quiet
    from targets.coreml.executor import Executor

    x = rng_array((2, 3, 5, 4), 7)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32)], opset_version=ct.target.iOS18)
    def prog(x):
        y = mb.mul(x=x, y=np.float32(0.5))
        return mb.matmul(x=x, y=y, transpose_y=True), mb.matmul(x=x, y=y, transpose_x=True)

    with quiet():
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                        pass_pipeline=ct.PassPipeline.EMPTY, compute_precision=ct.precision.FLOAT32,
                        skip_model_load=True)
    path = tmp_path / "mm.mlpackage"
    ml.save(str(path))
    ex = Executor.from_package(path)
    feed = {next(iter(ex.input_dtypes)): x}
    assert any(n.op_type == "FusedMatMul" for n in translate(ex).graph.node)
    want, got = ex.run(feed), OrtProgram(ex).run(feed)
    for name in ex.output_names:
        assert got[name].shape == want[name].shape and sqnr_db(want[name], got[name]) >= 120


# --- teacher-forced runs: Executor.run(keep=..., force=...) translated (runner.run_program) ---------------

def _w8a8_cnn(tmp_path):
    from targets.coreml import IOS18Target

    float_path = tiny_cnn(tmp_path / "cnn.onnx")
    qdq = tmp_path / "cnn.w8a8.onnx"
    api.quantize(float_path, qdq, "w8a8", profile="ios18", calib=cnn_feeds())
    return qdq, IOS18Target().package(qdq, tmp_path / "pkg").model_file


def _assert_forced_run_equal(runner, feed, force, keep, max_share=0.01):
    """run_program (translated) against Executor.run, both forced and kept: codes equal, fp16 values
    within one fp16 step on at most ``max_share`` of elements, forced values returned as forced."""
    want = runner.executor.run(feed, keep=keep, force=force)
    got = runner.run_program(feed, keep=keep, force=force)
    assert runner.fast._sessions and set(got) == set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape, n
        if want[n].dtype.kind == "f":
            assert_within_fp16_ulp(want[n], got[n], max_share)
        else:
            np.testing.assert_array_equal(want[n], got[n], err_msg=n)
    for n, v in force.items():
        if n in want:  # rounded to the program's dtype (fp16) as the executor rounds forced values
            assert _same_bits(got[n].astype(np.float32), v.astype(want[n].dtype).astype(np.float32)), n
    return want, got


def test_w8a8_cnn_forced_and_kept_run_translated(tmp_path):
    """Every activation dequantize output forced to float32 values off the fp16 grid (another feed's,
    scaled by 1.001), quantize inputs and codes kept: the translation gives the numpy executor's
    codes, and its values but for one fp16 step on at most 1 % of elements (measured on 3 seeds: codes
    equal, 0-2 of 27812 elements a step apart, in a conv output: float32 summation order)."""
    _, pkg = _w8a8_cnn(tmp_path)
    runner = MLPackageRunner(pkg)
    ex = runner.executor
    dq = [s.outs[0][0] for s in ex._steps if s.op.op_type == "dequantize" and s.vars]
    q = [(dict(s.vars)["input"], s.outs[0][0]) for s in ex._steps if s.op.op_type == "quantize"]
    assert dq and q
    teacher, feed = (runner.coreml_feeds(f) for f in cnn_feeds(2, seed=7))
    other = ex.run(teacher, keep=set(dq))
    force = {n: other[n].astype(np.float32) * np.float32(1.001) for n in dq}
    keep = {v for pair in q for v in pair} | set(dq)
    want, _ = _assert_forced_run_equal(runner, feed, force, keep)
    assert not np.array_equal(want[ex.output_names[0]], ex.run(feed)[ex.output_names[0]])  # forcing changed it


def test_attention_block_forced_and_kept_run_translated(tmp_path):
    """fp16 attention block with its layer norm and softmax outputs forced to random values, matmul
    outputs kept: within one fp16 step of the numpy executor on at most 1 % of elements (measured: 2 of
    14616 elements, the block's output)."""
    pkg, feed = _attention_package(tmp_path)
    runner = MLPackageRunner(pkg)
    ex = runner.executor
    kinds = {s.outs[0][0]: s.op.op_type for s in ex._steps if s.outs}
    values = ex.run(runner.coreml_feeds(feed), keep=set(kinds))
    forced = [n for n, k in kinds.items() if k in ("layer_norm", "softmax")]
    assert len(forced) == 2
    rng = np.random.default_rng(9)
    force = {n: rng.standard_normal(values[n].shape).astype(np.float32) * 0.5 for n in forced}
    keep = {n for n, k in kinds.items() if k in ("matmul", "linear")} | set(forced)
    _assert_forced_run_equal(runner, runner.coreml_feeds(feed), force, keep)


def test_forced_run_errors_match_the_numpy_executor(tmp_path):
    from edgeq.errors import InputError

    _, pkg = _w8a8_cnn(tmp_path)
    runner = MLPackageRunner(pkg)
    ex = runner.executor
    feed = runner.coreml_feeds(cnn_feeds(1)[0])
    name = next(s.outs[0][0] for s in ex._steps if s.op.op_type == "dequantize" and s.vars)
    shape = ex.run(feed, keep={name})[name].shape
    cases = [({"force": {next(iter(ex.input_dtypes)): feed[next(iter(ex.input_dtypes))]}}, "not computed"),
             ({"force": {name: np.zeros((1, *shape), np.float32)}}, "has shape"),
             ({"keep": {"no_such_value"}}, "no value")]
    for kwargs, match in cases:
        for run in (ex.run, runner.run_program):
            with pytest.raises(InputError, match=match):
                run(feed, **kwargs)
    assert runner.engine == "onnxruntime"


def test_compare_segments_same_with_both_engines(tmp_path):
    """The W8A8 segment acceptance on the translation (one translation for all feeds) gives the numpy
    executor's segment SQNRs and code flips (measured: identical; allowed: 0.1 dB)."""
    from targets.coreml.acceptance import compare_segments

    qdq, pkg = _w8a8_cnn(tmp_path)
    fast = MLPackageRunner(pkg, engine="onnxruntime")
    reports = [compare_segments(qdq, r, cnn_feeds(3, seed=11)) for r in (MLPackageRunner(pkg, engine="numpy"), fast)]
    assert len(fast.fast._sessions) == 1 and not fast._untranslated
    (a, b) = ([(s.name, s.sqnr_db, s.code_flips) for s in r.segments] for r in reports)
    assert len(a) == len(b) == 3 and reports[0].not_compared == reports[1].not_compared
    for (na, sa, fa), (nb, sb, fb) in zip(a, b):
        assert na == nb and abs(sa - sb) <= 0.1 and abs(fa - fb) <= 0.002
