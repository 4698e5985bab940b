"""Graph capture and serialization: jit.trace, torch.export, ONNX, compile, checkpoints."""
