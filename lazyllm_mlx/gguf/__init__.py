"""llama.cpp GGUF files as mlx-lm models: a bounds-checked reader, the loader, the tokenizer."""
