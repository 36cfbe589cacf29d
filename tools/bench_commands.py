"""How long edgeq's own long commands take: ``build`` (no arguments), ``analyze`` and ``--budget``.

Compares checkouts (e.g. the commit before a speed-up and after it): each command runs in a fresh
interpreter with ``PYTHONPATH`` set to the checkout, the checkouts interleaved round by round (the
order reversed every other round) so machine load hits them alike. Per run: wall time, the
children's CPU time (user + system), the load average when it started, and for ``build`` the stage
times from its ``build.json`` (validation per candidate too: the iOS package against the ``.ort``).
Prints a table of medians and writes every run to ``--json``.

    python tools/bench_commands.py --checkout before=/tmp/edgeq-before --checkout after=. --runs 2 \\
        --json /tmp/commands.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (label, argv after `python -m edgeq`, the files a run needs first): the measured commands
COMMANDS = {
    "build": ["build", "-o", "dist", "--force", "--no-progress"],
    "analyze": ["analyze", "minilm.onnx", "--recipe", "w4a16", "--data", "minilm", "--limit", "5", "--no-progress"],
    "budget": ["quantize", "minilm.onnx", "--recipe", "w4a16", "--calib", "minilm", "--budget", "cosine>=0.995",
               "-o", "minilm.budget.onnx", "--force", "--no-progress"],
}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(root: Path, name: str, cwd: Path) -> dict:
    """One command in a fresh interpreter; its wall and CPU time, exit code, and build stage times."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    load = os.getloadavg()[0]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgeq", *COMMANDS[name]], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
    run = {"wall_s": time.perf_counter() - t0, "cpu_s": _children_cpu() - cpu0, "load_at_start": load,
           "exit": proc.returncode, "last_line": (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]}
    if name == "build" and (cwd / "dist" / "build.json").exists():
        b = json.loads((cwd / "dist" / "build.json").read_text())
        run["stages"] = {f"{s['name']} {s['what']}": s["seconds"] for s in b["stages"]}
        run["validation_s"] = {c["model"]["label"]: c.get("seconds") for c in b["validation"]["candidates"]}
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkout", action="append", metavar="LABEL=PATH", required=True,
                   help="a source tree to time (its edgeq package is imported), repeatable")
    p.add_argument("--commands", default=",".join(COMMANDS), help=f"comma-separated, of {', '.join(COMMANDS)}")
    p.add_argument("--runs", type=int, default=1, help="rounds (default 1)")
    p.add_argument("--json", type=Path, help="write every run here")
    args = p.parse_args()
    roots = {}
    for item in args.checkout:
        label, _, path = item.partition("=")
        roots[label] = Path(path).resolve()
    names = [c for c in args.commands.split(",") if c]
    unknown = sorted(set(names) - set(COMMANDS))
    if unknown:
        p.error(f"unknown command(s) {', '.join(unknown)}; choose from {', '.join(COMMANDS)}")
    runs: dict[str, dict[str, list[dict]]] = {n: {label: [] for label in roots} for n in names}
    with tempfile.TemporaryDirectory(prefix="edgeq-bench-commands-") as tmp:
        work = Path(tmp)
        first = next(iter(roots.values()))
        # the float model analyze and --budget read: exported once, by the first checkout
        subprocess.run([sys.executable, "-m", "edgeq", "export", "minilm", "-o", "minilm.onnx"], cwd=work,
                       env={**os.environ, "PYTHONPATH": str(first)}, check=True, capture_output=True)
        for r in range(args.runs):
            order = list(roots.items()) if r % 2 == 0 else list(reversed(roots.items()))
            for name in names:
                for label, root in order:
                    shutil.rmtree(work / "dist", ignore_errors=True)
                    run = run_once(root, name, work)
                    runs[name][label].append(run)
                    print(f"round {r + 1}: {name:<8} {label:<10} {run['wall_s']:7.1f} s wall, "
                          f"{run['cpu_s']:7.1f} s CPU, load {run['load_at_start']:.1f}, exit {run['exit']}", flush=True)
    print()
    print(f"{'command':<10}" + "".join(f"{label + ' wall':>16}{label + ' CPU':>14}" for label in roots))
    for name in names:
        row = f"{name:<10}"
        for label in roots:
            rs = runs[name][label]
            wall, cpu = statistics.median(r["wall_s"] for r in rs), statistics.median(r["cpu_s"] for r in rs)
            row += f"{wall:>14.1f} s{cpu:>12.1f} s"
        print(row)
    if "build" in names:
        for label in roots:
            last = runs["build"][label][-1]
            stages = last.get("stages", {}).items()
            print(f"build stages ({label}): " + ", ".join(f"{k.split(' ')[0]} {v:.1f} s" for k, v in stages))
            print(f"validation per candidate ({label}): " + ", ".join(f"{k} {v:.2f} s"
                                                                     for k, v in last.get("validation_s", {}).items()))
    if args.json:
        args.json.write_text(json.dumps({"checkouts": {k: str(v) for k, v in roots.items()}, "runs": runs}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
