"""Registration of the GPU backends (Triton kernels and the CUDA extension)."""
