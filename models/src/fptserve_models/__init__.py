"""fptserve-models: FPT+ reference model in PyTorch and its ONNX export for fptserve."""

__version__ = "0.1.0"
