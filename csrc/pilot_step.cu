// The fused PILoT step (the update of paper §3 on both factors m and w, with
// torch.optim.SGD's momentum) for every tensor of a (device, dtype) group in ONE launch.
// CUDA headers + our own headers only: no torch header, so this file compiles
// standalone with nvcc (tests/test_cuda_build.py does exactly that).
//
// Work mapping: tensor i is cut into chunks of kPilotChunk elements; the chunks of all
// tensors are numbered globally (chunk_starts in the table, see pilot_step.h).  The
// grid is persistent: min(total chunks, SMs x resident blocks per SM) blocks, and block
// b handles chunks b, b + gridDim.x, ...; each chunk's tensor is found by binary search
// over chunk_starts.  Inside a chunk each thread takes 4-element vectors (16-byte fp32
// loads/stores, 8-byte for bf16/fp16) when every pointer of the tensor is aligned, and
// single elements otherwise or for a tensor's last < 4 elements.  All indices int64.
//
// Math: fp32, one IEEE rounding per operation in the order of the reference (explicit
// __f*_rn intrinsics, which nvcc never contracts into FMAs), so m, w, the momentum
// buffers and x equal the reference's bit for bit; only the L1 sum's order differs.
//
// Written elements (adopt_writes): x is read and compared bit for bit with the
// fl(m·w) the last step wrote, recomputed from the old m, w; an element that differs
// was written since (through .data, a pruning mask, a checkpoint load) and is re-split
// from its current value exactly as pilot_kernels.init.split does, its momentum
// restarting (b = d) for this element only.
//
// L1: each thread sums |m_new * w_new| over its elements, the block reduces, and
// thread 0 does one atomicAdd into l1_accum per block.  Block 0 zeroes l1_clear.
// found_inf (read here, on the device) != 0: nothing is written except l1, which gets
// the sum over the unchanged m * w.  grad_scale, found_inf and, in capturable mode, lr
// and alpha are read by the kernel, never by the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "multi_tensor.cuh"
#include "pilot_step.h"

namespace pilot {
namespace {

struct StepArgs {
  mt::Table table;
  int64_t total_chunks;
  PilotHyper h;
  const float* grad_scale;  // null: no unscaling
  const float* found_inf;   // null: never skip
  float* l1_accum;          // null: no L1
  float* l1_clear;          // null: nothing to clear
};

// pilot_kernels.init._w_from_m: sign(x)·m for β = 0 (torch.sign: NaN → 0), else x / m.
__device__ __forceinline__ float w_of(float x, float m, bool beta_zero) {
  if (beta_zero) return __fmul_rn(x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f), m);
  return __fdiv_rn(x, m);
}

// pilot_kernels.init.split of one fp32 value, the same fp32 operations in its order:
// the closed form, then m nudged by +1, -1, +2, -2 ulps (w recomputed) to the first
// pair whose product is x exactly.
__device__ __forceinline__ void split_element(float x, const PilotHyper& h, float& m_out,
                                              float& w_out) {
  const bool bz = h.beta_zero != 0;
  float m;
  if (bz) {
    m = __fsqrt_rn(fabsf(x));
  } else if (fabsf(x) > kPilotHuge) {  // hypot(β/2, x) == |x| here (kPilotMaxBeta)
    m = __fsqrt_rn(__fadd_rn(h.half_beta, fabsf(x)));
  } else {
    const float root = __fsqrt_rn(__fadd_rn(h.beta_sq, __fmul_rn(__fmul_rn(4.0f, x), x)));
    m = __fsqrt_rn(__fmul_rn(__fadd_rn(h.beta, root), 0.5f));
  }
  float w = w_of(x, m, bz);
  if (__fmul_rn(m, w) != x && m > 0.0f && m <= 3.402823466e38f) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int ulps = (k & 1) ? -(k / 2 + 1) : k / 2 + 1;  // +1, -1, +2, -2 (no array: no stack)
      const float mk = __int_as_float(__float_as_int(m) + ulps);
      const float wk = w_of(x, mk, bz);
      if (__fmul_rn(mk, wk) == x) {
        m_out = mk;
        w_out = wk;
        return;
      }
    }
  }
  m_out = m;
  w_out = w;
}

