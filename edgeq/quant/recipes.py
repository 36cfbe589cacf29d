"""Recipes: what to quantize and how, as frozen data.

A recipe has a default :class:`QuantSpec` and ordered rules; a rule matches a node by op type
and/or a regular expression on its name, and the first match wins (for the node's spec and for
any algorithm settings the rule carries). A rule whose spec is ``FLOAT`` excludes the node.
Each algorithm has its own frozen config (:class:`Algorithms` holds them; ``None`` = off).
Presets: ``w8a8``, ``w8a16``, ``w4a16`` (block 32/64/128), ``mxfp4`` and ``gguf``. TOML recipes load
through :func:`load_recipe`, which derives every key and type from these dataclasses and rejects
an unknown key or a wrong type by name.

TOML form::

    name = "my-recipe"
    [default]
    weights = "int4"        # float | int8 | int4 | mxfp4
    block = 32              # int4/mxfp4 block size along the reduction axis
    asymmetric = true       # int4 MatMul/Gemm/Conv and tied tables: zero point per block (other tables: none)
    activations = "float"   # float | uint8 | int8
    clip_search = true      # int4: per-block MSE-optimal clipping
    tied_table = "int8"     # a table tied between embedding and output layer (LLM head); default: weights
    [calibration]
    method = "minmax"       # minmax | percentile | entropy | mse
    percentile = 99.99
    [placement]
    quantize_model_inputs = false  # W8A8: leave graph inputs float (the first layer reads them in float)
    [algorithms]            # each: true (defaults), false (off) or a table of its settings
    protect = {ratio = 4.0, max_channels = 4}   # outlier channels of MatMul inputs run in float
    smoothing = {method = "outliers", alpha = 1.0}  # W8A8: outliers | smoothquant (alpha (0, 1), e.g. 0.5)
    awq = true              # weight-only int4: activation-aware input scaling (AWQ)
    gptq = {damp = 0.01, act_order = false}  # MatMul/Gemm: error-compensated rounding (nearest, with a note, without data)
    block_choice = {min_sqnr_db = 22.0}  # int4 MatMul/Gemm: the target's faster block where a layer stays accurate (false: off)
    conv_rounding = {scope = "all"}  # int8 Conv codes chosen for the layer output: all | small
    bias_correction = true  # Conv/Gemm: cancel the output mean shift of weight rounding; {sequential = true}:
                            # then of all quantization error, layer by layer on the quantized graph
    integer_bias = {raise_scales = true}  # W8A8: raise a near-dead channel's weight scale so its int32 bias fits
    keep_gguf = {file = "model.gguf"}  # keep the GGUF's Q4_0/Q4_1/Q8_0 integers ({} = the exported-from file)
    [[rules]]
    op = ["Gather"]         # optional: op types
    name = "embeddings"     # optional: regex searched in the node name
    weights = "int8"        # the spec fields; weights = "float" keeps the node float
    algorithms = {gptq = false}  # optional: algorithm settings for the nodes this rule matches
"""

from __future__ import annotations

import enum
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import tomllib

from edgeq.errors import InputError


class WeightFormat(str, enum.Enum):
    FLOAT = "float"
    INT8 = "int8"  # symmetric, per output channel
    INT4 = "int4"  # blocks along the reduction axis; a zero point per block unless ``asymmetric = false``
    MXFP4 = "mxfp4"  # float4e2m1 with a power-of-two scale per 32 (OCP MX)


class ActFormat(str, enum.Enum):
    FLOAT = "float"
    UINT8 = "uint8"  # asymmetric per tensor
    INT8 = "int8"  # symmetric per tensor


