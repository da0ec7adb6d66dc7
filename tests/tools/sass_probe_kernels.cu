template <typename T, int N>
struct alignas(sizeof(T) * N) Pack { T v[N]; };

// A plain grid-stride copy: VEC = 4 moves 16-byte packs, VEC = 1 single floats.
template <typename T, int VEC>
__global__ void copy_kernel(const T* __restrict__ in, T* __restrict__ out, long packs) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < packs; i += (long)gridDim.x * blockDim.x)
    reinterpret_cast<Pack<T, VEC>*>(out)[i] = reinterpret_cast<const Pack<T, VEC>*>(in)[i];
}
template __global__ void copy_kernel<float, 4>(const float*, float*, long);
template __global__ void copy_kernel<float, 1>(const float*, float*, long);

// A dynamically indexed array cannot live in registers: local memory.
__global__ void local_array_kernel(const int* __restrict__ idx, float* __restrict__ out) {
  float a[64];
  for (int i = 0; i < 64; ++i) a[i] = out[i * blockDim.x + threadIdx.x];
  for (int i = 0; i < 64; ++i) a[idx[i * blockDim.x + threadIdx.x] & 63] += 1.0f;
  out[threadIdx.x] = a[idx[threadIdx.x] & 63];
}

// 48 values live at once under a 32-register cap (launch bounds 1024 x 2 blocks): ptxas spills.
__global__ void __launch_bounds__(1024, 2) spill_kernel(const float* __restrict__ in, float* __restrict__ out) {
  float v[48];
#pragma unroll
  for (int i = 0; i < 48; ++i) v[i] = in[i * blockDim.x + threadIdx.x];
  float s = 0;
#pragma unroll
  for (int i = 0; i < 48; ++i) s += v[i] * v[47 - i] * v[(i * 7) % 48];
  out[threadIdx.x] = s;
}
