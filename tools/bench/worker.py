"""One benchmark job in its own process: ``python tools/bench/worker.py JOB.json``.

Job kinds: ``quantize`` (a method from :mod:`bench.methods`), ``evaluate`` (fidelity and
latency, :mod:`bench.evaluate`), ``export`` (a bundled sample to ONNX with ``edgeq.export``).
The result (or the error, with its traceback) is written as JSON to ``job["result_path"]``;
the exit code is 0 on success, 1 on a failure the job reports.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/, for `import bench`


def _quantize(job: dict) -> dict:
    from bench.methods import METHODS

    out = Path(job["out_path"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    res = METHODS[job["method"]].run(job)
    from bench.sizes import file_bytes, ideal_bytes

    res["size_bytes"] = file_bytes(out)
    res.update(ideal_bytes(out))
    return res


def _evaluate(job: dict) -> dict:
    from bench.evaluate import run

    return run(job)


def _export(job: dict) -> dict:
    import edgeq

    res = edgeq.export(job["model"], job["out_path"], force=True)
    return {"path": str(res.path), "exporter": res.exporter, "opset": res.opset, "seconds": res.seconds}


KINDS = {"quantize": _quantize, "evaluate": _evaluate, "export": _export}


def main(spec_path: str) -> int:
    return run_job_file(spec_path, KINDS)


def run_job_file(spec_path: str, kinds: dict) -> int:
    """Run the job in ``spec_path`` with its ``kinds`` function; write the result (or the error), CPU time and
    memory to the job's ``result_path``. Exit code 0 if it ran, 1 if it raised."""
    import resource

    job = json.loads(Path(spec_path).read_text())
    result_path = Path(job["result_path"])
    try:
        result = {"ok": True, **kinds[job["kind"]](job)}
        code = 0
    except BaseException as e:  # reported, not raised: the parent records it as the row's error
        hint = getattr(e, "hint", None)
        msg = (str(e).strip() or type(e).__name__).splitlines()
        result = {"ok": False, "error_type": type(e).__name__, "error": msg[0][:600] if msg else "",
                  "error_full": "\n".join(msg)[:4000], "hint": hint, "traceback": traceback.format_exc()[-6000:]}
        code = 1
        traceback.print_exc()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = ru.ru_utime + ru.ru_stime
    result.update(memory())
    result_path.write_text(json.dumps(result, indent=1, default=str))
    return code


def memory() -> dict:
    """This process's peak and current resident memory (MB) from /proc.

    ``VmHWM`` belongs to the address space made by ``exec``; ``getrusage``'s ``ru_maxrss`` would
    also carry the forking parent's resident size (Linux copies it at exec), so it is not used.
    """
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[f"{key.lower()}_mb"] = int(rest.split()[0]) / 1024
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