class CalibrationMethod(str, enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class SmoothingMethod(str, enum.Enum):
    OUTLIERS = "outliers"  # only channels above the 90th percentile of channel maxima (edgeq.quant.smooth)
    SMOOTHQUANT = "smoothquant"  # every channel, s = max|x|^α / max|W|^(1-α)


class ConvRoundingScope(str, enum.Enum):
    ALL = "all"  # every int8 Conv
    SMALL = "small"  # the stem and depthwise convs (fan-in <= 32 per group)


BLOCK_SIZES = (16, 32, 64, 128, 256)
MASSIVE_RATIO = 32.0  # × the 90th percentile of a tensor's channel maxima: a massive activation


@dataclass(frozen=True)
class QuantSpec:
    """How one node is quantized: its weight format and its activation format."""

    weights: WeightFormat = WeightFormat.INT8
    block: int = 32
    activations: ActFormat = ActFormat.FLOAT
    clip_search: bool = True  # int4: per-block MSE-optimal clipping instead of plain max
    asymmetric: bool = True  # int4 MatMul/Gemm/Conv and tied LM tables: a zero point per block (other tables: none)
    # a table read by both the embedding Gather and the output MatMul (a language model's tied head),
    # when no rule matches the Gather: its format (None: ``weights``). The output layer is the most
    # sensitive layer of a small LLM (llama.cpp keeps it at Q6_K/Q8_0).
    tied_table: WeightFormat | None = None

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


# --- algorithm configs: one frozen dataclass per algorithm, one handler each (edgeq.quant.algorithms)

@dataclass(frozen=True)
class ProtectConfig:
    """Outlier channels of MatMul inputs leave the integer path (edgeq.quant.protect)."""

    ratio: float = 4.0  # a channel is an outlier above ratio × the 90th percentile of channel maxima
    max_channels: int = 4  # at most this many per activation

    def __post_init__(self) -> None:
        if self.ratio <= 1.0 or not 1 <= self.max_channels <= 64:
            raise InputError(f"protect ratio {self.ratio} / max_channels {self.max_channels} out of range",
                             hint="ratio > 1 (e.g. 4), max_channels in 1..64")


@dataclass(frozen=True)
class SmoothingConfig:
    """W8A8 activation smoothing before MatMuls (edgeq.quant.smooth)."""

    method: SmoothingMethod = SmoothingMethod.OUTLIERS
    alpha: float | None = None  # migration strength; default 1.0 (outliers) or 0.5 (smoothquant)

    def __post_init__(self) -> None:
        if self.alpha is None:
            object.__setattr__(self, "alpha", 0.5 if self.method == SmoothingMethod.SMOOTHQUANT else 1.0)
        hi_ok = self.alpha < 1.0 if self.method == SmoothingMethod.SMOOTHQUANT else self.alpha <= 1.0
        if not (0.0 < self.alpha and hi_ok):
            raise InputError(f"smoothing alpha {self.alpha} is out of range for {self.method.value}",
                             hint="outliers: (0, 1], smoothquant: (0, 1)")


@dataclass(frozen=True)
class AWQConfig:
    """Activation-aware input scaling of int4 MatMul weights, weight-only recipes (edgeq.quant.awq)."""


@dataclass(frozen=True)
class GPTQConfig:
    """Error-compensated rounding of MatMul/Gemm weights from calibration Grams (edgeq.quant.gptq)."""

    damp: float = 0.01  # λ = damp · mean(diag H) added to the Hessian
    # round the inputs with the largest E[x²] first (the paper's "act order"); int4 block grids are then
    # chosen up front from the weights before compensation ("static groups")
    act_order: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.damp <= 1.0:
            raise InputError(f"gptq damp {self.damp} is out of range", hint="use a value in (0, 1], e.g. 0.01")


@dataclass(frozen=True)
class ConvRoundingConfig:
    """int8 Conv codes chosen for the layer output on the calibration data (edgeq.quant.rounding)."""

    scope: ConvRoundingScope = ConvRoundingScope.ALL


@dataclass(frozen=True)
class BiasCorrectionConfig:
    """Conv/Gemm biases absorb the mean output error of weight rounding (edgeq.quant.bias)."""

    # then, on the quantized graph, layer by layer in order: each bias absorbs the mean output shift of the
    # whole quantization error (activations and inherited shifts included) on the calibration feeds
    # (edgeq.quant.seq_bias)
    sequential: bool = False


@dataclass(frozen=True)
class IntegerBiasConfig:
    """W8A8: int32 biases at scale s_in·s_w (edgeq.quant.bias)."""

    # A near-dead channel (tiny weights, real bias) would need a bias past int32 (ONNX Runtime
    # would clip it): raise that channel's weight scale until it fits. Off: its bias stays float.
    raise_scales: bool = True


@dataclass(frozen=True)
class KeepGGUFConfig:
    """Keep a GGUF file's own Q4_0 / Q4_1 / Q8_0 integers for the weights that hold them (edgeq.quant.keep_gguf)."""

    file: str = ""  # the .gguf; empty: the file the model was exported from (its edgeq.gguf_file metadata)
    # ONNX Runtime profiles: the MatMulNBits accuracy level of kept int4 weights. 0 computes in fp32 (the
    # file's values exactly: SmolLM2 perplexity +0.08 % of float); 4 quantizes activations to int8 per
    # block, as llama.cpp's Q4_1 x Q8_1 dot product does (+0.5 %), and decodes faster (0.41x vs 0.51x
    # float's time on an x86 host).
    accuracy_level: int = 0
    # ONNX Runtime profiles: the kept int4 weights' scales (and Q4_1's offsets m + 8d) as float32 constants
    # instead of the file's float16 widened by Casts. An .ort is not optimized again at load, so those Casts
    # (and the offsets' Mul/Add) run on every call: SmolLM2 Q4_1 + int4 table, 1 thread, decode 18.9 -> 15.3
    # CPU ms/step at accuracy level 0 (15.5 -> 11.3 at 4), for +4 B per block of 32 (.ort 87.7 -> 100.6 MB).
    float32_constants: bool = False

    def __post_init__(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"keep_gguf accuracy_level {self.accuracy_level} is not one of 0-4",
                             hint="0 (fp32 compute, exact) or 4 (int8 activations, faster)")


@dataclass(frozen=True)
class BlockChoiceConfig:
    """int4 MatMul/Gemm weights take the larger block the target runs faster (its profile's ``fast_int4_block``),
    per layer, where the layer's output stays accurate (edgeq.quant.block_choice)."""

    # a layer takes the larger block when its predicted output SQNR (from the calibration Gram) at that
    # block is at least min_sqnr_db and at most max_loss_db below the SQNR at its own block
    min_sqnr_db: float = 22.0
    max_loss_db: float = 3.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.max_loss_db <= 60.0 and -20.0 <= self.min_sqnr_db <= 120.0):
            raise InputError(f"block_choice min_sqnr_db {self.min_sqnr_db} / max_loss_db {self.max_loss_db} "
                             "out of range", hint="dB values, e.g. min_sqnr_db = 22, max_loss_db = 3")


