"""Recipe gguf: a GGUF's Q4_0/Q4_1/Q8_0 integers kept bit for bit through the QDQ ONNX and the Android .ort.

The tiny GGUFs are written in code (tests/llm/tiny_gguf.py); their float reference is the file's
integers dequantized, as transformers loads a GGUF.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tiny_gguf import HEADS, KEPT_LAYER_TYPES, KV_HEADS, LAYER_TYPES, tiny_gguf, unpermute

from edgeq.errors import InputError
from edgeq.quant import calibrate as calibrate_mod
from edgeq.quant.gguf_blocks import GGUF_FILE_KEY, BlockOffsetTensor, GGUFRows, blocks_of, to_quantized

gguf = pytest.importorskip("gguf", reason="pip install 'edgeq[llm]' (the gguf package)")

ACCURACY_0 = {"session.qdq_matmulnbits_accuracy_level": "0"}  # fp32 compute in the fused MatMulNBits


def _random_rows(qtype: str, rows: int = 6, k: int = 96, seed: int = 0) -> np.ndarray:
    """GGUF bytes of random values in ``qtype``, with a block whose values are all equal (d = 0) in Q4_1."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, k)) * 0.05).astype(np.float32)
    x[1, 32:64] = 0.0371  # Q4_1: d = 0, m = 0.0371; Q4_0 / Q8_0: a constant block
    x[2, :32] = 0.0
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_read_as_the_gguf_package_dequantizes_them(qtype):
    raw = _random_rows(qtype)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32)
    blocks = blocks_of(raw, qtype)
    np.testing.assert_array_equal(blocks.dequantize(), want)
    for axis, oriented in ((1, want), (0, want.T)):  # a Gather table [rows, K] / a MatMul weight [K, rows]
        q = to_quantized(blocks, axis)
        assert q.block_size == 32 and q.axis == axis and q.zero_point is None
        assert q.dtype == ("int8" if qtype == "Q8_0" else "int4")
        assert qtype == "Q4_1" or np.all(q.scale != 0)  # a d = 0 Q4_0/Q8_0 block gets scale 1 and codes 0
        if qtype == "Q4_1":
            assert isinstance(q, BlockOffsetTensor) and q.inexact_offsets == 0
            np.testing.assert_array_equal(q.scale[q.scale == 0], 0)  # d = 0: the offset m carries the value
        np.testing.assert_array_equal(q.dequantize(), oriented)  # bit for bit


def test_rows_are_found_by_value_whatever_their_order(tmp_path):
    raw = _random_rows("Q4_1", rows=8)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    rows = GGUFRows(tmp_path / "m.gguf")
    values = blocks_of(raw, "Q4_1").dequantize()
    order = np.array([3, 0, 7, 5])
    found = rows.find(values[order])
    assert [(s.tensor, s.row) for s in found] == [("blk.0.attn_q.weight", int(r)) for r in order]
    np.testing.assert_array_equal(rows.blocks(found).q, blocks_of(raw, "Q4_1").q[order])
    assert rows.find(values[:1] + 1.0) == [None]


def test_a_missing_gguf_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        GGUFRows(tmp_path / "gone.gguf")


def test_a_model_not_exported_from_a_gguf_is_an_input_error(tmp_path):
    from edgeq.pipeline.quantize import quantize_model

    rng = np.random.default_rng(0)
    w = ", ".join(f"{v:.4f}" for v in rng.standard_normal(64 * 32))
    model = onnx.parser.parse_model(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[1, 64] x) => (float[1, 32] y) <float[64, 32] w = {{{w}}}> {{ y = MatMul (x, w) }}
    """)
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(InputError, match="does not name one") as e:
        quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", "gguf", progress=False)
    assert "keep_gguf = {file" in e.value.hint
    assert not (tmp_path / "q.onnx").exists()


# ---- the tiny Llama, written as a GGUF, exported (slow: an export each) ---------------------------

def _exported(tmp_path_factory, layer_types, name):
    from edgeq.export.causal_lm import export_causal_lm

    root = tmp_path_factory.mktemp(name)
    model, types = tiny_gguf(root / "tiny.gguf", layer_types=layer_types)
    export_causal_lm(model, root / "tiny.onnx", gguf_file=root / "tiny.gguf")
    return root, types


@pytest.fixture(scope="module")
def kept_only(tmp_path_factory):
    """Every projection Q4_0/Q4_1/Q8_0, the table Q8_0: everything is kept."""
    return _exported(tmp_path_factory, KEPT_LAYER_TYPES, "gguf_kept")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Layer 0: q/k/v of three types (not packed into one MatMul on ONNX Runtime) and a Q6_K down_proj."""
    return _exported(tmp_path_factory, LAYER_TYPES, "gguf_mixed")


