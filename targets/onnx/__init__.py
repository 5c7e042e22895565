"""The ONNX Runtime target: one ONNX graph (contrib ops where they fit) plus a slot-KV executor."""
