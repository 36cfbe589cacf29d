import dataclasses

import pytest

from edgeq.errors import InputError
from edgeq.quant.recipes import (
    ActFormat,
    Algorithms,
    CalibrationMethod,
    GPTQConfig,
    ProtectConfig,
    QuantSpec,
    Recipe,
    Rule,
    SmoothingConfig,
    SmoothingMethod,
    WeightFormat,
    exact_name_rule,
    load_recipe,
    preset,
    resolve_recipe,
)


def test_presets():
    assert preset("w8a8").default.activations == ActFormat.UINT8
    assert preset("w8a8").needs_calibration
    assert not preset("w8a16").needs_calibration
    r = preset("w4a16", block=64)
    assert r.default.weights == WeightFormat.INT4 and r.default.block == 64 and r.name == "w4a16-b64"
    assert preset("mxfp4").default.weights == WeightFormat.MXFP4
    with pytest.raises(InputError, match="unknown recipe 'w2'"):
        preset("w2")
    with pytest.raises(InputError, match="block size 48"):
        preset("w4a16", block=48)


def test_first_matching_rule_wins():
    r = resolve_recipe(preset("w4a16"))
    rules = (Rule(QuantSpec(WeightFormat.FLOAT), ("Gemm",)), Rule(QuantSpec(WeightFormat.INT8), (), r"embeddings"),
             Rule(QuantSpec(WeightFormat.MXFP4), ("Gather",)))
    rec = type(r)("t", r.default, rules)
    assert rec.spec_for("Gemm", "classifier") == (rules[0].spec, 1)
    assert rec.spec_for("Gather", "word_embeddings") == (rules[1].spec, 2)
    assert rec.spec_for("Gather", "other") == (rules[2].spec, 3)
    assert rec.spec_for("MatMul", "x") == (r.default, None)


def test_toml_recipe_loads_strictly(tmp_path):
    good = tmp_path / "r.toml"
    good.write_text(
        'name = "mine"\n[default]\nweights = "int4"\nblock = 64\n[calibration]\nmethod = "percentile"\n'
        '[[rules]]\nop = "Gather"\nweights = "int8"\n[[rules]]\nname = "classifier"\nweights = "float"\n'
    )
    rec = load_recipe(good)
    assert rec.name == "mine" and rec.default.block == 64 and rec.calibration.method == CalibrationMethod.PERCENTILE
    assert rec.rules[0].op_types == ("Gather",) and rec.rules[0].spec.weights == WeightFormat.INT8
    assert rec.rules[0].spec.block == 64  # rules inherit the default's fields
    assert rec.rules[1].spec.weights == WeightFormat.FLOAT
    cases = {
        'wieghts = "int4"\n': "the recipe: unknown key 'wieghts'",
        '[default]\nweight = "int4"\n': "\\[default\\]: unknown key 'weight'",
        '[[rules]]\nops = ["Gather"]\n': "rule 1: unknown key 'ops'",
        '[default]\nweights = "int3"\n': "weights = 'int3' is not one of",
        '[calibration]\nmethod = "magic"\n': "method = 'magic' is not one of 'minmax'",
        '[[rules]]\nname = "(("\n': "not a valid regular expression",
        'name = \n': "not valid TOML",
    }
    for text, msg in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(InputError, match=msg):
            load_recipe(bad)
    with pytest.raises(InputError, match="not found"):
        load_recipe(tmp_path / "missing.toml")