@dataclass(frozen=True)
class Algorithms:
    """Which algorithms run, with their settings; ``None`` = off."""

    keep_gguf: KeepGGUFConfig | None = None
    protect: ProtectConfig | None = None
    smoothing: SmoothingConfig | None = None
    awq: AWQConfig | None = None
    gptq: GPTQConfig | None = None
    block_choice: BlockChoiceConfig | None = None
    conv_rounding: ConvRoundingConfig | None = None
    bias_correction: BiasCorrectionConfig | None = None
    integer_bias: IntegerBiasConfig | None = IntegerBiasConfig()


@dataclass(frozen=True)
class Rule:
    """Match by op type (any of ``op_types``; empty = any) and name regex; first match wins.

    ``algorithms`` (algorithm name -> config or None) overrides the recipe's settings for the
    nodes this rule matches.
    """

    spec: QuantSpec
    op_types: tuple[str, ...] = ()
    name: str | None = None
    algorithms: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.name is not None:
            try:
                re.compile(self.name)
            except re.error as e:
                raise InputError(f"rule name pattern {self.name!r} is not a valid regular expression: {e}") from e
        known = {f.name for f in fields(Algorithms)}
        for key, _ in self.algorithms:
            if key not in known:
                raise InputError(f"rule: unknown algorithm {key!r}", hint=f"algorithms: {', '.join(sorted(known))}")

    def matches(self, op_type: str, node_name: str) -> bool:
        if self.op_types and op_type not in self.op_types:
            return False
        return self.name is None or re.search(self.name, node_name) is not None


@dataclass(frozen=True)
class CalibrationConfig:
    method: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if not isinstance(self.method, CalibrationMethod):
            try:
                object.__setattr__(self, "method", CalibrationMethod(self.method))
            except ValueError:
                raise InputError(f"unknown calibration method {self.method!r}",
                                 hint=f"use one of {', '.join(m.value for m in CalibrationMethod)}") from None
        if not 50.0 < self.percentile <= 100.0:
            raise InputError(f"percentile {self.percentile} must be in (50, 100]")


