"""The ONNX QDQ backends: one exported graph, run by ONNX Runtime (onnxruntime-int8) or OpenVINO (openvino-int8)."""
