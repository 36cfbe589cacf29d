"""Reports for people: the build's self-contained HTML page (:mod:`edgeq.report.html`)."""
