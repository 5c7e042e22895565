"""Front ends: model files (Hugging Face folders, GGUF) to an IR module plus weights."""
