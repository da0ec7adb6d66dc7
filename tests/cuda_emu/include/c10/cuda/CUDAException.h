// Emulator stand-in for c10/cuda/CUDAException.h: launches raise their errors themselves.
#pragma once

#include <cuda_runtime.h>

#include <c10/util/Exception.h>

#define C10_CUDA_CHECK(expr) \
  do { \
    const cudaError_t cuda_emu_err = (expr); \
    TORCH_CHECK(cuda_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(cuda_emu_err)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
#define AT_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
