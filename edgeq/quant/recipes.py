"""Recipes: what to quantize and how, as frozen data.

A recipe has a default :class:`QuantSpec` and ordered rules; a rule matches a node by op type
and/or a regular expression on its name, and the first match wins. A rule whose spec is
``FLOAT`` excludes the node. Presets: ``w8a8``, ``w8a16``, ``w4a16`` (block 32/64/128) and
``mxfp4``. TOML recipes load through :func:`load_recipe`, which rejects unknown keys by name.

TOML form::

    name = "my-recipe"
    [default]
    weights = "int4"        # float | int8 | int4 | mxfp4
    block = 32              # int4/mxfp4 block size along the reduction axis
    asymmetric = true       # int4 MatMul/Gemm/Conv: zero point per block
    activations = "float"   # float | uint8 | int8
    [calibration]
    method = "minmax"       # minmax | percentile | entropy | mse
    percentile = 99.99
    [algorithms]
    smoothing = "outliers"  # W8A8 activation smoothing: off | outliers | smoothquant
    smoothing_alpha = 1.0   # migration strength (outliers: (0, 1]; smoothquant: (0, 1), e.g. 0.5)
    bias_correction = true  # Conv/Gemm: cancel the output mean shift of weight rounding (uses calibration)
    quantize_model_inputs = false  # W8A8: leave graph inputs float (the first layer reads them in float)
    rounding = "gptq"       # MatMul/Gemm weights: nearest | gptq (error compensation from calibration; falls
                            # back to nearest, with a note, when no calibration data is given)
    gptq_damp = 0.01        # GPTQ: λ = damp · mean(diag H) added to the Hessian
    awq = false             # weight-only int4: activation-aware per-channel scaling (AWQ) from calibration
    protect_outliers = true # MatMul inputs: the few outlier channels (activation or weight rows) run in float
    protect_ratio = 4.0     #   a channel is an outlier above ratio × the 90th percentile of channel maxima
    protect_max_channels = 4  # at most this many per activation
    conv_rounding = "hessian"  # int8 Conv codes chosen for the layer output on the calibration data:
                              # nearest | hessian (every Conv) | hessian-small (stem and depthwise only)
    [[rules]]
    op = ["Gather"]         # optional: op types
    name = "embeddings"     # optional: regex searched in the node name
    weights = "int8"        # the spec fields; weights = "float" keeps the node float
"""

from __future__ import annotations

import enum
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgeq.errors import InputError


class WeightFormat(str, enum.Enum):
    FLOAT = "float"
    INT8 = "int8"  # symmetric, per output channel
    INT4 = "int4"  # symmetric, blocks along the reduction axis
    MXFP4 = "mxfp4"  # float4e2m1 with a power-of-two scale per 32 (OCP MX)


class ActFormat(str, enum.Enum):
    FLOAT = "float"
    UINT8 = "uint8"  # asymmetric per tensor
    INT8 = "int8"  # symmetric per tensor


BLOCK_SIZES = (16, 32, 64, 128, 256)
OBSERVERS = ("minmax", "percentile", "entropy", "mse")
SMOOTHING = ("off", "outliers", "smoothquant")
ROUNDING = ("nearest", "gptq")
CONV_ROUNDING = ("nearest", "hessian", "hessian-small")  # see edgeq.quant.rounding


@dataclass(frozen=True)
class QuantSpec:
    """How one node is quantized: its weight format and its activation format."""

    weights: WeightFormat = WeightFormat.INT8
    block: int = 32
    activations: ActFormat = ActFormat.FLOAT
    clip_search: bool = True  # int4: per-block MSE-optimal clipping instead of plain max
    asymmetric: bool = True  # int4 for MatMul/Gemm/Conv: a zero point per block (embedding tables stay symmetric)

    def __post_init__(self) -> None:
        if self.weights in (WeightFormat.INT4, WeightFormat.MXFP4) and self.block not in BLOCK_SIZES:
            raise InputError(f"block size {self.block} is not supported", hint=f"use one of {BLOCK_SIZES}")
        if self.weights == WeightFormat.MXFP4 and self.block != 32:
            raise InputError("mxfp4 uses blocks of 32 (the OCP MX rule)", hint="drop block or set block = 32")

    @property
    def is_float(self) -> bool:
        return self.weights == WeightFormat.FLOAT and self.activations == ActFormat.FLOAT

    def describe(self) -> str:
        w = self.weights.value + (f"/b{self.block}" if self.weights in (WeightFormat.INT4, WeightFormat.MXFP4) else "")
        return f"w:{w} a:{self.activations.value}"


