"""Start-up time of the ``edgeq`` command: wall time of commands that should answer at once.

Compares checkouts (e.g. before and after a change to what the CLI imports at start-up): each
command runs in a fresh interpreter with ``PYTHONPATH`` set to the checkout, the checkouts'
runs interleaved (``--runs`` rounds) so machine load hits all of them alike; the table shows
the median and the fastest run.

    python tools/bench_startup.py --checkout before=/work/main --checkout after=. --runs 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (label, argv after `python`): what a user types and expects an instant answer to
COMMANDS = [
    ("edgeq --help", ["-m", "edgeq", "--help"]),
    ("edgeq quantize --help", ["-m", "edgeq", "quantize", "--help"]),
    ("edgeq quantize (missing argument)", ["-m", "edgeq", "quantize"]),
    ("edgeq quantize --data without --budget", ["-m", "edgeq", "quantize", "m.onnx", "-o", "q.onnx", "--data", "d"]),
    ("python -c 'import edgeq'", ["-c", "import edgeq"]),
]


def time_once(root: Path, argv: list[str], cwd: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkout", action="append", metavar="LABEL=PATH", required=True,
                   help="a source tree to time (its edgeq package is imported), repeatable")
    p.add_argument("--runs", type=int, default=7, help="rounds per command (default 7)")
    args = p.parse_args()
    roots = {}
    for item in args.checkout:
        label, _, path = item.partition("=")
        roots[label] = Path(path).resolve()
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as cwd:
        for label, argv in COMMANDS:
            for root in roots.values():  # warm the file cache and the .pyc-less import path once
                time_once(root, argv, cwd)
            for _ in range(args.runs):
                for name, root in roots.items():
                    times.setdefault((label, name), []).append(time_once(root, argv, cwd))
    names = list(roots)
    head = f"{'command':<42}" + "".join(f"{n + ' median':>16}{n + ' min':>13}" for n in names)
    print(head)
    print("-" * len(head))
    for label, _ in COMMANDS:
        row = f"{label:<42}"
        for n in names:
            t = times[(label, n)]
            row += f"{statistics.median(t):15.2f}s{min(t):12.2f}s"
        print(row)
    print(f"{args.runs} interleaved runs each; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
