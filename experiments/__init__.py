"""Experiment plumbing: offline data, pretrained models and tokenizers, and the run entry point."""
