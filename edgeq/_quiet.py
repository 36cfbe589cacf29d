"""Keep third-party noise (exporter banners, warnings, log lines) off the user's terminal.

Anything a library prints while edgeq works is captured; with ``verbose`` it passes through.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator

_NOISY_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir", "coremltools",
                  "transformers")


def quiet_libraries() -> None:
    """For the command line: the libraries' own warnings (e.g. onnx-ir's about a damaged graph, which
    edgeq then reports as an error naming the file) do not reach the terminal; ``--verbose`` keeps them."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[io.StringIO]:
    """Silence stdout, stderr, warnings and the noisy loggers unless ``verbose``; yield what was captured."""
    captured = io.StringIO()
    if verbose or os.environ.get("EDGEQ_VERBOSE") == "1":
        yield captured
        return
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield captured
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)
