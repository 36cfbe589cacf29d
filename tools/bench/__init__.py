"""Helpers of ``tools/bench_quantize.py``: data sets, quantization methods, workers, metrics.

Not part of the edgeq package: the benchmark runs every quantization in its own subprocess
(``worker.py``) so that wall time and peak RSS belong to that one method.
"""