def _quantize(root, profile, **kw):
    from edgeq.pipeline.quantize import quantize_model

    out = root / f"q.{profile}.onnx"
    return quantize_model(root / "tiny.onnx", out, "gguf", profile=profile, force=True, progress=False, **kw), out


def _logits(path, feed, config=None):
    from edgeq.runtime import ort_session

    return ort_session(path, config=config).run(["logits"], feed)[0]


def _feed(root):
    from edgeq.export.causal_lm import empty_cache, read_facts, step_feed

    model = onnx.load(str(root / "tiny.onnx"), load_external_data=False)
    facts = read_facts({p.key: p.value for p in model.metadata_props})
    ids = np.random.default_rng(0).integers(3, 256, (1, 20))
    return step_feed(ids, empty_cache(facts))


def _gguf_rows(root, name):
    """The file's blocks of tensor ``name``, q/k rows permuted back as transformers does for RoPE (rows only:
    the blocks run along the input dimension and stay whole)."""
    r = gguf.GGUFReader(str(root / "tiny.gguf"))
    t = next(t for t in r.tensors if t.name == name)
    b = blocks_of(t.data, t.tensor_type.name)
    heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(name.split(".")[-2])
    return b if heads is None else b.take(unpermute(np.arange(b.q.shape[0]), heads))


@pytest.mark.slow
def test_the_export_records_its_gguf(kept_only):
    root, _ = kept_only
    meta = {p.key: p.value for p in onnx.load(str(root / "tiny.onnx"), load_external_data=False).metadata_props}
    assert meta[GGUF_FILE_KEY] == str((root / "tiny.gguf").resolve())


@pytest.mark.slow
def test_every_block_round_trips_through_the_qdq_ir(kept_only):
    """profile onnx-reference (plain DequantizeLinear form, no fusions): each kept weight's DQ initializers are
    the file's codes and scales, and the model computes the float reference's logits up to float rounding."""
    from edgeq.validate.metrics import sqnr_db

    root, types = kept_only
    res, out = _quantize(root, "onnx-reference")
    keep = res.plan.result("keep_gguf")
    assert keep.summary.startswith(f"kept {len(types)} weights") and "0 re-quantized" in keep.summary
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for d in res.plan.weights:
        source = d.reason.split("GGUF ")[1].split(" (")[0]  # "Q4_1 blk.0.attn_q.weight"
        qtype, name = source.split(" ", 1)
        want = _gguf_rows(root, name)
        prefix = f"{d.node}/{d.weight}" if not d.form.startswith("tied_") else d.weight
        codes = inits[f"{prefix}_quantized"].astype(np.int16)
        scale = inits.get(f"{prefix}_scale", inits.get(f"{prefix}_scale_half"))  # Q4_1: the file's float16 d
        if d.op_type == "MatMul" and not d.form.startswith("tied_"):
            codes, scale = codes.T, scale.T
        np.testing.assert_array_equal(codes + (0 if qtype == "Q8_0" else 8), want.q.astype(np.int16), err_msg=name)
        np.testing.assert_array_equal(scale.astype(np.float32), want.d.astype(np.float32), err_msg=name)
        if qtype == "Q4_1":
            assert scale.dtype == inits[f"{prefix}_minimum"].dtype == np.float16  # the file's own bytes
            np.testing.assert_array_equal(inits[f"{prefix}_minimum"].T.view(np.uint16), want.m.view(np.uint16))
    feed = _feed(root)
    ref = _logits(root / "tiny.onnx", feed)
    assert sqnr_db(ref, _logits(out, feed, ACCURACY_0)) > 100.0  # measured 117 dB: float rounding only