@dataclass(frozen=True)
class PlacementConfig:
    """Where W8A8 activation Q/DQ pairs may go (edgeq.quant.activations)."""

    # Quantize graph inputs that feed quantized ops? Off in w8a8: an image is already 8-bit pixels,
    # and a second rounding on another grid before the most sensitive layer cost 3.3 dB of logit
    # SQNR on EfficientNet-Lite0; the first layer then reads its input in float.
    quantize_model_inputs: bool = True


@dataclass(frozen=True)
class Recipe:
    name: str
    default: QuantSpec
    rules: tuple[Rule, ...] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    algorithms: Algorithms = field(default_factory=Algorithms)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def __post_init__(self) -> None:
        if self.quantizes_activations and any(a.awq is not None for a in self._all_algorithms()):
            raise InputError("awq is for weight-only recipes (activations float)",
                             hint="for W8A8 use smoothing (outliers or smoothquant)")
        rewriting = [k for k in ("awq", "protect", "smoothing") if self.uses(k)]
        if self.uses("keep_gguf") and rewriting:  # they change the weights the file's integers are found by
            raise InputError(f"keep_gguf keeps the file's integers; {', '.join(rewriting)} would rewrite those weights",
                             hint=f"turn {', '.join(rewriting)} off in a recipe that keeps a GGUF's integers")

    def spec_for(self, op_type: str, node_name: str) -> tuple[QuantSpec, int | None]:
        """The spec for a node and the 1-based index of the rule that chose it (None: default)."""
        rule, index = self._rule_for(op_type, node_name)
        return (rule.spec, index) if rule is not None else (self.default, None)

    def algorithms_for(self, op_type: str, node_name: str) -> Algorithms:
        """The algorithm settings for a node: the recipe's, overridden by its first matching rule's."""
        rule, _ = self._rule_for(op_type, node_name)
        if rule is None or not rule.algorithms:
            return self.algorithms
        return replace(self.algorithms, **dict(rule.algorithms))

    def with_algorithms(self, **changes) -> Recipe:
        """This recipe with some algorithms changed (``awq=None`` turns AWQ off)."""
        return replace(self, algorithms=replace(self.algorithms, **changes))

    def _rule_for(self, op_type: str, node_name: str) -> tuple[Rule | None, int | None]:
        for i, rule in enumerate(self.rules, start=1):
            if rule.matches(op_type, node_name):
                return rule, i
        return None, None

    def _all_algorithms(self) -> list[Algorithms]:
        return [self.algorithms] + [replace(self.algorithms, **dict(r.algorithms)) for r in self.rules if r.algorithms]

    def uses(self, algorithm: str) -> bool:
        """``algorithm`` is on for some node (in the recipe or a rule)."""
        return any(getattr(a, algorithm) is not None for a in self._all_algorithms())

    @property
    def quantizes_activations(self) -> bool:
        specs = [self.default, *(r.spec for r in self.rules)]
        return any(s.activations != ActFormat.FLOAT for s in specs)

    @property
    def needs_calibration(self) -> bool:
        """Calibration data is required: the activation ranges."""
        return self.quantizes_activations

    @property
    def uses_calibration(self) -> bool:
        """Calibration data is used when given (GPTQ, AWQ, protection, Conv rounding and bias correction of a
        weight-only recipe are skipped, with a note, without it: the weights then get nearest rounding)."""
        return self.needs_calibration or any(self.uses(a) for a in
                                             ("gptq", "awq", "protect", "conv_rounding", "bias_correction"))


