"""Deployment targets, one folder each, behind :class:`targets.base.Target`.

edgeq's core never imports a target: it finds them through the ``edgeq.targets`` entry-point
group (see pyproject.toml), and their package runners through ``edgeq.runners``.
"""
