import pytest

from edgeq.errors import InputError
from edgeq.quant.recipes import ActFormat, QuantSpec, Rule, WeightFormat, load_recipe, preset, resolve_recipe


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
    assert rec.name == "mine" and rec.default.block == 64 and rec.calibration.method == "percentile"
    assert rec.rules[0].op_types == ("Gather",) and rec.rules[0].spec.weights == WeightFormat.INT8
    assert rec.rules[0].spec.block == 64  # rules inherit the default's fields
    assert rec.rules[1].spec.weights == WeightFormat.FLOAT
    cases = {
        'wieghts = "int4"\n': "unknown key 'wieghts' in the recipe",
        '[default]\nweight = "int4"\n': "unknown key 'weight' in \\[default\\]",
        '[[rules]]\nops = ["Gather"]\n': "unknown key 'ops' in rule 1",
        '[default]\nweights = "int3"\n': "weights = 'int3' is not one of",
        '[calibration]\nmethod = "magic"\n': "unknown calibration method 'magic'",
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
