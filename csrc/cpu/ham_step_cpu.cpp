// The fused HAM step on the CPU: base step (AdamW, SGD or none) and the hyperbolic mirror
// step in one pass over every element of every tensor of a call.
//
// Per element, fp32 parameters: AdamW reads g, θ, m, v and writes θ, m, v (28 bytes, what
// a fused AdamW moves); SGD with momentum reads g, θ, b and writes θ, b (20 bytes); the
// mirror step alone reads g, θ and writes θ (12 bytes).  No temporary the size of a tensor.
//
// Exactness: every line is one torch op of pilot_kernels/kernels/ham_reference.py in the
// same order, in fp32, one rounding per operation (the build passes -ffp-contract=off);
// std::fma stands exactly where torch's own kernels fuse (lerp, addcmul, add(alpha=)).
// exp is the reference's det_exp: range reduction and a polynomial in basic ops, so the
// bits do not depend on a libm.  Scalars arrive as doubles and are rounded to fp32 as torch
// rounds a Python float multiplying an fp32 tensor.
//
// The loop is scalar code (the base and momentum as template parameters, the other options
// as selects); gcc does not vectorize it yet (docs/ham.md has the measured cost), an
// at::vec body is the next step.  Parallelism: one at::parallel_for over the concatenated
// element range of all tensors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace ham_cpu {
namespace {

using at::BFloat16;
using at::Half;

// Elements per parallel task at least (torch's GRAIN_SIZE for elementwise kernels).
constexpr int64_t kGrain = 32768;

// det_exp's constants: the reference's hex literals (EXP_CONSTANTS).
constexpr float kLog2e = 0x1.715476p+0f;
constexpr float kLn2Hi = 0x1.62e4p-1f;
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;
constexpr float kRound = 12582912.0f;  // 1.5·2^23
constexpr float kPoly[7] = {0x1.6a0ff4p-10f, 0x1.121254p-7f, 0x1.55581ap-5f, 0x1.5554d8p-3f,
                            0x1.fffffep-2f, 0x1p+0f, 0x1p+0f};
constexpr float kClamp = 5.0f;

enum Base : int { kNone = 0, kAdamW = 1, kSgd = 2 };

struct Coeffs {
  float lr, neg_lr, alpha, beta, grad_scale, weight_decay;
  float decay, lerp_w, lerp_w_minus_1, one_minus_beta2, beta2, bc2_sqrt, eps, neg_step_size;
  float momentum, one_minus_dampening;
  bool lerp_small, has_grad_scale, maximize, has_weight_decay, nesterov, mirror;
};

struct Item {
  void* p;
  const void* g;
  float* s1;  // adamw: exp_avg; sgd: momentum buffer (or null)
  float* s2;  // adamw: exp_avg_sq
  int64_t begin;
  bool first;
};

inline float det_exp(float z) {
  float k = (z * kLog2e + kRound) - kRound;
  float r = z - k * kLn2Hi;
  r = r - k * kLn2Lo;
  float p = kPoly[0];
  for (int i = 1; i < 7; ++i) p = p * r + kPoly[i];
  const int32_t ki = static_cast<int32_t>(k == k ? k : 0.0f);  // no NaN conversion: it may trap
  const uint32_t bits = static_cast<uint32_t>(ki + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float mirror(float theta, float g, const Coeffs& c) {
  const float sg = theta < 0 ? -g : g;
  float z = (sg * c.alpha + c.beta) * c.neg_lr;
  z = z < -kClamp ? -kClamp : (z > kClamp ? kClamp : z);  // NaN stays NaN
  return theta * det_exp(z);
}

// Loop-invariant options are selects rather than branches; the ones that always compute
// (÷ 1, × 1) change no bits.
template <typename P, typename G, int B, bool MOMENTUM>
void update_range(const Item& t, int64_t lo, int64_t hi, const Coeffs& coeffs) {
  const Coeffs c = coeffs;  // a local copy: the stores below cannot alias it
  P* __restrict p = static_cast<P*>(t.p);
  const G* __restrict gp = static_cast<const G*>(t.g);
  float* __restrict s1 = t.s1;
  float* __restrict s2 = t.s2;
  const bool first = t.first;
  const float scale = c.has_grad_scale ? c.grad_scale : 1.0f;
  const float decay = c.has_weight_decay ? c.decay : 1.0f;
  for (int64_t i = lo; i < hi; ++i) {
    float g = static_cast<float>(gp[i]) / scale;            // AMP unscale (÷ 1: exact)
    g = c.maximize ? -g : g;
    float theta = static_cast<float>(p[i]);
    if (B == kAdamW) {
      theta = theta * decay;                                // decoupled decay (× 1: exact)
      const float m = s1[i];
      const float diff = g - m;  // torch.lerp: fma(w, end − self, self) or fma(w − 1, ·, end)
      const float m_small = std::fma(c.lerp_w, diff, m);
      const float m_large = std::fma(c.lerp_w_minus_1, diff, g);
      const float m_new = c.lerp_small ? m_small : m_large;
      const float v_new = std::fma(g * c.one_minus_beta2, g, s2[i] * c.beta2);
      const float denom = std::sqrt(v_new) / c.bc2_sqrt + c.eps;
      theta = theta + (m_new * c.neg_step_size) / denom;
      s1[i] = m_new;
      s2[i] = v_new;
    } else if (B == kSgd) {
      const float decayed = std::fma(theta, c.weight_decay, g);
      float d = c.has_weight_decay ? decayed : g;           // L2 (g + 0·θ would flip −0)
      if (MOMENTUM) {
        const float later = std::fma(d, c.one_minus_dampening, s1[i] * c.momentum);
        const float b = first ? d : later;
        s1[i] = b;
        const float nest = std::fma(b, c.momentum, d);
        d = c.nesterov ? nest : b;
      }
      theta = std::fma(d, c.neg_lr, theta);
    }
    const float mirrored = mirror(theta, g, c);
    theta = c.mirror ? mirrored : theta;
    p[i] = static_cast<P>(theta);  // c10::BFloat16/Half round to nearest even
  }
}

template <typename P, typename G, int B, bool MOMENTUM>
void run(const std::vector<Item>& items, int64_t total, const Coeffs& c) {
  at::parallel_for(int64_t{0}, total, kGrain, [&](int64_t begin, int64_t end) {
    // The last tensor starting at or before `begin`, then walk forward.
    size_t k = std::upper_bound(items.begin(), items.end(), begin,
                                [](int64_t v, const Item& it) { return v < it.begin; }) -
               items.begin() - 1;
    while (begin < end) {
      const Item& t = items[k];
      const int64_t t_end = k + 1 < items.size() ? items[k + 1].begin : total;
      const int64_t hi = std::min(end, t_end);
      update_range<P, G, B, MOMENTUM>(t, begin - t.begin, hi - t.begin, c);
      begin = hi;
      ++k;
    }
  });
}

template <typename P, typename G>
void dispatch_base(int base, bool momentum, const std::vector<Item>& items, int64_t total,
                   const Coeffs& c) {
  if (base == kAdamW) return run<P, G, kAdamW, false>(items, total, c);
  if (base == kSgd && momentum) return run<P, G, kSgd, true>(items, total, c);
  if (base == kSgd) return run<P, G, kSgd, false>(items, total, c);
  return run<P, G, kNone, false>(items, total, c);
}

template <typename P>
void dispatch_grad(at::ScalarType g, int base, bool momentum, const std::vector<Item>& items,
                   int64_t total, const Coeffs& c) {
  switch (g) {
    case at::kFloat: return dispatch_base<P, float>(base, momentum, items, total, c);
    case at::kBFloat16: return dispatch_base<P, BFloat16>(base, momentum, items, total, c);
    case at::kHalf: return dispatch_base<P, Half>(base, momentum, items, total, c);
    default: TORCH_CHECK(false, "ham_step (cpu): gradients must be float32, bfloat16 or float16, got ", g);
  }
}

}  // namespace

// One fused HAM step over tensors the caller has checked (pilot_kernels/kernels/ham_cpu.py):
// CPU, dense, one parameter dtype and one gradient dtype, fp32 state of the parameter's layout.
void ham_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
              const std::vector<bool>& firsts, int64_t base, bool momentum, double lr,
              double alpha, double beta, bool maximize, bool has_grad_scale, double grad_scale,
              double weight_decay, double decay, double beta1, double beta2, double eps,
              double step_size, double bc2_sqrt, double momentum_v, double dampening,
              bool nesterov) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && firsts.size() == n, "ham_step (cpu): list lengths differ");
  TORCH_CHECK(base != kAdamW || (state1.size() == n && state2.size() == n),
              "ham_step (cpu): adamw needs exp_avg and exp_avg_sq per tensor");
  TORCH_CHECK(!momentum || state1.size() == n, "ham_step (cpu): momentum needs a buffer per tensor");
  if (n == 0) return;
  std::vector<Item> items;
  items.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    if (params[i].numel() == 0) continue;
    items.push_back(Item{params[i].data_ptr(), grads[i].const_data_ptr(),
                         state1.empty() ? nullptr : state1[i].data_ptr<float>(),
                         state2.empty() ? nullptr : state2[i].data_ptr<float>(), total,
                         static_cast<bool>(firsts[i])});
    total += params[i].numel();
  }
  if (items.empty()) return;
  const float w = static_cast<float>(1.0 - beta1);  // torch.lerp's weight, as torch rounds it
  const Coeffs c{static_cast<float>(lr), -static_cast<float>(lr), static_cast<float>(alpha),
                 static_cast<float>(beta), static_cast<float>(grad_scale),
                 static_cast<float>(weight_decay), static_cast<float>(decay), w, w - 1.0f,
                 static_cast<float>(1.0 - beta2), static_cast<float>(beta2),
                 static_cast<float>(bc2_sqrt), static_cast<float>(eps),
                 static_cast<float>(-step_size), static_cast<float>(momentum_v),
                 static_cast<float>(1.0 - dampening), std::abs(w) < 0.5f, has_grad_scale,
                 maximize, weight_decay != 0, nesterov, alpha != 0 || beta != 0};
  const at::ScalarType g = grads[0].scalar_type();
  switch (params[0].scalar_type()) {
    case at::kFloat: return dispatch_grad<float>(g, base, momentum, items, total, c);
    case at::kBFloat16: return dispatch_grad<BFloat16>(g, base, momentum, items, total, c);
    case at::kHalf: return dispatch_grad<Half>(g, base, momentum, items, total, c);
    default: TORCH_CHECK(false, "ham_step (cpu): parameters must be float32, bfloat16 or float16");
  }
}

}  // namespace ham_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ham_step", &ham_cpu::ham_step, "One fused HAM step for CPU tensors");
}
