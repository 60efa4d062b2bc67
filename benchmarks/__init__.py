"""Benchmarks of ecar_infer (run from the checkout: python -m benchmarks.NAME): FLOPs, throughput against
DiT-XL/2, kernels, CUDA graphs, the head variants, guidance and request time; the GPU suite runs them."""