@pytest.mark.slow
def test_the_android_ort_carries_the_same_integers(kept_only, tmp_path):
    """The .ort's MatMulNBits weights are the file's nibbles (Q4_x: codes q unchanged, as MatMulNBits' default zero
    point 8 reads them) and its scales the file's d; the .ort computes what its QDQ ONNX computes."""
    from edgeq.pipeline.package import package_model
    from edgeq.validate.metrics import sqnr_db
    from targets.android import ortformat

    root, _ = kept_only
    res, out = _quantize(root, "android")
    package_model(out, "android", tmp_path / "pkg", force=True)
    data = (tmp_path / "pkg" / "model.ort").read_bytes()
    g = ortformat._root(data).Model().Graph()
    stored = {g.Initializers(i).Name().decode(): g.Initializers(i).RawDataAsNumpy() for i in range(g.InitializersLength())}
    for d in res.plan.weights:
        if d.op_type != "MatMul" or d.form.startswith("tied_"):
            continue
        names = d.reason.split("GGUF ")[1].split(" (")[0].split(" ", 1)[1].split(" + ")
        blocks = [_gguf_rows(root, n) for n in names]
        q = np.concatenate([b.q for b in blocks])  # packed q/k/v: rows one after another
        if d.form == "matmulnbits":  # the scales: the file's d, kept float16 in the .ort (cast at run time)
            scales = stored[f"{d.node}/{d.weight}_nbits_scales_half"].view(np.float16)
            np.testing.assert_array_equal(scales, np.concatenate([b.d for b in blocks]).astype(np.float16).reshape(-1))
        b = stored[f"{d.node}/{d.weight}_" + ("nbits" if d.form == "matmulnbits" else "quantized_T")]
        if q.dtype == np.int8:  # Q8_0: uint8 codes + 128 (its explicit zero point 128)
            rows_bytes = (q.astype(np.int16) + 128).astype(np.uint8)
        else:
            rows_bytes = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
        got = b.reshape(q.shape[0], -1)
        np.testing.assert_array_equal(got, rows_bytes, err_msg=", ".join(names))
    table = _gguf_rows(root, "token_embd.weight")
    np.testing.assert_array_equal(stored["lm.lm_head.weight_quantized"].reshape(table.q.shape),
                                  (table.q.astype(np.int16) + 128).astype(np.uint8))
    assert not any(v.dtype == np.float32 and n.endswith("_scales") for n, v in stored.items())  # none widened
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert "ConstantFolding" in manifest["conversion"]["disabled_optimizers"] and manifest["conversion"]["float16_constants"]
    feed = _feed(root)
    got = _logits(out, feed)
    np.testing.assert_array_equal(_logits(tmp_path / "pkg" / "model.ort", feed), got)
    # Q4 projections at accuracy level 0 (fp32); Q8_0 weights (the tied output layer, two projections) read with
    # int8 activations, ORT's fast 8-bit kernel (its fp32 one is ~60x slower): measured 39.1 dB on this tiny model
    assert sqnr_db(_logits(root / "tiny.onnx", feed), got) > 35.0


@pytest.mark.slow
def test_the_plan_says_what_was_kept_and_what_was_requantized(mixed):
    root, _ = mixed
    res, _ = _quantize(root, "onnxruntime-cpu")
    keep = res.plan.result("keep_gguf")
    lines = "\n".join(keep.details)
    assert "re-quantized by the recipe: blk.0.ffn_down.weight: GGUF Q6_K is a K-quant" in lines
    # the plan is made on the unpacked graph (ORT packs q/k/v after quantization): each keeps its own type
    for name, kind in (("attn_q", "Q4_1"), ("attn_k", "Q4_0"), ("attn_v", "Q8_0")):
        assert f"kept GGUF {kind} blk.0.{name}.weight" in lines
    assert "kept GGUF Q4_1 blk.1.attn_q.weight" in lines
    assert "kept GGUF Q8_0 token_embd.weight" in lines
    requantized = [d for d in res.plan.weights if d.reason.startswith("re-quantized")]
    assert len(requantized) == 1 and all(d.format.value == "int4" and not d.symmetric for d in requantized)
    explained = res.plan.explain()
    assert "kept: GGUF Q4_0 blk.1.attn_output.weight" in explained