// (0) of reference.pilot_step: true (and m, w re-split from x) where x is not the
// fl(m·w) the last step wrote.
template <typename T>
__device__ __forceinline__ bool adopt(T x, float& m, float& w, const PilotHyper& h) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;  // not ==: NaN, -0
  const T written = mt::Convert<T>::from_float(__fmul_rn(m, w));
  if (mt::bit_cast<Bits>(written) == mt::bit_cast<Bits>(x)) return false;
  split_element(mt::Convert<T>::to_float(x), h, m, w);
  return true;
}

// Steps (1)-(6) of reference.pilot_step for one element, in place on m, w, bm, bw.  Each operation is one
// torch op of the reference (reference.py), rounded once, in the same order.
template <bool kMomentum>
__device__ __forceinline__ void update_element(float g, float& m, float& w, float& bm,
                                               float& bw, bool first, const PilotHyper& h,
                                               bool has_scale, float scale) {
  if (has_scale) g = __fdiv_rn(g, scale);                       // (1) g / grad_scale
  if (h.maximize) g = -g;                                        // (2)
  if (h.has_weight_decay) {                                      // (3) g + λ·(m·w)
    g = __fadd_rn(g, __fmul_rn(h.weight_decay, __fmul_rn(m, w)));
  }
  float dm = __fadd_rn(__fmul_rn(g, w), __fmul_rn(h.two_alpha, m));  // (4) old m, w
  float dw = __fadd_rn(__fmul_rn(g, m), __fmul_rn(h.two_alpha, w));
  if (kMomentum) {                                               // (5) as torch.optim.SGD
    if (first) {
      bm = dm;
      bw = dw;
    } else {
      bm = __fadd_rn(__fmul_rn(h.momentum, bm), __fmul_rn(h.one_minus_dampening, dm));
      bw = __fadd_rn(__fmul_rn(h.momentum, bw), __fmul_rn(h.one_minus_dampening, dw));
    }
    if (h.nesterov) {
      dm = __fadd_rn(dm, __fmul_rn(h.momentum, bm));
      dw = __fadd_rn(dw, __fmul_rn(h.momentum, bw));
    } else {
      dm = bm;
      dw = bw;
    }
  }
  m = __fsub_rn(m, __fmul_rn(h.lr, dm));                         // (6)
  w = __fsub_rn(w, __fmul_rn(h.lr, dw));
}

// One element at index i of tensor e; returns |m_new * w_new|.  T: x's dtype, G: the
// gradient's.
template <typename T, typename G, bool kMomentum>
__device__ __forceinline__ float step_one(const PilotTensorEntry& e, int64_t i, bool first,
                                          const PilotHyper& h, bool has_scale, float scale) {
  const G* g_ptr = static_cast<const G*>(e.grad);
  T* x_ptr = static_cast<T*>(e.x);
  float m = mt::load1(e.m + i);
  float w = mt::load1(e.w + i);
  float bm = 0.0f, bw = 0.0f;
  if (kMomentum && !first) {
    bm = mt::load1(e.momentum_m + i);
    bw = mt::load1(e.momentum_w + i);
  }
  bool restart = first;
  if (h.adopt_writes) restart |= adopt(mt::load1(x_ptr + i), m, w, h);
  update_element<kMomentum>(mt::Convert<G>::to_float(mt::load1(g_ptr + i)), m, w, bm, bw,
                            restart, h, has_scale, scale);
  mt::store1(e.m + i, m);
  mt::store1(e.w + i, w);
  if (kMomentum) {
    mt::store1(e.momentum_m + i, bm);
    mt::store1(e.momentum_w + i, bw);
  }
  const float x = __fmul_rn(m, w);                               // (7) x = m·w
  mt::store1(x_ptr + i, mt::Convert<T>::from_float(x));
  return fabsf(x);
}

