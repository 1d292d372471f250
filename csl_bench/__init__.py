"""Benchmarks of csl_kernels against the official-style selection, the batched reference, torch.compile and every
fused backend, plus one CSL training step. Entry point: ``python -m csl_bench`` (see ``csl_bench/README.md``)."""
