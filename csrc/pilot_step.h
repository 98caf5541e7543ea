// The interface between the torch binding (binding.cpp, host compiler) and the CUDA
// kernel (pilot_step.cu, nvcc).  Plain C++17 plus the CUDA runtime API types: no torch
// header, so pilot_step.cu compiles standalone and both sides agree on one layout.
//
// The multi-tensor table.  One PILoT step covers every tensor of a (device, dtype)
// group with ONE launch; the kernel finds its tensors in a device-resident table:
//
//   bytes [0, entries_offset)        int64 chunk_starts[n + 1]
//                                    chunk_starts[i] = first chunk of tensor i,
//                                    chunk_starts[n] = total number of chunks
//   bytes [entries_offset, ...)      PilotTensorEntry entries[n]
//
// A chunk is kPilotChunk consecutive elements of one tensor (the last chunk of a
// tensor may be shorter).  Block b of the grid handles chunks b, b + gridDim.x, ...;
// for each chunk it finds the tensor by a binary search over chunk_starts.
// All offsets and sizes are int64: tensors over 2^31 elements are fine.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace pilot {

// Elements per chunk: 256 threads x 4-element vectors x 4 passes.
constexpr int64_t kPilotChunk = 4096;
constexpr int kPilotBlock = 256;

// The parameter (and gradient) dtype of a group; state is always fp32.
enum class ParamType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One tensor of the group.  x has the parameter dtype, grad the group's gradient dtype
// (the parameter's or fp32); m, w and the momentum buffers are fp32.  momentum_m/momentum_w are null when momentum == 0.
struct alignas(16) PilotTensorEntry {
  void* x;
  const void* grad;
  float* m;
  float* w;
  float* momentum_m;
  float* momentum_w;
  int64_t numel;
  int32_t first;    // 1: the momentum buffers hold no history yet (b = d)
  int32_t aligned;  // 1: every pointer allows 4-element vector loads/stores
};
static_assert(sizeof(PilotTensorEntry) == 64, "PilotTensorEntry must stay 64 bytes");

// Hyperparameters, already converted to fp32 the way torch converts a Python scalar
// for an fp32 tensor op (static_cast<float>(double)).  lr and alpha may instead live in
// device memory (capturable mode: a replayed CUDA graph must see their current values);
// the kernel then reads them there and ignores lr / two_alpha.
struct PilotHyper {
  float lr;
  float momentum;
  float one_minus_dampening;  // float(1 - dampening), computed in double first
  float two_alpha;            // float(2 * alpha), computed in double first
  float weight_decay;
  float beta;                 // the re-split's m² − w² = β, and float(β·β), float(β/2)
  float beta_sq;              //   computed in double first, as the reference's scalars
  float half_beta;
  int32_t adopt_writes;       // read x; re-split the elements written since the last step
  int32_t beta_zero;          // β == 0: the balanced split w = sign(x)·m
  int32_t has_momentum;       // momentum != 0
  int32_t nesterov;
  int32_t maximize;
  int32_t has_weight_decay;   // weight_decay != 0
  const float* lr_device;     // non-null: lr = *lr_device
  const float* alpha_device;  // non-null: two_alpha = 2 * *alpha_device (in fp32)
};

// Above this |x| the re-split takes m from hypot(β/2, x) (init.split's _HUGE), which is
// |x| exactly for β <= kPilotMaxBeta (the binding refuses larger β).
constexpr float kPilotHuge = 1152921504606846976.0f;  // 2^60
constexpr double kPilotMaxBeta = 140737488355328.0;   // 2^47

// Byte offset of the entries in the table (64-byte aligned).
inline constexpr int64_t table_entries_offset(int64_t n_tensors) {
  return ((n_tensors + 1) * static_cast<int64_t>(sizeof(int64_t)) + 63) / 64 * 64;
}

// Total table size in bytes.
inline constexpr int64_t table_bytes(int64_t n_tensors) {
  return table_entries_offset(n_tensors) +
         n_tensors * static_cast<int64_t>(sizeof(PilotTensorEntry));
}

inline constexpr int64_t chunks_of(int64_t numel) {
  return (numel + kPilotChunk - 1) / kPilotChunk;
}

// Launch one fused PILoT step over the `n_tensors` tensors of `device_table` (built
// with the layout above and already on the device, or being copied there earlier on
// `stream`).  grad_scale / found_inf / l1_accum / l1_clear are device pointers to one
// fp32 value each, or null.  l1_clear must differ from l1_accum (the caller clears it
// itself otherwise).  Returns the launch status (cudaSuccess or the error).
// grad_type is param_type or kFloat32.
cudaError_t pilot_step_launch(ParamType param_type, ParamType grad_type, const void* device_table,
                              int64_t n_tensors, int64_t total_chunks,
                              const PilotHyper& hyper, const float* grad_scale,
                              const float* found_inf, float* l1_accum, float* l1_clear,
                              int device, cudaStream_t stream);

}  // namespace pilot