FLOAT = QuantSpec(weights=WeightFormat.FLOAT, activations=ActFormat.FLOAT)


@dataclass(frozen=True)
class Rule:
    """Match by op type (any of ``op_types``; empty = any) and name regex; first match wins."""

    spec: QuantSpec
    op_types: tuple[str, ...] = ()
    name: str | None = None

    def __post_init__(self) -> None:
        if self.name is not None:
            try:
                re.compile(self.name)
            except re.error as e:
                raise InputError(f"rule name pattern {self.name!r} is not a valid regular expression: {e}") from e

    def matches(self, op_type: str, node_name: str) -> bool:
        if self.op_types and op_type not in self.op_types:
            return False
        return self.name is None or re.search(self.name, node_name) is not None


@dataclass(frozen=True)
class CalibrationConfig:
    method: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.method not in OBSERVERS:
            raise InputError(f"unknown calibration method {self.method!r}", hint=f"use one of {', '.join(OBSERVERS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise InputError(f"percentile {self.percentile} must be in (50, 100]")


@dataclass(frozen=True)
class Recipe:
    name: str
    default: QuantSpec
    rules: tuple[Rule, ...] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    smoothing: str = "off"  # activation smoothing before W8A8 (see edgeq.quant.smooth): off | outliers | smoothquant
    smoothing_alpha: float = 1.0
    bias_correction: bool = False  # shift Conv/Gemm biases by the mean error weight rounding causes (needs calibration)
    # Quantize graph inputs that feed quantized ops? Off in w8a8: an image is already 8-bit pixels,
    # and a second rounding on another grid before the most sensitive layer cost 3.3 dB of logit
    # SQNR on EfficientNet-Lite0; the first layer then reads its input in float.
    quantize_model_inputs: bool = True
    rounding: str = "nearest"  # MatMul/Gemm weights: "gptq" compensates rounding errors (edgeq.quant.gptq)
    gptq_damp: float = 0.01
    awq: bool = False  # int4 MatMuls of weight-only recipes: activation-aware input scaling (edgeq.quant.awq)
    protect_outliers: bool = False  # outlier channels of MatMul inputs bypass quantization (edgeq.quant.protect)
    protect_ratio: float = 4.0
    protect_max_channels: int = 4
    # int8 Conv weights: "hessian" picks the codes that minimise each layer's output error on the
    # calibration data (edgeq.quant.rounding), "hessian-small" only for the stem and depthwise
    # convs (fan-in <= 32 per group); "nearest" rounds each weight to its nearest code.
    conv_rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDING:
            raise InputError(f"unknown rounding {self.rounding!r}", hint=f"use one of {', '.join(ROUNDING)}")
        if self.awq and self.quantizes_activations:
            raise InputError("awq is for weight-only recipes (activations float)",
                             hint="for W8A8 use smoothing = \"outliers\" or \"smoothquant\"")
        if self.protect_ratio <= 1.0 or not 1 <= self.protect_max_channels <= 64:
            raise InputError(f"protect_ratio {self.protect_ratio} / protect_max_channels {self.protect_max_channels} "
                             "out of range", hint="protect_ratio > 1 (e.g. 4), protect_max_channels in 1..64")
        if not 0.0 < self.gptq_damp <= 1.0:
            raise InputError(f"gptq_damp {self.gptq_damp} is out of range", hint="use a value in (0, 1], e.g. 0.01")
        if self.conv_rounding not in CONV_ROUNDING:
            raise InputError(f"unknown conv_rounding {self.conv_rounding!r}", hint=f"use one of {', '.join(CONV_ROUNDING)}")
        if self.smoothing not in SMOOTHING:
            raise InputError(f"unknown smoothing {self.smoothing!r}", hint=f"use one of {', '.join(SMOOTHING)}")
        hi_ok = self.smoothing_alpha < 1.0 if self.smoothing == "smoothquant" else self.smoothing_alpha <= 1.0
        if not (0.0 < self.smoothing_alpha and hi_ok):
            raise InputError(f"smoothing_alpha {self.smoothing_alpha} is out of range for {self.smoothing}",
                             hint="outliers: (0, 1], smoothquant: (0, 1)")

    def spec_for(self, op_type: str, node_name: str) -> tuple[QuantSpec, int | None]:
        """The spec for a node and the 1-based index of the rule that chose it (None: default)."""
        for i, rule in enumerate(self.rules, start=1):
            if rule.matches(op_type, node_name):
                return rule.spec, i
        return self.default, None

    @property
    def quantizes_activations(self) -> bool:
        specs = [self.default, *(r.spec for r in self.rules)]
        return any(s.activations != ActFormat.FLOAT for s in specs)

    @property
    def needs_calibration(self) -> bool:
        """Calibration data is required (activation ranges, bias correction)."""
        return self.quantizes_activations or self.bias_correction or self.conv_rounding != "nearest"

    @property
    def uses_calibration(self) -> bool:
        """Calibration data is used when given (GPTQ falls back to nearest rounding without it)."""
        return self.needs_calibration or self.rounding == "gptq" or self.awq or self.protect_outliers


def preset(name: str, *, block: int | None = None) -> Recipe:
    """A built-in recipe: ``w8a8``, ``w8a16``, ``w4a16`` (``block`` 32/64/128) or ``mxfp4``."""
    if name == "w8a8":
        # MSE-optimal ranges, outlier protection then smoothing, bias correction: the best measured on
        # MiniLM (mean cosine 0.9980 → 0.9992 with protection) and EfficientNet-Lite0; data-aware Conv
        # rounding: EfficientNet-Lite0 logit SQNR 19.7 -> 26.2 dB (no Conv in MiniLM)
        return Recipe("w8a8", QuantSpec(WeightFormat.INT8, activations=ActFormat.UINT8),
                      calibration=CalibrationConfig("mse"), smoothing="outliers", smoothing_alpha=1.0,
                      bias_correction=True, quantize_model_inputs=False, protect_outliers=True,
                      conv_rounding="hessian")
    if name == "w8a16":
        return Recipe("w8a16", QuantSpec(WeightFormat.INT8))
    if name == "w4a16":
        # AWQ + GPTQ when calibration data is given (nearest rounding without). MiniLM block 32 mean
        # cosine: nearest 0.973, AWQ 0.981, GPTQ 0.987, AWQ + GPTQ 0.988 (+70 KB of input scales)
        return Recipe(f"w4a16-b{block or 32}", QuantSpec(WeightFormat.INT4, block=block or 32), rounding="gptq",
                      awq=True)
    if name == "mxfp4":
        if block not in (None, 32):
            raise InputError("mxfp4 uses blocks of 32 (the OCP MX rule)")
        return Recipe("mxfp4", QuantSpec(WeightFormat.MXFP4, block=32))
    raise InputError(f"unknown recipe {name!r}", hint="use w8a8, w8a16, w4a16, mxfp4 or a .toml file")


PRESETS = ("w8a8", "w8a16", "w4a16", "mxfp4")

_SPEC_KEYS = {"weights", "block", "activations", "clip_search", "asymmetric"}
_RULE_KEYS = _SPEC_KEYS | {"op", "name"}
_TOP_KEYS = {"name", "default", "calibration", "rules", "algorithms"}
_ALGO_KEYS = {"smoothing", "smoothing_alpha", "bias_correction", "quantize_model_inputs", "rounding", "gptq_damp", "awq",
              "protect_outliers", "protect_ratio", "protect_max_channels", "conv_rounding"}
_CAL_KEYS = {"method", "percentile"}


def _strict(table: Mapping, allowed: set[str], where: str, path: Path) -> None:
    for key in table:
        if key not in allowed:
            raise InputError(
                f"{path}: unknown key {key!r} in {where}", hint=f"allowed keys: {', '.join(sorted(allowed))}"
            )


def _enum(cls, value, key: str, where: str, path: Path):
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(m.value for m in cls)
        raise InputError(f"{path}: {where}: {key} = {value!r} is not one of {allowed}") from None


def _spec(table: Mapping, where: str, path: Path, base: QuantSpec | None = None) -> QuantSpec:
    base = base or QuantSpec()
    kwargs = {}
    if "weights" in table:
        kwargs["weights"] = _enum(WeightFormat, table["weights"], "weights", where, path)
    if "activations" in table:
        kwargs["activations"] = _enum(ActFormat, table["activations"], "activations", where, path)
    if "block" in table:
        if not isinstance(table["block"], int):
            raise InputError(f"{path}: {where}: block must be an integer")
        kwargs["block"] = table["block"]
    if "clip_search" in table:
        kwargs["clip_search"] = bool(table["clip_search"])
    if "asymmetric" in table:
        kwargs["asymmetric"] = bool(table["asymmetric"])
    try:
        return replace(base, **kwargs)
    except InputError as e:
        raise InputError(f"{path}: {where}: {e}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Load a TOML recipe; unknown keys and bad values are errors that name them."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"recipe file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{p} is not valid TOML: {e}") from None
    _strict(data, _TOP_KEYS, "the recipe", p)
    default_table = data.get("default", {})
    _strict(default_table, _SPEC_KEYS, "[default]", p)
    default = _spec(default_table, "[default]", p)
    rules = []
    for i, table in enumerate(data.get("rules", []), start=1):
        _strict(table, _RULE_KEYS, f"rule {i}", p)
        ops = table.get("op", [])
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        spec = _spec(table, f"rule {i}", p, base=default)
        rules.append(Rule(spec, ops, table.get("name")))
    cal_table = data.get("calibration", {})
    _strict(cal_table, _CAL_KEYS, "[calibration]", p)
    try:
        cal = CalibrationConfig(**cal_table)
    except InputError as e:
        raise InputError(f"{p}: [calibration]: {e}") from None
    algo = data.get("algorithms", {})
    _strict(algo, _ALGO_KEYS, "[algorithms]", p)
    alpha = algo.get("smoothing_alpha", 1.0 if algo.get("smoothing") != "smoothquant" else 0.5)
    damp = algo.get("gptq_damp", 0.01)
    p_ratio, p_max = algo.get("protect_ratio", 4.0), algo.get("protect_max_channels", 4)
    if isinstance(p_max, bool) or not isinstance(p_max, int):
        raise InputError(f"{p}: [algorithms]: protect_max_channels must be an integer")
    for key, value in (("smoothing_alpha", alpha), ("gptq_damp", damp), ("protect_ratio", p_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{p}: [algorithms]: {key} must be a number")
    try:
        return Recipe(str(data.get("name", p.stem)), default, tuple(rules), cal,
                      smoothing=str(algo.get("smoothing", "off")), smoothing_alpha=float(alpha),
                      bias_correction=bool(algo.get("bias_correction", False)),
                      quantize_model_inputs=bool(algo.get("quantize_model_inputs", True)),
                      rounding=str(algo.get("rounding", "nearest")), gptq_damp=float(damp),
                      awq=bool(algo.get("awq", False)), protect_outliers=bool(algo.get("protect_outliers", False)),
                      protect_ratio=float(p_ratio), protect_max_channels=p_max,
                      conv_rounding=str(algo.get("conv_rounding", "nearest")))
    except InputError as e:
        raise InputError(f"{p}: [algorithms]: {e}") from None


def resolve_recipe(recipe: str | Path | Recipe, *, block: int | None = None) -> Recipe:
    """A recipe from a preset name, a TOML path or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    text = str(recipe)
    if text.endswith(".toml") or Path(text).exists():
        return load_recipe(text)
    return preset(text, block=block)
