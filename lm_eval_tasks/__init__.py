"""Our lm-eval task YAMLs and their helpers (README.md); lm-eval reads this folder as an include path."""
