"""Execution backends (imported as ``spa.backends``). Only ONNX Runtime (CPU) for now."""
