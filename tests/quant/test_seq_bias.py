"""Sequential bias correction (edgeq.quant.seq_bias) on a tiny residual CNN, W8A8.

Checked on the written QDQ file: each corrected Conv's output mean per channel equals the float
model's on the calibration feeds (up to half a step of its int32 bias), its bias is int32 at
s_in · s_w, only biases change, the segments the graph is cut into do not change the answer, and
the setting round-trips through a TOML recipe into the plan.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper as oh
from onnx import numpy_helper as nh

import edgeq
from edgeq.quant import seq_bias
from edgeq.quant.handlers import handlers_for
from edgeq.quant.recipes import BiasCorrectionConfig, load_recipe, preset

CONVS = ("stem", "expand", "project", "head")


def _model(path):
    """x[N, 3, 12, 12] -> stem 3x3 s2 + Relu -> expand 1x1 + Clip(0, 6) -> project 1x1 (+ the stem's output)
    -> head 1x1: an inverted-residual block in miniature."""
    rng = np.random.default_rng(0)

    def conv(name, cin, cout, k):
        w = (rng.standard_normal((cout, cin, k, k)) * (1.5 / np.sqrt(cin * k * k))).astype(np.float32)
        return [nh.from_array(w, f"{name}_w"), nh.from_array((rng.standard_normal(cout) * 0.2).astype(np.float32),
                                                            f"{name}_b")]

    inits = conv("stem", 3, 8, 3) + conv("expand", 8, 24, 1) + conv("project", 24, 8, 1) + conv("head", 8, 10, 1)
    inits += [nh.from_array(np.array(0.0, np.float32), "lo"), nh.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [
        oh.make_node("Conv", ["x", "stem_w", "stem_b"], ["s"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        oh.make_node("Relu", ["s"], ["sr"], name="stem_relu"),
        oh.make_node("Conv", ["sr", "expand_w", "expand_b"], ["e"], name="expand"),
        oh.make_node("Clip", ["e", "lo", "hi"], ["er"], name="expand_clip"),
        oh.make_node("Conv", ["er", "project_w", "project_b"], ["p"], name="project"),
        oh.make_node("Add", ["p", "sr"], ["r"], name="residual"),
        oh.make_node("Conv", ["r", "head_w", "head_b"], ["y"], name="head"),
    ]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", 1, ["n", 3, 12, 12])],
                          [oh.make_tensor_value_info("y", 1, None)], inits)
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9), path)
    return str(path)


def _feeds(n, seed):
    rng = np.random.default_rng(seed)
    # heavy tails: the MSE ranges clip them, a mean shift that weight-rounding correction does not see
    return [{"x": (rng.standard_exponential((4, 3, 12, 12)) ** 2).astype(np.float32)} for _ in range(n)]


def _conv_outputs(path, feeds):
    """Each Conv's output (by node name) over ``feeds``, from the model at ``path`` (float or QDQ)."""
    m = onnx.load(path)
    names = {n.name: n.output[0] for n in m.graph.node if n.op_type == "Conv"}
    m.graph.output.extend(oh.make_tensor_value_info(names[c], 1, None) for c in CONVS if names[c] not in
                          {o.name for o in m.graph.output})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # Q/DQ as written
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = [names[c] for c in CONVS]
    got = [s.run(outs, f) for f in feeds]
    return {c: np.concatenate([g[i] for g in got]) for i, c in enumerate(CONVS)}


def _recipe(sequential: bool):
    return preset("w8a8").with_algorithms(bias_correction=BiasCorrectionConfig(sequential=sequential))


def _int_biases(path):
    """node -> (int32 codes, scale) of each Conv bias stored as DequantizeLinear(int32)."""
    m = onnx.load(path)
    inits = {i.name: nh.to_array(i) for i in m.graph.initializer}
    dq = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in m.graph.node:
        if n.op_type == "Conv" and n.input[2] in dq and inits[dq[n.input[2]].input[0]].dtype == np.int32:
            d = dq[n.input[2]]
            out[n.name] = (inits[d.input[0]], inits[d.input[1]], d, n)
    return out, inits, dq


def test_sequential_correction_cancels_each_layers_mean_shift(tmp_path):
    src = _model(tmp_path / "m.onnx")
    cal = _feeds(6, 1)
    ref = _conv_outputs(src, cal)
    shift, step = {}, {}
    for on in (False, True):
        out = tmp_path / f"q{on}.onnx"
        res = edgeq.quantize(src, out, _recipe(on), calib=cal, force=True, progress=False)
        got = _conv_outputs(str(out), cal)
        shift[on] = {c: np.abs(got[c].mean(axis=(0, 2, 3)) - ref[c].mean(axis=(0, 2, 3))) for c in CONVS}
        step[on] = {c: scale for c, (_, scale, _, _) in _int_biases(str(out))[0].items()}
    assert res.plan.result("sequential_bias_correction").nodes == ("stem", "expand", "project", "head")
    for c in ("expand", "project", "head"):  # the stem reads the float image: its input is not quantized
        # in order, on the quantized graph: what is left is the int32 bias's own rounding (half a step) and float
        # summation; without it, activation rounding and the shifts inherited from upstream stay
        assert np.all(shift[True][c] <= 0.5 * step[True][c] + 1e-6), c
        assert np.any(shift[False][c] > 2 * step[True][c]), c  # (measured: 1.3-27 steps on average)


def test_biases_stay_int32_at_input_times_weight_scale_and_nothing_else_changes(tmp_path):
    src = _model(tmp_path / "m.onnx")
    cal = _feeds(4, 3)
    paths = {}
    for on in (False, True):
        paths[on] = str(tmp_path / f"q{on}.onnx")
        edgeq.quantize(src, paths[on], _recipe(on), calib=cal, force=True, progress=False)
    biases, inits, dq = _int_biases(paths[True])
    assert set(biases) == {"expand", "project", "head"}  # the stem reads the float image: a float bias
    for codes, scale, _, node in biases.values():
        w_scale = inits[dq[node.input[1]].input[1]]  # DequantizeLinear(int8 weight, s_w per channel)
        x_dq = dq[node.input[0]]  # the activation's DequantizeLinear: s_in
        np.testing.assert_allclose(scale, inits[x_dq.input[1]] * w_scale, rtol=1e-6)
        assert codes.dtype == np.int32 and np.abs(codes).max() < 2**30
    before, _, _ = _int_biases(paths[False])
    assert any(np.any(biases[n][0] != before[n][0]) for n in biases)
    # only the biases differ: every weight code and scale, every activation scale is the same
    a, b = onnx.load(paths[False]), onnx.load(paths[True])
    bias_names = {d.input[0] for _, _, d, _ in list(biases.values()) + list(before.values())}
    bias_names |= {n.input[2] for n in a.graph.node if n.op_type == "Conv"} | \
        {n.input[2] for n in b.graph.node if n.op_type == "Conv"}
    ia = {i.name: nh.to_array(i) for i in a.graph.initializer if i.name not in bias_names}
    ib = {i.name: nh.to_array(i) for i in b.graph.initializer if i.name not in bias_names}
    assert ia.keys() == ib.keys()
    for k, v in ia.items():
        np.testing.assert_array_equal(v, ib[k], err_msg=k)


def test_cutting_the_graph_into_segments_does_not_change_the_biases(tmp_path, monkeypatch):
    src = _model(tmp_path / "m.onnx")
    cal = _feeds(4, 5)
    codes = {}
    for budget in (0, 2**40):  # no cut at all (one segment) / a cut after every corrected Conv
        monkeypatch.setattr(seq_bias, "CUT_BYTES", budget)
        out = tmp_path / f"q{budget}.onnx"
        edgeq.quantize(src, out, _recipe(True), calib=cal, force=True, progress=False)
        codes[budget] = {n: c for n, (c, _, _, _) in _int_biases(str(out))[0].items()}
    for n in codes[0]:
        # the carried tensors are the same arrays either way; float sums in another order may move a code by one
        assert np.abs(codes[0][n].astype(np.int64) - codes[2**40][n]).max() <= 1, n


def test_the_setting_round_trips_through_a_toml_recipe_into_the_plan(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[default]\nweights = "int8"\nactivations = "uint8"\n'
                    '[algorithms]\nbias_correction = {sequential = true}\n'
                    '[[rules]]\nname = "^head$"\nalgorithms = {bias_correction = {sequential = false}}\n')
    rec = load_recipe(path)
    assert rec.algorithms.bias_correction == BiasCorrectionConfig(sequential=True)
    assert any(type(h) is seq_bias.SequentialBiasCorrection for h in handlers_for(rec))
    res = edgeq.quantize(_model(tmp_path / "m.onnx"), tmp_path / "q.onnx", rec, calib=_feeds(3, 7), force=True,
                         progress=False)
    result = res.plan.result("sequential_bias_correction")
    assert result.ran and result.nodes == ("stem", "expand", "project")  # the rule keeps head's correction plain
    assert "sequential_bias_correction" in [a["name"] for a in res.plan.as_dict()["algorithms"]]


def test_off_in_the_presets_and_when_off_no_handler_runs():
    for rec in (preset("w8a8"), preset("w8a16"), _recipe(False)):
        assert rec.algorithms.bias_correction == BiasCorrectionConfig(sequential=False)
        assert not any(type(h) is seq_bias.SequentialBiasCorrection for h in handlers_for(rec))


@pytest.mark.parametrize("bad", ["sequential = 1", 'sequential = "yes"'])
def test_a_wrong_type_is_an_error_naming_the_key(tmp_path, bad):
    path = tmp_path / "r.toml"
    path.write_text(f"[algorithms]\nbias_correction = {{{bad}}}\n")
    with pytest.raises(edgeq.errors.InputError, match="sequential"):
        load_recipe(path)


def test_one_build_carries_the_same_bias_integers_for_android_and_ios18(tmp_path):
    from edgeq.pipeline.quantize import quantize_for_profiles

    src = _model(tmp_path / "m.onnx")
    outs = {t: tmp_path / f"q.{t}.onnx" for t in ("android", "ios18")}
    res = quantize_for_profiles(src, list(outs.items()), _recipe(True), calib=_feeds(4, 9), progress=False)
    assert "as measured on android" in res[1].plan.result("sequential_bias_correction").summary
    codes = {t: {n: c for n, (c, _, _, _) in _int_biases(str(p))[0].items()} for t, p in outs.items()}
    assert codes["android"].keys() == codes["ios18"].keys() and codes["android"]
    for n in codes["android"]:
        np.testing.assert_array_equal(codes["android"][n], codes["ios18"][n], err_msg=n)
