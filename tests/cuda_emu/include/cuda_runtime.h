// Emulator stand-in for the CUDA runtime header: the types and calls host code around a launch uses.
#pragma once

#include "../cuda_emu.h"

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };

// Launch errors are raised by cuda_emu::launch itself, so nothing is ever pending.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "cuda_emu error"; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// The device the emulator reports: few SMs, so grid-stride loops sized by the SM count iterate.
struct cudaDeviceProp {
  char name[256] = "cuda_emu (CUDA kernels emulated on CPU fibers)";
  int major = 9, minor = 0;
  int multiProcessorCount = 4;
  int warpSize = 32;
  int maxThreadsPerBlock = 1024;
  int maxThreadsPerMultiProcessor = 2048;
  int maxThreadsDim[3] = {1024, 1024, 64};
  int maxGridSize[3] = {2147483647, 65535, 65535};
  size_t sharedMemPerBlock = 48 * 1024;
  size_t sharedMemPerBlockOptin = 227 * 1024;
  size_t sharedMemPerMultiprocessor = 228 * 1024;
  int regsPerBlock = 65536;
  int l2CacheSize = 50 * 1024 * 1024;
  size_t totalGlobalMem = size_t(80) << 30;
};
