"""After training: lm-eval benchmarks in process, singular values of ΔW."""