def preset(name: str, *, block: int | None = None) -> Recipe:
    """A built-in recipe: ``w8a8``, ``w8a16``, ``w4a16`` (``block`` 32/64/128) or ``mxfp4``."""
    if name == "w8a8":
        # MSE-optimal ranges, outlier protection then smoothing, bias correction: the best measured on
        # MiniLM (mean cosine 0.9980 → 0.9992 with protection) and EfficientNet-Lite0; data-aware Conv
        # rounding: EfficientNet-Lite0 logit SQNR 19.7 -> 26.2 dB (no Conv in MiniLM).
        # Sequential bias correction (`bias_correction = {sequential = true}`: the whole quantization error's
        # mean, layer by layer on the quantized graph) is opt-in: it helps Lite1 but not Lite2 (tools/zoo.py,
        # 220 held-out crops, android .ort / ios18 package): Lite1 20.7 -> 22.1 dB, top-1 95.5 -> 96.8 % /
        # 20.9 -> 22.4 dB, 95.9 -> 96.4 %; Lite2 20.2 -> 19.8 dB, 97.3 -> 93.2 % / 20.7 -> 19.9 dB,
        # 98.2 -> 93.6 % (near-ties flipped; on its calibration crops 15.5 -> 18.6 dB); Lite0 (QDQ, 384 crops)
        # 26.1 -> 25.7 dB, 96.4 -> 97.1 % / 26.7 -> 26.2 dB, 96.6 -> 96.4 %; MTCNN O-Net and CREPE tiny
        # unchanged; +19-39 s on 200 crops of 240-260 px, 2 cores (notes/seqbc.md)
        return Recipe("w8a8", QuantSpec(WeightFormat.INT8, activations=ActFormat.UINT8),
                      calibration=CalibrationConfig(CalibrationMethod.MSE),
                      algorithms=Algorithms(protect=ProtectConfig(), smoothing=SmoothingConfig(),
                                            conv_rounding=ConvRoundingConfig(), bias_correction=BiasCorrectionConfig()),
                      placement=PlacementConfig(quantize_model_inputs=False))
    if name == "w8a16":
        # With calibration data, Conv codes are chosen for the layer output and Conv/Gemm biases absorb the
        # mean error of rounding (nearest rounding without data; MatMul-only models are not affected).
        # PP-OCRv4 rec (PPLCNetV3 + SVTR) output SQNR: 14.2 dB with nearest rounding (1x1 Convs had whole
        # channels rounded to zero), 26.9 dB with both.
        return Recipe("w8a16", QuantSpec(WeightFormat.INT8),
                      algorithms=Algorithms(conv_rounding=ConvRoundingConfig(), bias_correction=BiasCorrectionConfig()))
    if name == "w4a16":
        # AWQ + GPTQ when calibration data is given (nearest rounding without). MiniLM block 32 mean
        # cosine: nearest 0.973, AWQ 0.981, GPTQ 0.987, AWQ + GPTQ 0.988 (+70 KB of input scales);
        # GPTQ in act order: SmolLM2 perplexity x1.160 -> x1.136, top-1 0.754 -> 0.777 (MiniLM 0.9884);
        # for causal LMs its asymmetric block grids are chosen by the output error they predict (gptq._output_grid):
        # SmolLM2 Android .ort x1.136 -> x1.108, KLD 0.156 -> 0.148, top-1 0.776 -> 0.777 (held-out text)
        # Massive activations (a channel 32x the 90th percentile, e.g. SmolLM2 layer 11's down_proj
        # input at ~3100 on a sequence's first token vs ~8 elsewhere) and the super-weight rows they
        # meet are kept float: a few channels, a few KB.
        # A tied embedding/output table is int8 (block 32 symmetric on ONNX Runtime: SmolLM2's Q8_0
        # table exactly). int4 (`tied_table = "int4"`, its codes chosen by GPTQ for the output layer from
        # the final hidden states' Gram, a zero point per block) makes the SmolLM2 Android .ort ~89 MB
        # instead of ~102 but takes perplexity x1.108 -> x1.146, top-1 0.777 -> 0.720, KLD 0.148 -> 0.203
        # (tools/bench_llm.py, 1545 held-out tokens; symmetric int4 was x1.210 / 0.691, round to nearest
        # x1.275 / 0.64). The int8 table is exact on the GGUF, so no int4 table can beat it: int8 stays the
        # default (notes/llmq2.md has the frontier).
        return Recipe(f"w4a16-b{block or 32}",
                      QuantSpec(WeightFormat.INT4, block=block or 32, tied_table=WeightFormat.INT8),
                      algorithms=Algorithms(awq=AWQConfig(), gptq=GPTQConfig(act_order=True),
                                            protect=ProtectConfig(ratio=MASSIVE_RATIO, max_channels=2),
                                            # a block asked for is pinned; else layers move to the target's
                                            # faster block where they lose little
                                            block_choice=None if block else BlockChoiceConfig()))
    if name == "gguf":
        # A GGUF's Q4_0/Q4_1/Q8_0 weights keep the file's integers (the float reference is those
        # integers dequantized: SmolLM2 keeps all 211); the rest (K-quants, float tensors) get w4a16's
        # format: int4 asymmetric block 32 with clip search, GPTQ with --calib. AWQ and protection
        # would rewrite the kept weights, so they are off. With `tied_table = "int4"` (a TOML recipe) the Q8_0
        # table is re-quantized int4 with zero points, GPTQ'd for the output layer with --calib: SmolLM2 Android
        # .ort 87.7 MB, perplexity x1.033, top-1 0.838 (notes/llmq2.md), but decode ~2x the w4a16 .ort's.
        if block not in (None, 32):
            raise InputError("recipe gguf uses blocks of 32 (the GGUF block)", hint="drop --block")
        return Recipe("gguf", QuantSpec(WeightFormat.INT4, block=32, tied_table=WeightFormat.INT8),
                      algorithms=Algorithms(keep_gguf=KeepGGUFConfig(), gptq=GPTQConfig(act_order=True)))
    if name == "mxfp4":
        if block not in (None, 32):
            raise InputError("mxfp4 uses blocks of 32 (the OCP MX rule)")
        return Recipe("mxfp4", QuantSpec(WeightFormat.MXFP4, block=32))
    raise InputError(f"unknown recipe {name!r}", hint="use w8a8, w8a16, w4a16, mxfp4, gguf or a .toml file")


