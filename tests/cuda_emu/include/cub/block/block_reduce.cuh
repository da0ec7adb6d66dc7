// Emulator stand-in for cub::BlockReduce with CUB's default algorithm,
// BLOCK_REDUCE_WARP_REDUCTIONS, in its order: a shuffle reduction inside every warp (see
// cub/warp/warp_reduce.cuh), lane 0 of each warp stores its warp's aggregate in TempStorage,
// __syncthreads(), then thread 0 folds the aggregates of warps 1, 2, ... into its own with
// op(accumulated, next). Only thread 0 gets the result; every other thread gets poison.
//
// TempStorage must be __shared__ and its slots record which thread last wrote / read them in
// which __syncthreads epoch: a second Reduce on the same TempStorage without a barrier after
// the first one's reads (CUB's documented requirement) is reported as a race.
#pragma once

#include "../../../cuda_emu.h"
#include "../warp/warp_reduce.cuh"

#include <cstdint>

namespace cub {

enum BlockReduceAlgorithm { BLOCK_REDUCE_RAKING_COMMUTATIVE_ONLY, BLOCK_REDUCE_RAKING, BLOCK_REDUCE_WARP_REDUCTIONS };

template <typename T, int BLOCK_DIM_X, BlockReduceAlgorithm ALGORITHM = BLOCK_REDUCE_WARP_REDUCTIONS,
          int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1, int LEGACY_PTX_ARCH = 0>
class BlockReduce {
  static_assert(ALGORITHM == BLOCK_REDUCE_WARP_REDUCTIONS,
                "cuda_emu reproduces CUB's default BLOCK_REDUCE_WARP_REDUCTIONS order only");
  static constexpr int kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;
  static constexpr int kWarps = (kThreads + 31) / 32;
  static constexpr int kLogicalWarp = kThreads < 32 ? kThreads : 32;
  static constexpr bool kEvenWarps = kThreads % kLogicalWarp == 0;
  static_assert((kLogicalWarp & (kLogicalWarp - 1)) == 0,
                "blocks under 32 threads must be a power of two (CUB uses a shared-memory warp reduction otherwise, "
                "which cuda_emu does not reproduce)");

  struct Slot {
    T value;
    uint64_t write_epoch, read_epoch;
    int32_t writer, reader;
  };

 public:
  struct TempStorage {
    Slot warp_aggregates[kWarps];
  };

  explicit BlockReduce(TempStorage& storage) : storage_(storage) { check_storage(); }
  BlockReduce() : storage_(private_storage()) { check_storage(); }

  template <typename Op>
  T Reduce(T input, Op op) {
    return reduce<true>(input, op, kThreads);
  }
  template <typename Op>
  T Reduce(T input, Op op, int num_valid) {
    return reduce<false>(input, op, num_valid);
  }
  T Sum(T input) { return Reduce(input, cub::Sum()); }
  T Sum(T input, int num_valid) { return Reduce(input, cub::Sum(), num_valid); }

 private:
  static TempStorage& private_storage() {
    __shared__ TempStorage storage;
    CUDA_EMU_SHARED_REGISTER(storage);
    return storage;
  }

  void check_storage() {
    if (!::cuda_emu::in_shared_memory(&storage_, sizeof(TempStorage)))
      ::cuda_emu::fail(__FILE__, __LINE__, "cub::BlockReduce TempStorage is not in __shared__ memory");
    if (blockDim.x != unsigned(BLOCK_DIM_X) || blockDim.y != unsigned(BLOCK_DIM_Y) ||
        blockDim.z != unsigned(BLOCK_DIM_Z))
      ::cuda_emu::fail(__FILE__, __LINE__, "cub::BlockReduce block dimensions differ from the launch's blockDim");
  }

  void write_slot(int w, const T& v) {
    Slot& s = storage_.warp_aggregates[w];
    const int me = ::cuda_emu::linear_thread();
    if (s.read_epoch == ::cuda_emu::block_epoch() && s.reader != me)
      ::cuda_emu::fail(__FILE__, __LINE__,
                       "race on cub::BlockReduce TempStorage: a warp aggregate is overwritten in the same "
                       "__syncthreads interval in which another thread reads it (TempStorage reused without a "
                       "__syncthreads() between two reductions)");
    s.value = v;
    s.write_epoch = ::cuda_emu::block_epoch();
    s.writer = me;
  }

  T read_slot(int w) {
    Slot& s = storage_.warp_aggregates[w];
    const int me = ::cuda_emu::linear_thread();
    if (s.write_epoch == ::cuda_emu::block_epoch() && s.writer != me)
      ::cuda_emu::fail(__FILE__, __LINE__,
                       "race on cub::BlockReduce TempStorage: a warp aggregate is read in the same __syncthreads "
                       "interval in which another thread writes it (TempStorage reused without a __syncthreads() "
                       "between two reductions)");
    s.read_epoch = ::cuda_emu::block_epoch();
    s.reader = me;
    return s.value;
  }

  template <bool FULL_TILE, typename Op>
  T reduce(T input, Op op, int num_valid) {
    const int tid = ::cuda_emu::linear_thread();
    const int warp = kWarps == 1 ? 0 : tid / 32;
    const int warp_offset = warp * kLogicalWarp;
    const int warp_valid = (FULL_TILE && kEvenWarps) || warp_offset + kLogicalWarp <= num_valid
                               ? kLogicalWarp
                               : num_valid - warp_offset;
    T aggregate = emu_detail::warp_reduce(input, op, kLogicalWarp, warp_valid, tid % kLogicalWarp);
    if (tid % 32 == 0) write_slot(warp, aggregate);
    __syncthreads();
    if (tid != 0) return ::cuda_emu::poison<T>();
    for (int w = 1; w < kWarps; ++w)
      if (FULL_TILE || w * kLogicalWarp < num_valid) aggregate = op(aggregate, read_slot(w));
    return aggregate;
  }

  TempStorage& storage_;
};

}  // namespace cub