@pytest.mark.parametrize("text, message", [
    # the loader once read bool("false") as True
    ('[algorithms]\nbias_correction = "false"\n', "bias_correction must be true, false or a table"),
    ('[default]\nclip_search = "false"\n', "clip_search must be true or false, got 'false'"),
    ('[default]\nblock = 32.0\n', "block must be an integer, got 32.0"),
    ('[default]\nblock = true\n', "block must be an integer, got True"),
    ('[placement]\nquantize_model_inputs = 0\n', "quantize_model_inputs must be true or false, got 0"),
    ('[algorithms]\ngptq = {damp = "small"}\n', "gptq.*damp must be a number, got 'small'"),
    ('[algorithms]\ngptq = {dampening = 0.1}\n', "gptq: unknown key 'dampening'"),
    ('[algorithms]\nsmoothing = {method = "outliers", alpha = 2.0}\n', "alpha 2.0 is out of range"),
    ('[algorithms]\nadaround = true\n', "unknown algorithm 'adaround'"),
    ('[algorithms]\nrounding = "gptq"\n', "older recipe format"),
    ('[[rules]]\nname = "x"\nalgorithms = {gptq = 3}\n', "gptq must be true, false or a table"),
    ('[[rules]]\nop = 3\n', "op must be an op type or a list of them"),
    ('rules = 3\n', "rules must be an array of tables"),
    ('default = 3\n', "default must be a table"),
])
def test_wrong_types_name_the_key(tmp_path, text, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(InputError, match=message):
        load_recipe(bad)


def test_algorithm_tables_and_per_rule_settings(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[default]\nweights = "int4"\n[algorithms]\ngptq = {damp = 0.05}\nawq = true\nprotect = false\n'
                 '[[rules]]\nname = "lm_head"\nweights = "int8"\nalgorithms = {gptq = false, protect = {ratio = 8.0}}\n')
    rec = load_recipe(p)
    assert rec.algorithms == Algorithms(gptq=GPTQConfig(0.05), awq=rec.algorithms.awq)
    assert rec.algorithms_for("MatMul", "block.0.mlp").gptq == GPTQConfig(0.05)
    head = rec.algorithms_for("MatMul", "lm_head")
    assert head.gptq is None and head.protect == ProtectConfig(ratio=8.0) and head.awq is not None
    assert rec.spec_for("MatMul", "lm_head")[0].weights == WeightFormat.INT8
    assert rec.uses("protect") and rec.uses_calibration


def test_smoothing_alpha_defaults_follow_the_method():
    assert SmoothingConfig().alpha == 1.0
    assert SmoothingConfig(SmoothingMethod.SMOOTHQUANT).alpha == 0.5


def test_awq_is_refused_where_activations_are_quantized(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[default]\nactivations = "uint8"\n[algorithms]\nawq = true\n')
    with pytest.raises(InputError, match="awq is for weight-only recipes"):
        load_recipe(p)


@pytest.mark.parametrize("node", ["node_MatMul_154", "/encoder/layer.0/attention/self/query/MatMul",
                                  "a-b.c[0]+d", 'quote"and\\backslash', "tab\tname"])
def test_printed_exact_name_rules_load_back_and_match_only_their_node(tmp_path, node):
    """The rules `--budget` and the Android pre-flight print for pasting (once broken by re.escape in TOML)."""
    p = tmp_path / "r.toml"
    p.write_text('[default]\nweights = "int4"\n' + exact_name_rule(node, 'weights = "int8"'))
    rec = load_recipe(p)
    assert rec.spec_for("MatMul", node)[0].weights == WeightFormat.INT8
    assert rec.spec_for("MatMul", node + "x")[0].weights == WeightFormat.INT4
    assert rec.spec_for("MatMul", "x" + node)[0].weights == WeightFormat.INT4


def test_a_recipe_is_frozen_data():
    rec = preset("w8a8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.name = "x"  # type: ignore[misc]
    assert isinstance(rec, Recipe) and rec.with_algorithms(smoothing=None).algorithms.smoothing is None
    assert rec.algorithms.smoothing is not None  # the original is unchanged


def test_the_readme_recipe_loads(tmp_path):
    """The TOML example in the README is a recipe the loader accepts, with the keys it shows."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    text = re.search(r"```toml\n(.*?)```", readme, re.S).group(1)
    path = tmp_path / "readme.toml"
    path.write_text(text)
    rec = load_recipe(path)
    assert rec.default.weights == WeightFormat.INT4 and rec.default.tied_table == WeightFormat.INT8
    assert len(rec.rules) == 3