@pytest.mark.slow
def test_a_profile_without_int4_requantizes_the_q4_weights(kept_only):
    root, _ = kept_only
    res, out = _quantize(root, "ios17")
    lines = "\n".join(res.plan.result("keep_gguf").details)
    assert "(Q4_1): iOS 17 Core ML has no int4 block weights" in lines
    assert "kept GGUF Q8_0" in lines
    meta = {p.key for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert GGUF_FILE_KEY not in meta  # a local path: not carried into what ships


@pytest.mark.slow
def test_the_ios18_package_carries_the_same_integers(kept_only, tmp_path):
    """Core ML iOS 18: every kept weight is a constexpr_blockwise_shift_scale holding the QDQ ONNX's codes (Q4_1's
    offset term is ordinary MIL ops); the reference executor (fp16) computes what the QDQ ONNX computes."""
    from edgeq.pipeline.package import package_model
    from edgeq.validate.metrics import sqnr_db
    from targets.coreml.executor import load_program
    from targets.coreml.lower.context import mil_name
    from targets.coreml.runner import MLPackageRunner

    root, _ = kept_only
    res, out = _quantize(root, "ios18")
    assert "0 re-quantized" in res.plan.result("keep_gguf").summary
    package_model(out, "ios18", tmp_path / "pkg", force=True)
    pkg = next((tmp_path / "pkg").glob("*.mlpackage"))
    prog, _ = load_program(pkg)
    ops = {op.name: op for op in prog.functions["main"].operations}
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weights) == len(res.plan.weights) - 1  # the tied table: one DequantizeLinear for its two readers
    for n in weights:
        op = ops[mil_name(n.output[0])]
        assert op.op_type == "constexpr_blockwise_shift_scale", n.name
        np.testing.assert_array_equal(np.asarray(op.data.val).astype(np.int8), inits[n.input[0]].astype(np.int8))
    # the package keeps its KV cache as Core ML state: an 8-token prefill, then a 12-token chunk, each model
    # on its own cache (the QDQ ONNX as written, fp32 DQ -> MatMul, not int8 activations)
    from edgeq.generate import CausalLM
    from edgeq.validate.runners import SessionRunner, session_input_spec

    ids = np.random.default_rng(0).integers(3, 256, 20).tolist()
    from edgeq.runtime import ort_session

    sess = ort_session(out, config=ACCURACY_0)
    results = []
    for lm in (CausalLM(SessionRunner("qdq", sess, [session_input_spec(i) for i in sess.get_inputs()])),
               CausalLM(MLPackageRunner(pkg))):
        _, cache = lm.step(ids[:8], lm.empty_cache())
        results.append(lm.step(ids[8:], cache)[0])
    want, got = results
    assert sqnr_db(want, got) > 40.0  # fp16 compute: measured 49 dB


@pytest.mark.slow
def test_quantize_takes_the_gguf_file_itself(kept_only, tmp_path, monkeypatch):
    """``edgeq quantize model.gguf --recipe gguf`` exports first (into a temporary folder, removed) and
    writes the same integers as an export followed by quantize. transformers cannot load the tiny GGUF
    (it lacks the metadata a full file has), so the loader returns the float reference it was written from."""
    from edgeq import api
    from edgeq.export import causal_lm

    root, _ = kept_only
    model, _ = tiny_gguf(tmp_path / "tiny.gguf", layer_types=KEPT_LAYER_TYPES)
    monkeypatch.setattr(causal_lm, "load_causal_lm",
                        lambda p: causal_lm.LoadedCausalLM(model, None, "tiny", gguf_file=str(p)))
    _, via_onnx = _quantize(root, "onnx-reference")
    out = tmp_path / "out" / "direct.onnx"
    res = api.quantize(tmp_path / "tiny.gguf", out, "gguf", profile="onnx-reference", progress=False)
    assert res.plan.result("keep_gguf").summary.startswith("kept ")
    want = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(via_onnx)).graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert got.keys() == want.keys()
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)
    assert [p.name for p in out.parent.iterdir()] == ["direct.onnx"]  # the exported float model is gone


@pytest.mark.slow
def test_calibration_data_is_not_spent_on_kept_weights(kept_only, monkeypatch):
    """Every weight kept: GPTQ asks for no statistics; what --calib is still read for (where sequences start) is
    a model input, read from the feeds without running the model."""
    from edgeq.pipeline import quantize as qmod

    root, _ = kept_only
    observed, sessions = [], []
    real_calibrate, real_session = qmod.calibrate, calibrate_mod.ort_session
    monkeypatch.setattr(qmod, "calibrate", lambda model, statistics, feeds, **kw: (
        observed.extend(statistics), real_calibrate(model, statistics, feeds, **kw))[1])
    monkeypatch.setattr(calibrate_mod, "ort_session", lambda *a, **kw: (sessions.append(1), real_session(*a, **kw))[1])
    res, _ = _quantize(root, "onnx-reference", calib=[_feed(root)])
    assert res.plan.result("keep_gguf").summary.startswith("kept ")
    assert set(observed) <= {"input_ids", "attention_mask", "position_ids"} and sessions == []