PRESETS = ("w8a8", "w8a16", "w4a16", "mxfp4", "gguf")


# --- the strict TOML loader: keys and types come from the dataclasses above

class _Where:
    def __init__(self, path: Path, place: str):
        self.path, self.place = path, place

    def error(self, message: str, hint: str | None = None) -> InputError:
        return InputError(f"{self.path}: {self.place}: {message}", hint=hint)


def _type_name(t) -> str:
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in t)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(t, "a table")


def _value(t, value, key: str, where: _Where):
    """``value`` read as type ``t`` (bool, int, float, str, an Enum, ``X | None``, a config dataclass)."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    if isinstance(t, type) and issubclass(t, enum.Enum):
        try:
            return t(value)
        except ValueError:
            raise where.error(f"{key} = {value!r} is not {_type_name(t)}") from None
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(t)
    if ok is not None:
        if not ok(value):
            raise where.error(f"{key} must be {_type_name(t)}, got {value!r}")
        return float(value) if t is float else value
    if is_dataclass(t):
        if not isinstance(value, Mapping):
            raise where.error(f"{key} must be a table")
        return _dataclass(t, value, _Where(where.path, f"{where.place}.{key}" if where.place else key))
    raise TypeError(f"no TOML reader for {t!r}")  # a dataclass field of a type this loader does not know


def _dataclass(cls, table: Mapping, where: _Where, base=None):
    """An instance of the config dataclass ``cls`` from a TOML table; unknown keys and wrong types name the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in table if k not in names]
    if unknown:
        raise where.error(f"unknown key {unknown[0]!r}", hint=f"allowed keys: {', '.join(sorted(names)) or 'none'}")
    kwargs = {k: _value(hints[k], v, k, where) for k, v in table.items()}
    try:
        return replace(base, **kwargs) if base is not None else cls(**kwargs)
    except InputError as e:
        raise where.error(e.message, e.hint) from None


def _algorithms(table: Mapping, where: _Where) -> dict[str, object]:
    """``{name: config | None}`` from an algorithms table (``true`` = defaults, ``false`` = off, or a table)."""
    hints = typing.get_type_hints(Algorithms)
    known = {f.name: f for f in fields(Algorithms)}
    out = {}
    for key, value in table.items():
        if key not in known:
            raise where.error(f"unknown algorithm {key!r}", hint=f"algorithms: {', '.join(sorted(known))}")
        cls = next(a for a in typing.get_args(hints[key]) if a is not type(None))
        if isinstance(value, bool):
            out[key] = cls() if value else None
        elif isinstance(value, Mapping):
            out[key] = _dataclass(cls, value, _Where(where.path, f"{where.place}.{key}"))
        else:
            raise where.error(f"{key} must be true, false or a table of its settings, got {value!r}")
    return out


