"""The TensorRT target: a standard-ops ONNX graph TensorRT parses, and the engine built from it."""
