"""Helpers of the model zoo benchmark (``tools/zoo.py``): real data made offline, the zoo's model
definitions, ONNX Runtime's static quantization baseline, and the models' natural metrics."""
