"""The model family: architecture, transformer, parameters and their HF names, loading, export, GGUF, tokenizer."""
