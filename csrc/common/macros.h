// Portability macros for math shared by the CPU (g++) and CUDA (nvcc) kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DDG_HD __host__ __device__ __forceinline__
#else
#define DDG_HD inline
#endif
