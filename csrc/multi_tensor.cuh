// Device-side helpers of the multi-tensor launch (apex's multi_tensor_apply idea, with
// the table in device memory instead of kernel arguments, so one launch covers any
// number of tensors): table access, chunk -> tensor lookup, 4-element packs, dtype
// conversions and the block reduction.  CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "pilot_step.h"

namespace pilot {
namespace mt {

// ---------------------------------------------------------------- the table
struct Table {
  const int64_t* chunk_starts;       // n + 1 entries
  const PilotTensorEntry* entries;   // n entries
  int64_t n;
};

// Host side: the launcher builds the view and passes it by value.
inline Table table_view(const void* base, int64_t n) {
  const char* bytes = static_cast<const char*>(base);
  Table t;
  t.chunk_starts = reinterpret_cast<const int64_t*>(bytes);
  t.entries = reinterpret_cast<const PilotTensorEntry*>(bytes + table_entries_offset(n));
  t.n = n;
  return t;
}

// The tensor that owns global chunk `c`: the last i with chunk_starts[i] <= c
// (tensors with no chunks are skipped automatically).  O(log n), all threads of a
// block read the same few words, so the loads are broadcast from L1.
__device__ __forceinline__ int64_t tensor_of_chunk(const Table& t, int64_t c) {
  int64_t lo = 0, hi = t.n - 1;  // invariant: chunk_starts[lo] <= c
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (__ldg(t.chunk_starts + mid) <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// ---------------------------------------------------------------- dtypes
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};

template <>
struct Convert<__half> {
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  // Round to nearest even, as torch's copy_ from fp32.
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) {
    return __bfloat162float(v);
  }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

// ---------------------------------------------------------------- loads and stores
// The tensor pointers come from the table, so nvcc cannot prove they are global and
// would emit generic loads; __ldcg/__stcg make them ld/st.global (cached in L2 only:
// every element is read and written once per step, there is no reuse for L1).
template <typename To, typename From>
__device__ __forceinline__ To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// Same-size unsigned word of a parameter dtype.
template <typename T>
struct Word;
template <>
struct Word<float> {
  using type = float;
};
template <>
struct Word<__half> {
  using type = unsigned short;
};
template <>
struct Word<__nv_bfloat16> {
  using type = unsigned short;
};

template <typename T>
__device__ __forceinline__ T load1(const T* p) {
  using W = typename Word<T>::type;
  return bit_cast<T>(__ldcg(reinterpret_cast<const W*>(p)));
}

template <typename T>
__device__ __forceinline__ void store1(T* p, T v) {
  using W = typename Word<T>::type;
  __stcg(reinterpret_cast<W*>(p), bit_cast<W>(v));
}

// 4 consecutive elements: one 16-byte access for fp32, one 8-byte access for the
// 16-bit dtypes.  The address must be aligned to sizeof(Pack4<T>).
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T>
struct PackWord;
template <>
struct PackWord<float> {
  using type = float4;
};
template <>
struct PackWord<__half> {
  using type = uint2;
};
template <>
struct PackWord<__nv_bfloat16> {
  using type = uint2;
};

template <typename T>
__device__ __forceinline__ Pack4<T> load4(const T* p) {
  using W = typename PackWord<T>::type;
  return bit_cast<Pack4<T>>(__ldcg(reinterpret_cast<const W*>(p)));
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const Pack4<T>& v) {
  using W = typename PackWord<T>::type;
  __stcg(reinterpret_cast<W*>(p), bit_cast<W>(v));
}

// ---------------------------------------------------------------- reduction
// Sum of `v` over the block; the result is valid in thread 0.  blockDim.x must be a
// multiple of 32 and at most 1024.  Every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const unsigned n_warps = blockDim.x >> 5;
  if (warp == 0) {
    v = lane < n_warps ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      v += __shfl_down_sync(0xffffffffu, v, offset);
    }
  }
  return v;
}

}  // namespace mt
}  // namespace pilot