_RULE_KEYS = {"op", "name", "algorithms"}
_TOP_KEYS = {"name", "default", "calibration", "placement", "algorithms", "rules"}


def load_recipe(path: str | Path) -> Recipe:
    """Load a TOML recipe; unknown keys and bad values are errors that name them."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"recipe file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read recipe {p}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{p} is not valid TOML: {e}") from None
    top = _Where(p, "the recipe")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        hint = ("algorithm settings now live in [algorithms] as tables, e.g. gptq = {damp = 0.01}"
                if unknown[0] in _OLD_ALGORITHM_KEYS else f"allowed keys: {', '.join(sorted(_TOP_KEYS))}")
        raise top.error(f"unknown key {unknown[0]!r}", hint=hint)
    for key in ("default", "calibration", "placement", "algorithms"):
        if key in data and not isinstance(data[key], Mapping):
            raise top.error(f"{key} must be a table ([{key}])")
    name = _value(str, data.get("name", p.stem), "name", top)
    default = _dataclass(QuantSpec, data.get("default", {}), _Where(p, "[default]"))
    calibration = _dataclass(CalibrationConfig, data.get("calibration", {}), _Where(p, "[calibration]"))
    placement = _dataclass(PlacementConfig, data.get("placement", {}), _Where(p, "[placement]"))
    algo_table = data.get("algorithms", {})
    old = [k for k in algo_table if k in _OLD_ALGORITHM_KEYS and k not in {f.name for f in fields(Algorithms)}]
    if old:
        raise _Where(p, "[algorithms]").error(
            f"key {old[0]!r} is from an older recipe format",
            hint="write each algorithm as true, false or a table, e.g. gptq = {damp = 0.01}, "
                 "protect = {ratio = 4.0}, smoothing = {method = \"outliers\"}, conv_rounding = {scope = \"all\"}")
    algorithms = Algorithms(**_algorithms(algo_table, _Where(p, "[algorithms]")))
    rules_data = data.get("rules", [])
    if not isinstance(rules_data, list):
        raise top.error("rules must be an array of tables ([[rules]])")
    rules = []
    for i, table in enumerate(rules_data, start=1):
        where = _Where(p, f"rule {i}")
        if not isinstance(table, Mapping):
            raise where.error("must be a table")
        spec_table = {k: v for k, v in table.items() if k not in _RULE_KEYS}
        spec = _dataclass(QuantSpec, spec_table, where, base=default)
        ops = table.get("op", [])
        ops = [ops] if isinstance(ops, str) else ops
        if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
            raise where.error(f"op must be an op type or a list of them, got {table.get('op')!r}")
        rule_name = _value(str, table["name"], "name", where) if "name" in table else None
        overrides = table.get("algorithms", {})
        if not isinstance(overrides, Mapping):
            raise where.error("algorithms must be a table")
        try:
            rules.append(Rule(spec, tuple(ops), rule_name,
                              tuple(sorted(_algorithms(overrides, _Where(p, f"rule {i}: algorithms")).items()))))
        except InputError as e:
            raise where.error(e.message, e.hint) from None
    try:
        return Recipe(name, default, tuple(rules), calibration, algorithms, placement)
    except InputError as e:
        raise top.error(e.message, e.hint) from None


_OLD_ALGORITHM_KEYS = {"rounding", "gptq_damp", "protect_outliers", "protect_ratio", "protect_max_channels",
                       "smoothing_alpha", "quantize_model_inputs"}


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string (quotes and backslashes escaped): for recipes edgeq prints."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c >= " " or c == "\t" else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def exact_name_pattern(node: str) -> str:
    """A rule ``name`` pattern that matches the node called ``node`` and nothing else."""
    return "^" + re.escape(node) + "$"


def exact_name_rule(node: str, body: str) -> str:
    """A ``[[rules]]`` table matching exactly the node ``node``, with ``body`` (TOML lines) as its settings."""
    return f"[[rules]]\nname = {toml_string(exact_name_pattern(node))}\n{body}\n"


def resolve_recipe(recipe: str | Path | Recipe, *, block: int | None = None) -> Recipe:
    """A recipe from a preset name, a TOML path or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    text = str(recipe)
    if text.endswith(".toml") or Path(text).exists():
        return load_recipe(text)
    return preset(text, block=block)
