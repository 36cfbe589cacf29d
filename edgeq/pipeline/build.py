"""``edgeq build``: one command from a model to validated device packages and a report.

The stages, each a call into the pipeline or the Python API (nothing here re-implements a stage):

1. export — a PyTorch model or sample → float ONNX (an ONNX file is copied);
2. quantize — one QDQ ONNX per distinct target profile (Android and iOS run different integer
   ops), all planned on the same portable graph from ONE calibration pass
   (:func:`~edgeq.pipeline.quantize.quantize_for_profiles`): where the profiles run the same formats,
   the weights carry the same integers (ONNX Runtime's fused kernels — a causal LM's attention — are
   made from the quantized graph, reading the same integers);
3. package — each target, from the QDQ ONNX made for its profile;
4. validate — every QDQ ONNX and every package against the float ONNX on the evaluation data,
   with gates (the recipe's defaults, or the caller's);
5. latency — batch-1 host latency of the float and quantized models in ONNX Runtime;
6. report — ``build.json`` for machines and one self-contained ``report.html`` for people.

Every input is checked before any work. Everything is written into a temporary folder beside the
output and moved into place at the end; Ctrl-C, or a failure of export or quantization, leaves
nothing. A failure in one target or in a late stage does not discard what worked: the other
packages, the validation and the report are kept, the stage is marked failed in the summary, and
the exit code says so.
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeq import __version__, onnx_io, sources
from edgeq.errors import EdgeqError, InputError, first_line
from edgeq.quant.recipes import Recipe, resolve_recipe
from edgeq.validate import Thresholds
from edgeq.validate.llm import LLMThresholds
from edgeq.validate.report import format_number

DEFAULT_MODEL = "minilm"
DEFAULT_TARGETS = ("android", "ios18")
DEFAULT_RECIPE = "w8a8"
# Default gates per preset recipe: each output's SQNR floor (dB), and the mean per-sample cosine to
# the float model. Measured on the samples: MiniLM w8a8 23.9 dB / 0.998 (0.9992 with protection),
# EfficientNet-Lite0 w8a8 26 dB; MiniLM w4a16 0.988; PP-OCRv4 rec w8a16 26.8 dB / 0.9990. The floor
# catches what cosine cannot see (an output with one value per sample has cosine 1 whatever its error;
# a gain error); cosine judges each sample on its own (a quiet sample's error counts as much as a loud
# one's). w8a16's cosine floor is its SQNR floor's per-sample equivalent (cosine_floor): a fixed 0.999
# (~27 dB) contradicted its own 25 dB floor. The other presets keep the cosine floors users know from
# the peers (0.99 for 8-bit activations), stricter than their SQNR floors' equivalents (15 dB: 0.9845):
# their low SQNR floors are there for the outputs cosine cannot see, not to pass what cosine fails.
DEFAULT_MIN_SQNR = {"w8a8": 15.0, "w8a16": 25.0, "w4a16": 10.0, "mxfp4": 10.0}
DEFAULT_MIN_SQNR_OTHER = 10.0
DEFAULT_MIN_COSINE = {"w8a8": 0.99, "w4a16": 0.98, "mxfp4": 0.95}  # w8a16: cosine_floor(25 dB)
DEFAULT_MIN_COSINE_OTHER = 0.98


def cosine_floor(sqnr_db: float) -> float:
    """The cosine of a sample whose error, orthogonal to it, is ``sqnr_db`` below it (4 decimals, rounded down).

    cos = 1/sqrt(1 + 10^(-SQNR/10)) ~ 1 - 10^(-SQNR/10)/2: 15 dB -> 0.9845, 25 dB -> 0.9984, 10 dB -> 0.9534.
    A cosine floor stricter than this fails outputs whose every sample meets the SQNR floor (PP-OCRv4
    rec w8a16: 26.8 dB, cosine 0.99897 as this predicts, failed the former fixed 0.999 while its
    floor was 25 dB)."""
    import math

    return math.floor(1e4 / math.sqrt(1.0 + 10.0 ** (-sqnr_db / 10.0))) / 1e4


# and for a classifier, top-1 agreement with the float model (EfficientNet-Lite0 w8a8: 0.97); class
# scores per position ([batch, positions, classes]: CTC frames, token tags) make a sequence's
# decision together, so one changed position in 50 is the most a position gate lets through
# (PP-OCRv4 rec w8a16: 0.993 per frame, 92 % of its text lines decode identically)
DEFAULT_MIN_TOP1 = 0.9
DEFAULT_MIN_TOP1_PER_POSITION = 0.98
# Causal LMs: perplexity / the float model's and teacher-forced top-1 agreement on held-out text.
# w4a16 is issue 13's acceptance (peer int4 tools: +29-32 % perplexity on SmolLM2-135M); w8a16 must
# be near-lossless; other presets get the w4a16 gates.
DEFAULT_LLM_GATES = {"w4a16": (1.10, 0.80), "w8a16": (1.01, 0.95)}
REPORT_HTML = "report.html"
REPORT_JSON = "build.json"
VERSION_PACKAGES = ("onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy", "torch", "coremltools", "transformers")


class BuildFailed(EdgeqError):
    """A stage failed; what worked is kept in the output folder."""

    def __init__(self, message: str, *, exit_code: int = 2, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


@dataclass(frozen=True)
class BuildConfig:
    """What to build (``edgeq build``'s arguments, as data)."""

    model: object = DEFAULT_MODEL  # a sample name, a package.module:callable factory, an nn.Module or an .onnx file
    targets: tuple[str, ...] | None = None  # None: the sample's (Sample.targets), else DEFAULT_TARGETS
    recipe: str | Recipe | None = None  # None: the sample's (Sample.recipe), else DEFAULT_RECIPE
    block: int | None = None
    calib: object = None  # default: the sample's calibration split
    data: object = None  # default: the sample's evaluation split
    output: str | os.PathLike = "dist"
    force: bool = False
    thresholds: Thresholds | None = None  # override the recipe's gates field by field
    llm_thresholds: LLMThresholds | None = None  # the same for a causal LM's gates
    inputs: tuple[str, ...] | None = None  # input specs of a PyTorch model
    task: str = "auto"  # auto | generic | classification | embedding | causal_lm
    limit: int | None = None  # validate on the first N evaluation feeds
    calib_limit: int | None = None  # calibrate on the first N calibration feeds
    latency: bool = True
    verbose: bool = False
    progress: bool = True


@dataclass
class StageRecord:
    """One stage as it ran: ``ok``, ``failed`` (with the message) or ``skipped``."""

    name: str
    what: str
    status: str = "ok"
    seconds: float = 0.0
    message: str = ""
    exit_code: int = 0  # 2: bad input / unsupported; 3: internal error

    def as_dict(self) -> dict:
        return {"name": self.name, "what": self.what, "status": self.status, "seconds": round(self.seconds, 2),
                "message": self.message}


@dataclass
class BuildResult:
    """What ``build`` wrote: the output folder, the report data (``build.json``) and the verdict."""

    path: Path
    data: dict
    seconds: float
    passed: bool
    summary: list[dict] = field(default_factory=list)
    stages: list[StageRecord] = field(default_factory=list)

    @property
    def report(self) -> Path:
        return self.path / REPORT_HTML

    @property
    def failed_stages(self) -> list[StageRecord]:
        return [s for s in self.stages if s.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 passed; 1 a gate failed; 2 a stage failed on input it cannot handle; 3 an internal error."""
        if self.failed_stages:
            return max(s.exit_code for s in self.failed_stages)
        return 0 if self.passed else 1


def versions() -> dict[str, str | None]:
    """Installed versions of edgeq, Python and the libraries it uses (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"edgeq": __version__, "python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def default_thresholds(recipe_name: str, task: str, *, per_position: bool = False) -> Thresholds:
    """The gates of a preset (``w4a16-b32`` is ``w4a16``); other recipes get the general default.

    ``per_position``: the classifier's scores are ``[batch, positions, classes]``."""
    preset = recipe_name.split("-")[0]
    floor = DEFAULT_MIN_SQNR.get(preset, DEFAULT_MIN_SQNR_OTHER)
    classifier = task == "classification"
    cosine = cosine_floor(floor) if preset == "w8a16" else DEFAULT_MIN_COSINE.get(preset, DEFAULT_MIN_COSINE_OTHER)
    return Thresholds(
        min_sqnr_db=floor,
        min_cosine=cosine,
        min_top1_agreement=DEFAULT_MIN_TOP1 if classifier else None,
        min_top1_per_position=DEFAULT_MIN_TOP1_PER_POSITION if classifier and per_position else None,
    )


def default_llm_thresholds(recipe_name: str) -> LLMThresholds:
    """The gates of a causal LM for a preset (others get the w4a16 gates)."""
    ratio, top1 = DEFAULT_LLM_GATES.get(recipe_name.split("-")[0], DEFAULT_LLM_GATES["w4a16"])
    return LLMThresholds(max_perplexity_ratio=ratio, min_top1_agreement=top1)


def _merge(default, given):
    """``given``'s gates where set, ``default``'s elsewhere (two dataclasses of one type)."""
    if given is None:
        return default
    return type(default)(**{k: g if (g := getattr(given, k)) is not None else v for k, v in default.__dict__.items()})


def check_output_dir(path: str | os.PathLike, *, force: bool) -> Path:
    """Fail before any work when the build folder cannot be written (missing parents are created when it is)."""
    out = Path(path)
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise InputError(f"output {out} is the current folder or holds it", hint="give a new folder, e.g. -o dist/")
    return onnx_io.check_output_folder(out, force=force)


def _model_name(model, sample) -> str:
    if sample is not None:
        return sample.name
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        if Path(text).exists():
            return Path(text).name.split(".")[0] or "model"
        return text.rpartition(":")[2].rpartition(".")[2] or "model"
    return type(model).__name__.lower()


def _sizes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


class _Stages:
    """Runs the stages: one line as each starts and one as it ends; a non-fatal failure is recorded, not raised."""

    def __init__(self, total: int, say: Callable[[str], None]):
        self.total, self.n, self.say = total, 0, say
        self.records: list[StageRecord] = []

    def run(self, name: str, what: str, fn: Callable, done: Callable[[object], str] | None = None, *,
            fatal: bool = False):
        self.n += 1
        self.say(f"[{self.n}/{self.total}] {name:<9} {what}")
        rec = StageRecord(name, what)
        self.records.append(rec)
        t0 = time.perf_counter()
        try:
            out = fn()
        except EdgeqError as e:
            rec.status, rec.message, rec.exit_code = "failed", str(e), e.exit_code if e.exit_code > 1 else 2
            if fatal:
                raise
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # an internal error in one stage: keep the others' work, report it, exit 3
            rec.status, rec.message, rec.exit_code = "failed", f"internal error: {type(e).__name__}: {first_line(e)}", 3
            if fatal:
                raise
        finally:
            rec.seconds = time.perf_counter() - t0
        if rec.status == "failed":
            self.say(f"      {'':<9} FAILED after {rec.seconds:.1f} s: {rec.message}")
            return None
        self.say(f"      {'':<9} done in {rec.seconds:.1f} s" + (f": {done(out)}" if done else ""))
        return out

    def skip(self, name: str, what: str, why: str) -> None:
        self.n += 1
        self.say(f"[{self.n}/{self.total}] {name:<9} {what}: skipped ({why})")
        self.records.append(StageRecord(name, what, "skipped", message=why))

    @property
    def timings(self) -> dict[str, float]:
        return {f"{r.name}: {r.what}": round(r.seconds, 2) for r in self.records}


@dataclass(frozen=True)
class QDQArtifact:
    """A QDQ ONNX the build wrote, planned for one target profile."""

    file: str
    profile: str
    targets: tuple[str, ...]
    result: object  # edgeq.pipeline.quantize.QuantizeResult
    calibration_source: str | None

    def as_dict(self) -> dict:
        r, plan = self.result, self.result.plan
        return {"file": self.file, "profile": self.profile, "targets": list(self.targets),
                "bytes": r.quantized_bytes, "ideal_bytes": r.ideal_bytes, "float_bytes": r.float_bytes,
                "coverage": plan.coverage(), **plan.as_dict(),
                "calibration": ({"source": self.calibration_source, "batches": r.calibration.batches,
                                 "samples": r.calibration.samples, "sha256": r.calibration.data_sha256}
                                if r.calibration else None),
                "seconds": round(r.seconds, 2)}


@dataclass(frozen=True)
class PackageArtifact:
    """A device package the build wrote."""

    target: str
    description: str
    qdq: QDQArtifact
    result: object  # targets.base.PackageResult
    root: Path  # the build folder it sits in

    @property
    def model_file(self) -> str:
        return str(self.result.model_file.relative_to(self.root))

    def as_dict(self) -> dict:
        m = self.result.manifest
        return {"target": self.target, "folder": self.target, "model_file": self.model_file, "qdq": self.qdq.file,
                "bytes": _sizes(self.result.model_file), "ideal_bytes": self.qdq.result.ideal_bytes,
                "files": m.get("files", {}), "file_bytes": m.get("file_bytes", {}), "runtime": m.get("runtime", {}),
                "description": self.description, "seconds": round(self.result.seconds, 2)}


@dataclass(frozen=True)
class _Inputs:
    """Everything resolved and checked before any work."""

    obj: object  # the nn.Module / sample / Path to build from
    sample: sources.Sample | None
    name: str
    targets: list
    recipe: Recipe
    calib: object
    data: object
    task: str
    task_reason: str
    thresholds: Thresholds | LLMThresholds  # LLMThresholds for a causal LM


def build(model=None, *, say: Callable[[str], None] = print, **options) -> BuildResult:
    """Export (when needed), quantize, package each target, validate, and write the report.

    ``model``: a sample name (default ``minilm``), a ``package.module:callable`` factory (with
    ``inputs``), an ``nn.Module`` (with ``inputs``) or an ONNX file. ``options`` are the fields of
    :class:`BuildConfig` (``targets``, ``recipe``, ``calib``, ``data``, ``output``, ``thresholds``,
    ``task``, ...). Raises on bad input (before any work) and when export or quantization fails;
    a later failure is recorded in the result (``exit_code``) with everything that worked kept.
    """
    if options.get("targets") is not None:
        options["targets"] = tuple(dict.fromkeys(options["targets"]))
    if "inputs" in options and options["inputs"] is not None:
        options["inputs"] = tuple(options["inputs"])
    return run_build(BuildConfig(model=DEFAULT_MODEL if model is None else model, **options), say)


def run_build(cfg: BuildConfig, say: Callable[[str], None] = print) -> BuildResult:
    """:func:`build` for a :class:`BuildConfig`."""
    from edgeq.pipeline.build_stages import run_stages

    t_start = time.perf_counter()
    out = check_output_dir(cfg.output, force=cfg.force)
    inputs = _prepare(cfg)
    if not cfg.verbose:
        try:
            import onnxruntime as ort

            ort.set_default_logger_severity(3)
        except ImportError:
            pass
    profiles = list(dict.fromkeys(t.profile.name for t in inputs.targets))
    stages = _Stages(2 + len(inputs.targets) + 1 + int(cfg.latency) + 1, say)
    with onnx_io.atomic_folder(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = run_stages(cfg, inputs, stages, tmp, profiles)
        data["stages"] = [r.as_dict() for r in stages.records]
        data["seconds"] = round(time.perf_counter() - t_start, 1)
        _write_reports(tmp, data, stages)
    result = BuildResult(out, data, time.perf_counter() - t_start, data["passed"], data["summary"], stages.records)
    return result


def _prepare(cfg: BuildConfig) -> _Inputs:
    """Resolve and check every input before any work: targets, recipe, model, data, task, gates."""
    from edgeq import plugins
    from edgeq.validate.tasks import resolve_task

    named = sources.get_sample(cfg.model) if isinstance(cfg.model, str) and sources.is_sample(cfg.model) else None
    names = cfg.targets if cfg.targets is not None else getattr(named, "targets", None) or DEFAULT_TARGETS
    if not names:
        raise InputError("no targets given", hint=f"e.g. --targets {','.join(DEFAULT_TARGETS)}")
    targets = [plugins.load_target(t) for t in names]  # an unknown target fails before any work
    recipe = resolve_recipe(cfg.recipe if cfg.recipe is not None else getattr(named, "recipe", None)
                            or DEFAULT_RECIPE, block=cfg.block)
    obj, sample = sources.resolve_model(cfg.model)
    is_onnx = isinstance(obj, Path)
    if is_onnx and obj.suffix.lower() != ".onnx":
        raise InputError(f"{obj} is not an .onnx file", hint="give an ONNX file, a sample, or a PyTorch factory")
    if not is_onnx and sample is None and not cfg.inputs:
        raise InputError("no input specs for the PyTorch model", hint="give --input name:dtype[dims] for each input")
    calib = cfg.calib if cfg.calib is not None else sample
    if recipe.needs_calibration and calib is None:
        raise InputError(f"recipe {recipe.name} quantizes activations and needs calibration data",
                         hint="pass --calib (a sample name, an .npz file or a folder of them)")
    data = cfg.data if cfg.data is not None else sample
    if data is None:
        raise InputError("no evaluation data to validate the packages on",
                         hint="pass --data (a sample name, an .npz file or a folder of them)")
    for flag, value in (("--limit", cfg.limit), ("--calib-limit", cfg.calib_limit)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}", hint="give the number of feeds to use")
    specs = _input_specs(obj, sample, cfg.inputs)
    _check_data(data, "evaluation", specs, cfg.limit)
    if cfg.calib is not None:
        _check_data(cfg.calib, "calibration", specs, cfg.calib_limit)
    if cfg.calib_limit is not None and calib is not None:
        from edgeq.validate.feeds import open_feeds

        raw, _ = open_feeds(calib, split="calibration")
        calib = [f for _, f in zip(range(cfg.calib_limit), raw)]
    onnx_model = onnx_io.read_onnx(obj) if is_onnx else None
    task, reason = resolve_task(cfg.task, sample=sample, model=onnx_model,
                                wants_top1=cfg.thresholds is not None and cfg.thresholds.min_top1_agreement is not None)
    if task == "causal_lm":
        given = cfg.llm_thresholds
        if cfg.thresholds is not None and cfg.thresholds.min_top1_agreement is not None:
            given = _merge(given or LLMThresholds(), LLMThresholds(min_top1_agreement=cfg.thresholds.min_top1_agreement))
        th = _merge(default_llm_thresholds(recipe.name), given)
    else:
        per_position = onnx_model is not None and _score_rank(onnx_model) >= 3
        th = _merge(default_thresholds(recipe.name, task, per_position=per_position), cfg.thresholds)
        if cfg.thresholds is not None and cfg.thresholds.min_top1_agreement is not None \
                and cfg.thresholds.min_top1_per_position is None:  # the caller's top-1 gate judges positions too
            th = _merge(th, Thresholds(min_top1_per_position=cfg.thresholds.min_top1_agreement))
    return _Inputs(obj, sample, _model_name(cfg.model, sample), targets, recipe, calib, data, task, reason, th)


def _score_rank(model) -> int:
    """The rank of the first output (the one task metrics read)."""
    out = model.graph.output
    return len(out[0].type.tensor_type.shape.dim) if out else 0


def _input_specs(obj, sample, inputs) -> list | None:
    """The model's input specs where they are known before export (ONNX file, sample, --input)."""
    from edgeq.specs import TensorSpec

    if isinstance(obj, Path):
        return onnx_io.io_specs(onnx_io.read_onnx(obj))
    if sample is not None:
        return sample.input_specs()
    return [TensorSpec.parse(s) for s in inputs or []] or None


def _check_data(data, split: str, specs, limit: int | None) -> None:
    """Read and check ``data`` against the model's inputs before any work.

    Files are checked in full (the feeds the build will use; calibration data must be finite); a
    sample on its first feed (its feeds share names and dtypes), which catches a sample of another
    model. Without known input specs (a PyTorch factory without ``inputs``) nothing can be checked.
    """
    from edgeq.validate.feeds import load_feeds

    if specs is None or isinstance(data, sources.Sample):
        return
    limit = limit if isinstance(data, (str, os.PathLike)) and Path(data).exists() else 1
    load_feeds(data, specs, split=split, limit=limit, finite=split == "calibration")


def _to_json(data: dict) -> str:
    from edgeq.validate.report import to_json

    return to_json(data) + "\n"


def _write_reports(folder: Path, data: dict, stages: _Stages) -> None:
    """build.json always; report.html as a stage of its own (a failure to render keeps the JSON)."""
    from edgeq.report.html import render

    def _html():
        (folder / REPORT_HTML).write_text(render(data), encoding="utf-8")

    (folder / REPORT_JSON).write_text(_to_json(data))
    stages.run("report", f"{REPORT_HTML} and {REPORT_JSON}", _html)
    data["stages"] = [r.as_dict() for r in stages.records]
    (folder / REPORT_JSON).write_text(_to_json(data))


def format_summary(result: BuildResult) -> str:
    """The table printed at the end of a build."""
    d = result.data
    lines = [f"{'model':<40} {'target':<12} {'size MB':>8} {'ideal MB':>8} {'SQNR dB':>8} {'cosine':>8}  "
             f"{'weights':>9}  result"]
    lines.append("-" * len(lines[0]))
    for r in result.summary:
        extra, t = "", r["task"]
        if "perplexity_ratio" in t:
            extra = f" perplexity x{t['perplexity_ratio']:.3f}, KLD {t['kld_mean']:.4f}"
        if "top1_agreement" in t:
            extra += f" top-1{' per position' if t.get('per_position') else ''} {t['top1_agreement']:.3f}"
        if "greedy_agreement" in t:
            extra += f", greedy {t['greedy_agreement']:.2f}"
        cov = r.get("coverage")
        weights = f"{cov['quantized']}/{cov['quantizable']}" if cov else ""
        lines.append(f"{r['model'][:40]:<40} {r['target']:<12} {r['bytes'] / 1e6:8.2f} {r['ideal_bytes'] / 1e6:8.2f} "
                     f"{format_number(r['sqnr_db'], '.1f'):>8} {format_number(r['cosine_mean'], '.4f'):>8}  "
                     f"{weights:>9}  {'pass' if r['passed'] else 'FAIL: ' + '; '.join(r['failed'])}{extra}")
        for note in r.get("notes", []):
            lines.append(f"{'':<40} note: {note}")
    for s in result.stages:
        if s.status != "ok":
            lines.append(f"stage {s.name} ({s.what}): {s.status.upper()}: {s.message}")
    th = ", ".join(f"{k} {v:g}" for k, v in d["thresholds"].items())
    lines.append(f"float model {d['model']['file']}: {d['model']['bytes'] / 1e6:.2f} MB; task {d['model']['task']} "
                 f"({d['model'].get('task_reason', '')}); gates: {th}")
    verdict = "PASS" if result.exit_code == 0 else "FAIL" if result.exit_code == 1 else \
        f"INCOMPLETE ({len(result.failed_stages)} stage(s) failed)"
    lines.append(f"built {result.path}/ in {result.seconds:.1f} s: report {result.report}; {verdict}")
    return "\n".join(lines)


__all__ = ["BuildConfig", "BuildFailed", "BuildResult", "build", "format_summary", "run_build", "versions"]
