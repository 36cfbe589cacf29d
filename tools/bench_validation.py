"""How long validating each package of one `edgeq build` output takes: open its runner (for the
`.mlpackage`: read the program, the reference executor's load, its ONNX Runtime translation) and run
the evaluation feeds, packages interleaved, medians of wall time. Issue 14's "the iOS validation at
most 2x the `.ort`'s" is the ratio this prints.

    python tools/bench_validation.py OUT --data minilm --rounds 5 --json validation.json

OUT is a build folder (`edgeq build -o OUT`) with its float model and `android/`, `ios18/` packages.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="an `edgeq build` output folder")
    ap.add_argument("--data", default="minilm", help="evaluation feeds (a sample name, .npz file or folder)")
    ap.add_argument("--packages", default="android,ios18", help="package folders in OUT, the first the baseline")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import coremltools  # noqa: F401  (imported by the build's package stage before it validates)

    from edgeq import onnx_io
    from edgeq.validate.feeds import load_feeds
    from edgeq.validate.runners import open_runner

    float_model = next(p for p in sorted(args.out.glob("*.onnx")) if p.name.count(".") == 1)
    feeds, desc = load_feeds(args.data, onnx_io.io_specs(onnx_io.read_onnx(float_model)), split="evaluation")
    names = args.packages.split(",")
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for k in range(args.rounds):
        for name in names if k % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            runner = open_runner(args.out / name)
            t1 = time.perf_counter()
            for feed in feeds:
                runner.run(feed)
            times[name].append((t1 - t0, time.perf_counter() - t1))
            del runner
    rows = {n: {"load_s": statistics.median(a for a, _ in v), "run_s": statistics.median(b for _, b in v)}
            for n, v in times.items()}
    base = rows[names[0]]
    print(f"{len(feeds)} feeds ({desc}), {args.rounds} interleaved rounds, medians of wall time")
    print(f"{'package':10s} {'load s':>8s} {'run s':>8s} {'load+run x':>11s} {'run x':>7s}")
    for n, r in rows.items():
        r["ratio_load_run"] = (r["load_s"] + r["run_s"]) / (base["load_s"] + base["run_s"])
        r["ratio_run"] = r["run_s"] / base["run_s"]
        print(f"{n:10s} {r['load_s']:8.3f} {r['run_s']:8.3f} {r['ratio_load_run']:10.2f}x {r['ratio_run']:6.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"feeds": len(feeds), "rounds": args.rounds, "packages": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