// Elements [begin, end) of tensor e (one chunk); returns this thread's share of L1.
template <typename T, typename G, bool kMomentum>
__device__ __forceinline__ float step_chunk(const PilotTensorEntry& e, int64_t begin,
                                            int64_t end, const PilotHyper& h,
                                            bool has_scale, float scale) {
  const bool first = e.first != 0;
  float l1 = 0.0f;
  int64_t scalar_begin = begin;
  if (e.aligned) {
    // begin is a multiple of kPilotChunk, hence of 4: every vector below is aligned.
    const G* g_ptr = static_cast<const G*>(e.grad);
    T* x_ptr = static_cast<T*>(e.x);
    const int64_t n_vec = (end - begin) >> 2;
    for (int64_t v = threadIdx.x; v < n_vec; v += blockDim.x) {
      const int64_t i = begin + (v << 2);
      const mt::Pack4<G> g = mt::load4(g_ptr + i);
      mt::Pack4<float> m = mt::load4(e.m + i);
      mt::Pack4<float> w = mt::load4(e.w + i);
      mt::Pack4<float> bm{}, bw{};
      if (kMomentum && !first) {
        bm = mt::load4(e.momentum_m + i);
        bw = mt::load4(e.momentum_w + i);
      }
      mt::Pack4<T> x_in{}, x;
      if (h.adopt_writes) x_in = mt::load4(x_ptr + i);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        bool restart = first;
        if (h.adopt_writes) restart |= adopt(x_in.v[k], m.v[k], w.v[k], h);
        update_element<kMomentum>(mt::Convert<G>::to_float(g.v[k]), m.v[k], w.v[k], bm.v[k],
                                  bw.v[k], restart, h, has_scale, scale);
        const float xf = __fmul_rn(m.v[k], w.v[k]);
        x.v[k] = mt::Convert<T>::from_float(xf);
        l1 += fabsf(xf);
      }
      mt::store4(e.m + i, m);
      mt::store4(e.w + i, w);
      if (kMomentum) {
        mt::store4(e.momentum_m + i, bm);
        mt::store4(e.momentum_w + i, bw);
      }
      mt::store4(x_ptr + i, x);
    }
    scalar_begin = begin + (n_vec << 2);  // < 4 elements left, in a tensor's last chunk
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += blockDim.x) {
    l1 += step_one<T, G, kMomentum>(e, i, first, h, has_scale, scale);
  }
  return l1;
}

// found_inf set: nothing changes; this thread's share of Σ|m·w| over the chunk.
__device__ __forceinline__ float l1_of_chunk(const PilotTensorEntry& e, int64_t begin,
                                             int64_t end) {
  float l1 = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    l1 += fabsf(__fmul_rn(mt::load1(e.m + i), mt::load1(e.w + i)));
  }
  return l1;
}

template <typename T, typename G, bool kMomentum>
__global__ void __launch_bounds__(kPilotBlock) pilot_step_kernel(const StepArgs a) {
  if (blockIdx.x == 0 && threadIdx.x == 0 && a.l1_clear != nullptr) *a.l1_clear = 0.0f;
  // NaN != 0 is true: a NaN flag skips, as found_inf.ne(0) does in the reference.
  const bool skip = a.found_inf != nullptr && *a.found_inf != 0.0f;
  if (skip && a.l1_accum == nullptr) return;  // uniform over the grid
  const bool has_scale = a.grad_scale != nullptr;
  const float scale = has_scale ? *a.grad_scale : 1.0f;
  PilotHyper h = a.h;
  if (h.lr_device != nullptr) h.lr = *h.lr_device;
  // The reference computes (2 * alpha) as an fp32 tensor op when alpha is a tensor.
  if (h.alpha_device != nullptr) h.two_alpha = __fmul_rn(2.0f, *h.alpha_device);

  float l1 = 0.0f;
  for (int64_t c = blockIdx.x; c < a.total_chunks; c += gridDim.x) {
    const int64_t t = mt::tensor_of_chunk(a.table, c);
    const PilotTensorEntry e = a.table.entries[t];
    const int64_t begin = (c - a.table.chunk_starts[t]) * kPilotChunk;
    const int64_t end = begin + kPilotChunk < e.numel ? begin + kPilotChunk : e.numel;
    if (skip) {
      l1 += l1_of_chunk(e, begin, end);
    } else {
      l1 += step_chunk<T, G, kMomentum>(e, begin, end, h, has_scale, scale);
    }
  }
  if (a.l1_accum != nullptr) {
    const float block_l1 = mt::block_sum(l1);
    if (threadIdx.x == 0) atomicAdd(a.l1_accum, block_l1);
  }
}

