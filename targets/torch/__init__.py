"""The PyTorch target: executes the IR with torch ops on CPU or CUDA."""
