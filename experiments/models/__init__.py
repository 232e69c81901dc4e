"""Base models: llama2.c checkpoints, hub models, LLaMA built from a config; their tokenizers."""