// Resident blocks per SM x SMs of `device`, cached per kernel instantiation.
constexpr int kMaxDevices = 64;

template <typename T, typename G, bool kMomentum>
cudaError_t persistent_grid(int device, int64_t* blocks) {
  static std::atomic<int64_t> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int64_t cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *blocks = cached;
      return cudaSuccess;
    }
  }
  int sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, pilot_step_kernel<T, G, kMomentum>,
                                                      kPilotBlock, 0);
  if (err != cudaSuccess) return err;
  const int64_t n = static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
  if (device >= 0 && device < kMaxDevices) cache[device].store(n, std::memory_order_relaxed);
  *blocks = n;
  return cudaSuccess;
}

template <typename T, typename G, bool kMomentum>
cudaError_t launch(const StepArgs& args, int device, cudaStream_t stream) {
  int64_t max_blocks = 0;
  const cudaError_t err = persistent_grid<T, G, kMomentum>(device, &max_blocks);
  if (err != cudaSuccess) return err;
  // At least one block, so that block 0 clears l1_clear even without work.
  const int64_t blocks = std::max<int64_t>(1, std::min(args.total_chunks, max_blocks));
  pilot_step_kernel<T, G, kMomentum>
      <<<static_cast<unsigned>(blocks), kPilotBlock, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t launch_typed(const StepArgs& args, int device, cudaStream_t stream) {
  return args.h.has_momentum ? launch<T, G, true>(args, device, stream)
                             : launch<T, G, false>(args, device, stream);
}

// x of type T; gradients of type T or (fp32_grad) float.
template <typename T>
cudaError_t launch_grad(bool fp32_grad, const StepArgs& args, int device, cudaStream_t stream) {
  return fp32_grad ? launch_typed<T, float>(args, device, stream)
                   : launch_typed<T, T>(args, device, stream);
}

}  // namespace

cudaError_t pilot_step_launch(ParamType param_type, ParamType grad_type, const void* device_table,
                              int64_t n_tensors, int64_t total_chunks,
                              const PilotHyper& hyper, const float* grad_scale,
                              const float* found_inf, float* l1_accum, float* l1_clear,
                              int device, cudaStream_t stream) {
  if (total_chunks <= 0 && l1_clear == nullptr) return cudaSuccess;
  if (total_chunks > 0 && (device_table == nullptr || n_tensors <= 0)) {
    return cudaErrorInvalidValue;
  }
  StepArgs args;
  if (total_chunks > 0) {
    args.table = mt::table_view(device_table, n_tensors);
    args.total_chunks = total_chunks;
  } else {  // nothing to step; one block still clears l1_clear
    args.table = mt::Table{nullptr, nullptr, 0};
    args.total_chunks = 0;
  }
  args.h = hyper;
  args.grad_scale = grad_scale;
  args.found_inf = found_inf;
  args.l1_accum = l1_accum;
  args.l1_clear = l1_clear;
  if (grad_type != param_type && grad_type != ParamType::kFloat32) return cudaErrorInvalidValue;
  const bool fp32_grad = grad_type != param_type;
  switch (param_type) {
    case ParamType::kFloat32:
      return launch_typed<float, float>(args, device, stream);
    case ParamType::kBFloat16:
      return launch_grad<__nv_bfloat16>(fp32_grad, args, device, stream);
    case ParamType::kFloat16:
      return launch_grad<__half>(fp32_grad, args, device, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pilot
