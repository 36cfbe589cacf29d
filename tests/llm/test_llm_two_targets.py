"""`edgeq build` of a causal LM for android and ios18: one plan, one calibration, the same integers in the `.ort`
and the `.mlpackage`, each package validated with the LLM metrics (tiny Llama)."""

import numpy as np
import onnx
import pytest
from helpers import count_calibrations
from onnx import numpy_helper
from tiny_llama import write_texts

from edgeq import meta
from edgeq.export.causal_lm import read_facts
from edgeq.passes.ort_llm_rules import PACKED_SOURCE
from edgeq.pipeline.build import build
from edgeq.validate.llm import LLMThresholds


@pytest.fixture(scope="module")
def built(tiny_onnx, tmp_path_factory):
    path, _ = tiny_onnx
    facts = read_facts({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props})
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("llm_two_targets")
    calib = write_texts(root / "calib", facts, [rng.integers(3, 256, 24).tolist() for _ in range(6)])
    evaluation = write_texts(root / "eval", facts, [rng.integers(3, 256, 20).tolist() for _ in range(3)])
    with pytest.MonkeyPatch.context() as mp:
        calls = count_calibrations(mp)
        # the random tiny model is no language model (w4a16 keeps 40 % of its top-1): gates it meets; this test
        # is about the packages agreeing, not about the gates
        res = build(str(path), targets=["android", "ios18"], recipe="w4a16", calib=str(calib), data=str(evaluation),
                    output=root / "dist", progress=False, latency=False, say=lambda _: None,
                    llm_thresholds=LLMThresholds(max_perplexity_ratio=2.0, min_top1_agreement=0.2))
    return res, calls


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.slow
def test_one_calibration_one_plan_for_android_and_ios18(built):
    res, calls = built
    assert calls == [6]  # w4a16: one pass (GPTQ's and AWQ's statistics) for both profiles
    plans = {row["profile"]: row for row in res.data["qdq"]}
    assert set(plans) == {"android", "ios18"}
    assert plans["android"]["calibration"]["sha256"] == plans["ios18"]["calibration"]["sha256"]
    steps = [s["step"] for s in plans["android"]["import"]]
    assert steps[-1] == "fuse for android (on the quantized graph)", steps
    assert "GroupQueryAttention 2" in plans["android"]["import"][-1]["detail"]
    assert not any(s["step"].startswith("fuse") for s in plans["ios18"]["import"])