@pytest.mark.slow
def test_a_recipe_asking_an_int4_tied_table_requantizes_the_q8_0_table(kept_only, tmp_path):
    """keep_gguf with ``tied_table = "int4"``: the projections keep the file's integers, the Q8_0 table is
    re-quantized int4 with zero points (the asked format, half the bytes)."""
    from edgeq.pipeline.quantize import quantize_model

    root, _ = kept_only
    recipe = tmp_path / "gguf_tied4.toml"
    recipe.write_text('name = "gguf-tied4"\n[default]\nweights = "int4"\ntied_table = "int4"\n'
                      "[algorithms]\nkeep_gguf = {}\n")
    res = quantize_model(root / "tiny.onnx", tmp_path / "q.onnx", recipe, profile="android", progress=False)
    lines = "\n".join(res.plan.result("keep_gguf").details)
    assert "token_embd.weight (Q8_0): the recipe's tied_table asks int4" in lines
    assert "kept GGUF Q8_0 token_embd.weight" not in lines and "kept GGUF Q4_1" in lines
    tied = [d for d in res.plan.weights if d.form.startswith("tied_")]
    assert {d.format.value for d in tied} == {"int4"} and not any(d.symmetric for d in tied)
    assert res.plan.codes[tied[0].weight].zero_point is not None


@pytest.mark.slow
def test_float32_constants_run_no_casts_and_keep_the_logits(kept_only, tmp_path):
    """keep_gguf float32_constants: the .ort's MatMulNBits read the file's d (and Q4_1's m + 8d) as float32 constants,
    with no Cast or offset arithmetic left to run per call; its logits equal the float16 form's bit for bit."""
    from edgeq.pipeline.package import package_model
    from edgeq.pipeline.quantize import quantize_model
    from targets.android import ortformat

    root, _ = kept_only
    recipe = tmp_path / "gguf_f32.toml"
    recipe.write_text('name = "gguf-f32"\n[default]\nweights = "int4"\nblock = 32\ntied_table = "int8"\n'
                      "[algorithms]\nkeep_gguf = {float32_constants = true}\n")
    wide = root / "q.android.f32.onnx"
    res = quantize_model(root / "tiny.onnx", wide, recipe, profile="android", force=True, progress=False)
    _, half = _quantize(root, "android")
    graphs = {}
    for name, out in (("wide", wide), ("half", half)):
        package_model(out, "android", tmp_path / name, force=True)
        g = ortformat._root((tmp_path / name / "model.ort").read_bytes()).Model().Graph()
        graphs[name] = ({g.Initializers(i).Name().decode(): g.Initializers(i).RawDataAsNumpy()
                         for i in range(g.InitializersLength())},
                        [g.Nodes(i).OpType().decode() for i in range(g.NodesLength())])
    stored, ops = graphs["wide"]
    nbits = [d for d in res.plan.weights if d.form == "matmulnbits"]
    assert nbits and any("Q4_1" in d.reason for d in nbits)
    for d in nbits:
        assert d.scale_dtype == "float32" and "stored as float32" in d.reason
        names = d.reason.split("GGUF ")[1].split(" (")[0].split(";")[0].split(" ", 1)[1].split(" + ")
        blocks = [_gguf_rows(root, n) for n in names]
        prefix = f"{d.node}/{d.weight}"
        np.testing.assert_array_equal(stored[f"{prefix}_nbits_scales"].view(np.float32),
                                      np.concatenate([b.d for b in blocks]).astype(np.float32).reshape(-1))
        if blocks[0].m is not None:  # Q4_1: the offset m + 8d [K/32, N], the float32 sum the graph form computes
            m = np.concatenate([b.m for b in blocks]).T.astype(np.float32)
            d32 = np.concatenate([b.d for b in blocks]).T.astype(np.float32)
            np.testing.assert_array_equal(stored[f"{prefix}_offset"].view(np.float32).reshape(m.shape),
                                          m + np.float32(8.0) * d32)
    assert ops.count("Cast") < graphs["half"][1].count("Cast") and "Transpose" not in ops
    manifest = json.loads((tmp_path / "wide" / "manifest.json").read_text())
    assert "float16_constants" not in manifest["conversion"]
    feed = _feed(root)
    np.testing.assert_array_equal(_logits(tmp_path / "wide" / "model.ort", feed),
                                  _logits(tmp_path / "half" / "model.ort", feed))
