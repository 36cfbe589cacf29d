"""Orchestration: the stages that turn a model into validated packages, each one call.

The quantize pipeline (calibrate → decide → apply), the import stage every ONNX goes through,
per-layer sensitivity (analyze), the accuracy budget search and ``edgeq build``.
"""
