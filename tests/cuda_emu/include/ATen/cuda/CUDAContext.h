// Emulator stand-in for ATen/cuda/CUDAContext.h: device properties and the current stream.
#pragma once

#include <cuda_runtime.h>

#include <c10/cuda/CUDAStream.h>

namespace at::cuda {

inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp prop;
  return &prop;
}
inline cudaDeviceProp* getDeviceProperties(int64_t) { return getCurrentDeviceProperties(); }
inline int warp_size() { return 32; }

using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;

}  // namespace at::cuda

#include <c10/cuda/CUDAException.h>
