// Emulator stand-in for c10/cuda/CUDAStream.h: one stream; kernels run when launched.
#pragma once

#include <cuda_runtime.h>

#include <c10/core/Device.h>

namespace c10::cuda {

class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return stream(); }
  c10::DeviceIndex device_index() const { return 0; }
  void synchronize() const {}
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace c10::cuda