@pytest.mark.slow
def test_the_packages_carry_the_same_integers_bit_for_bit(built):
    """The .ort's MatMulNBits (packed query/key/value included) and GatherBlockQuantized table hold the codes of
    the .mlpackage's constexpr_blockwise_shift_scale ops, and the same scales."""
    from targets.android import ortformat
    from targets.coreml.executor import load_program
    from targets.coreml.lower.context import mil_name

    res, _ = built
    root = res.path
    files = {row["profile"]: root / row["file"] for row in res.data["qdq"]}
    android_qdq, ios_qdq = onnx.load(str(files["android"])), onnx.load(str(files["ios18"]))
    ios_inits = _initializers(files["ios18"])
    # the ios18 QDQ ONNX's weights, by the node they feed -> (codes, scale, the DequantizeLinear's output)
    ios = {}
    for n in ios_qdq.graph.node:
        props = meta.proto_props(n)
        if n.op_type == "DequantizeLinear" and meta.role_of(props) == meta.Role.WEIGHT:
            zp = ios_inits[n.input[2]] if len(n.input) > 2 else None
            ios[props[meta.SOURCE]] = (ios_inits[n.input[0]], ios_inits[n.input[1]], n.output[0], zp)
    prog, _ = load_program(next((root / "ios18").glob("*.mlpackage")))
    mil = {op.name: op for op in prog.functions["main"].operations}
    ort_graph = ortformat._root((root / "android" / "model.ort").read_bytes()).Model().Graph()
    ort = {ort_graph.Initializers(i).Name().decode(): ort_graph.Initializers(i).RawDataAsNumpy()
           for i in range(ort_graph.InitializersLength())}
    android_inits = _initializers(files["android"])
    folded = _factors_folded_into_columns(ios_qdq, ios_inits)
    assert folded  # AWQ scaled a down projection's input here: its factor is in the up projection's scales
    checked = packed = 0
    for n in android_qdq.graph.node:
        props = meta.proto_props(n)
        if n.op_type != "DequantizeLinear" or meta.role_of(props) != meta.Role.WEIGHT:
            continue
        sources = props[meta.SOURCE].split(PACKED_SOURCE)
        packed += len(sources) == 3
        codes = np.concatenate([ios[s][0] for s in sources], axis=1).astype(np.int8)  # [K, N]
        # [K/32, N]; on ORT, an up projection's columns also hold the down projection's AWQ factor (fold_scalings)
        scale = np.concatenate([ios[s][1] * folded.get(s, np.float32(1)) for s in sources], axis=1)
        for s in sources:  # what Core ML stores is the ios18 QDQ ONNX's integers
            op = mil[mil_name(ios[s][2])]
            assert op.op_type == "constexpr_blockwise_shift_scale", s
            np.testing.assert_array_equal(np.asarray(op.data.val).astype(np.int8), ios[s][0].astype(np.int8))
            np.testing.assert_array_equal(np.asarray(op.scale.val), ios[s][1])
            np.testing.assert_array_equal(np.asarray(op.offset.val).astype(np.int8), ios[s][3].astype(np.int8))
        b = ort[f"{n.input[0]}_T"].reshape(codes.shape[1], -1)  # [N, K/2]: two codes per byte, low nibble first
        nibbles = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(codes.shape[1], -1).T.astype(np.int16)
        np.testing.assert_array_equal(nibbles - 8, codes)
        np.testing.assert_array_equal(android_inits[n.input[2]], np.concatenate([ios[s][3] for s in sources], axis=1))
        np.testing.assert_array_equal(ort[f"{n.input[1]}_T"].view(np.float32), scale.T.reshape(-1))
        checked += len(sources)
    assert packed == 2 and checked == 14  # 2 layers x 7 projections, query/key/value packed in each
    # the tied embedding/output table: int8 blocks along its rows in both (uint8 code + 128 in the .ort)
    table = next(v for k, v in ios.items() if k == "node_embedding")
    op = mil[mil_name(table[2])]
    np.testing.assert_array_equal(np.asarray(op.data.val), table[0])
    np.testing.assert_array_equal(ort["lm.lm_head.weight_quantized"].reshape(table[0].shape),
                                  (table[0].astype(np.int16) + 128).astype(np.uint8))
    np.testing.assert_array_equal(ort["lm.lm_head.weight_scale"].view(np.float32).reshape(table[1].shape), table[1])


def _factors_folded_into_columns(qdq: onnx.ModelProto, inits: dict) -> dict:
    """MatMul -> the factor edgeq.passes.fold_scalings moves into its columns on ORT: the scaling Mul's after
    ``g * MatMul(...)`` (a gated MLP's up projection)."""
    producer = {o: n for n in qdq.graph.node for o in n.output}
    out = {}
    for n in qdq.graph.node:
        if n.op_type == "Mul" and meta.role_of(meta.proto_props(n)) == meta.Role.SCALING:
            gate = producer.get(n.input[0])
            ups = [producer.get(i) for i in gate.input] if gate is not None and gate.op_type == "Mul" else []
            out.update({u.name: inits[n.input[1]] for u in ups if u is not None and u.op_type == "MatMul"})
    return out


@pytest.mark.slow
def test_every_package_is_validated_with_the_llm_metrics(built):
    res, _ = built
    rows = {r["target"]: r for r in res.summary}
    assert set(rows) == {"onnx (host)", "android", "ios18"}
    assert [s.status for s in res.stages].count("ok") == len(res.stages)
    pkg = {r["target"]: r for r in res.summary if r["target"] != "onnx (host)"}
    for r in pkg.values():
        assert {"perplexity_ratio", "kld_mean", "top1_agreement"} <= set(r["task"]), r
    assert rows["ios18"]["model"].endswith(".mlpackage") and rows["android"]["model"].endswith(".ort")
    # the same integers: the packages differ by their kernels' rounding only (the .ort's tied output layer
    # reads int8 activations, the .mlpackage runs in fp16)
    assert abs(pkg["android"]["task"]["perplexity_ratio"] - pkg["ios18"]["task"]["perplexity_ratio"]) < 0.02
    assert res.data["packages"][1]["target"] == "ios18"
