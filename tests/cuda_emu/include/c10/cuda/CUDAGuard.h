// Emulator stand-in for c10/cuda/CUDAGuard.h: there is one (emulated) device, so guards do nothing.
#pragma once

#include <c10/core/Device.h>

#include <optional>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
  explicit OptionalCUDAGuard(c10::Device) {}
  void set_device(c10::Device) {}
  void reset() {}
};

}  // namespace c10::cuda
