"""Run one benchmark job in its own subprocess: wall time, peak RSS, a memory cap and a timeout.

Peak RSS is the worker's own ``VmHWM`` (``/proc/self/status``), which it reports as it ends.
Not ``ru_maxrss`` from ``wait4``/``RUSAGE_CHILDREN``: Linux carries the forking parent's
resident size into the child's at exec, so every job would show at least the parent's size. A
watchdog thread reads ``/proc/<pid>/status`` every 0.2 s, keeps the highest ``VmHWM`` it saw (the
peak of a job that dies before reporting) and ends the job's process group when its resident
memory passes the cap or its time runs out, so one runaway peer cannot take the (shared)
machine down; such a job is reported as killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")


@dataclass
class JobOutcome:
    result: dict  # what the worker wrote (empty if it died)
    wall_s: float
    peak_rss_mb: float
    returncode: int
    killed: str | None  # why the watchdog ended it
    log: Path


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
        pass
    return out


def run_job(job: dict, job_dir: Path, *, python: str = sys.executable, max_rss_mb: float = 10240,
            timeout_s: float = 1800, env: dict | None = None, worker: Path = WORKER) -> JobOutcome:
    """Run ``worker`` (default ``worker.py``) on ``job`` (a JSON-able dict) and collect what it wrote."""
    job_dir.mkdir(parents=True, exist_ok=True)
    tag = job["tag"]
    spec = job_dir / f"{tag}.job.json"
    result_path = job_dir / f"{tag}.result.json"
    log = job_dir / f"{tag}.log"
    result_path.unlink(missing_ok=True)
    spec.write_text(json.dumps({**job, "result_path": str(result_path)}, indent=1))
    child_env = {**os.environ, **(env or {})}
    # a scratch working folder: ORT's quantizer writes temporary files into the current one
    cwd = job_dir / f"{tag}.cwd"
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir()
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        p = subprocess.Popen([python, str(worker), str(spec)], stdout=logf, stderr=subprocess.STDOUT,
                             env=child_env, start_new_session=True, cwd=cwd)
        killed: list[str] = []
        sampled_hwm = [0.0]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.2):
                st = _status_kb(p.pid)
                rss = st.get("VmRSS", 0) / 1024
                sampled_hwm[0] = max(sampled_hwm[0], st.get("VmHWM", 0) / 1024)
                why = None
                if rss > max_rss_mb:
                    why = (f"killed by the benchmark: resident memory passed the {max_rss_mb / 1024:.1f} GB cap "
                           "(--max-rss-gb)")
                elif time.perf_counter() - t0 > timeout_s:
                    why = f"killed by the benchmark: still running after {timeout_s:.0f} s (--timeout)"
                if why:
                    killed.append(why)
                    try:
                        os.killpg(p.pid, signal.SIGKILL)  # the job's own process group, started above
                    except ProcessLookupError:
                        pass
                    return

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        p.wait()
        done.set()
        th.join()
    wall = time.perf_counter() - t0
    shutil.rmtree(cwd, ignore_errors=True)
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    peak = result.get("vmhwm_mb") or sampled_hwm[0]  # the sample misses at most the last 0.2 s
    return JobOutcome(result, wall, peak, p.returncode, killed[0] if killed else None, log)


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(text[-lines:])
