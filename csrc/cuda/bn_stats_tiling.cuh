// How the BN-statistics kernels split [N, C, *] maps over threads (docs/bn_stats_cuda.md):
// chunks of a channel's NC(S) planes, teams of threads walking plane spans with 16-byte packs,
// and the (row group, channel pack) tiling of channels-fastest rows.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "common.cuh"

namespace ddg::cuda {

// Longest plane span one team walks in the NC(S) backward.
constexpr int64_t kBackwardPiece = 16384;

// NC(S) statistics chunks of one channel: a run of planes_per_chunk whole planes (S <= kReduceChunk)
// or one kReduceChunk-long piece of one plane. Chunk k covers planes [k / pieces * planes_per_chunk, ...)
// at offsets [k % pieces * kReduceChunk, ...).
struct PlaneChunks {
  int64_t pieces;            // pieces per plane
  int64_t planes_per_chunk;  // 1 when pieces > 1
  int64_t per_channel;       // chunks per channel
};

inline PlaneChunks plane_chunks(int64_t N, int64_t S) {
  PlaneChunks c;
  c.pieces = (S + kReduceChunk - 1) / kReduceChunk;
  c.planes_per_chunk = c.pieces == 1 ? std::max<int64_t>(1, kReduceChunk / S) : 1;
  c.per_channel = (N + c.planes_per_chunk - 1) / c.planes_per_chunk * c.pieces;
  return c;
}

// A block's threads in teams of `size` (a power of two, 32..kThreads), one span per team at a time:
// the smallest team that leaves no thread without a pack of the span, so short planes (7x7) still
// keep most lanes busy and long ones use the whole block.
struct SpanTeams {
  int size;
  int log2_size;
  __host__ __device__ int per_block() const { return kThreads >> log2_size; }
};

inline SpanTeams span_teams(int64_t span_len, int width) {
  const int64_t packs = (span_len + width - 1) / width;
  SpanTeams t{kWarp, 5};
  while (t.size < kThreads && 2 * t.size <= packs) t.size *= 2, ++t.log2_size;
  return t;
}

// Elements of a Pack type, as a constant the unroller sees before inlining.
template <typename P>
constexpr int kPackSize = static_cast<int>(std::extent_v<decltype(P::v)>);

// Walks in[0, len) with a team of `size` threads, this one being `rank`, calling fn(pack) on the
// 16-byte-aligned Pack<T, VEC>s (UNROLL of them loaded before any is used) and on the unaligned head
// and the tail as Pack<T, 1>s. If fn returns a pack, it is stored at the same place of `out`, which
// must then have the same alignment as `in` modulo 16. Needs VEC == 1 or `in` aligned to sizeof(T).
template <int VEC, int UNROLL, typename T, typename Fn>
__device__ __forceinline__ void visit_span(const T* __restrict__ in, T* __restrict__ out, int len, int rank, int size,
                                           const Fn& fn) {
  using P = Pack<T, VEC>;
  using E = Pack<T, 1>;
  constexpr bool kStores = !std::is_void_v<decltype(fn(std::declval<P>()))>;
  auto one = [&](int i) {
    if constexpr (kStores)
      reinterpret_cast<E*>(out)[i] = fn(E{{in[i]}});
    else
      fn(E{{in[i]}});
  };
  int head = 0;
  if constexpr (VEC > 1)
    head = min(len, static_cast<int>((16 - reinterpret_cast<uintptr_t>(in) % 16) % 16 / sizeof(T)));
  const int packs = (len - head) / VEC, tail = head + packs * VEC;
  if (rank < head) one(rank);
  const P* src = reinterpret_cast<const P*>(in + head);
  P* dst = reinterpret_cast<P*>(out + head);
  int q = rank;
  for (; q + (UNROLL - 1) * size < packs; q += UNROLL * size) {
    P v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = src[q + u * size];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if constexpr (kStores)
        dst[q + u * size] = fn(v[u]);
      else
        fn(v[u]);
    }
  }
  for (; q < packs; q += size) {
    if constexpr (kStores)
      dst[q] = fn(src[q]);
    else
      fn(src[q]);
  }
  if (rank < len - tail) one(tail + rank);
}

// Grid-stride walk over the spans (plane, piece) of N*C planes of S elements cut into pieces of
// piece_len, in steps of `step` spans, keeping the channel plane % C by additions only.
struct SpanWalk {
  int64_t C, pieces, plane, piece, channel, d_plane, d_piece, d_channel;

  __device__ __forceinline__ SpanWalk(int64_t C_, int64_t S, int64_t piece_len, int64_t first, int64_t step)
      : C(C_), pieces((S + piece_len - 1) / piece_len) {
    plane = first / pieces;
    piece = first - plane * pieces;
    channel = plane % C;
    d_plane = step / pieces;
    d_piece = step - d_plane * pieces;
    d_channel = d_plane % C;
  }

  __device__ __forceinline__ void advance() {
    piece += d_piece;
    plane += d_plane;
    channel += d_channel;
    if (piece >= pieces) piece -= pieces, ++plane, ++channel;
    if (channel >= C) channel -= C;  // channel + d_channel + 1 <= 2C - 1
  }
};

// Channels-fastest tiling of a block: packs_per_pass consecutive channel packs of a row side by side
// (coalesced 16-byte loads), row_groups such rows at once; a block covers all G channel packs in
// ceil(G / packs_per_pass) passes. tree_top: the largest power of two below row_groups (the first
// step of the fixed merge tree over row groups), 0 when there is one.
struct RowTiling {
  int packs_per_pass;
  int row_groups;
  int tree_top;
};

inline RowTiling row_tiling(int64_t channel_packs) {
  RowTiling t;
  t.packs_per_pass = static_cast<int>(std::min<int64_t>(channel_packs, kThreads));
  t.row_groups = kThreads / t.packs_per_pass;
  t.tree_top = 0;
  while (2 * t.tree_top < t.row_groups) t.tree_top = t.tree_top ? 2 * t.tree_top : 1;
  if (t.row_groups == 1) t.tree_top = 0;
  return t;
}

// Grid of the channels-fastest backward: enough blocks for `packs` packs, no block without a row.
inline int64_t row_backward_blocks(int64_t R, const RowTiling& t, int64_t packs) {
  return std::max<int64_t>(1, std::min(elementwise_blocks(packs), (R + t.row_groups - 1) / t.row_groups));
}

}  // namespace ddg::cuda
