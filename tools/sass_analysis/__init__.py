"""Static analysis of the SASS that nvcc produces for the CUDA kernels (docs/cuda_sass.md)."""
