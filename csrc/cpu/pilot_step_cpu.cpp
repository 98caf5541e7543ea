// The fused PILoT step on the CPU: one pass over every element of every tensor of a call.
//
// Per element it reads x, g, m, w (and the momentum buffers b_m, b_w) and writes m, w,
// b_m, b_w and x: 44 bytes for fp32 parameters with momentum (40 with adopt_writes off,
// when x is not read), against ~256 for the plain-torch reference's separate passes.
// Σ|m·w| is accumulated in the same pass (per-thread partial sums, one add at the end).
//
// Adopting writes: x is compared bit for bit with fl(m·w) in x's dtype, the value the last
// step wrote, recomputed from the old m and w.  Where they differ someone wrote x since
// (through .data, a pruning mask, a checkpoint loader): that element is re-split from its
// current value (`resplit`, pilot_kernels.init.split's fp32 sequence) and its momentum
// restarts (b = d).  The vector loop only checks; a vector with a differing lane is
// stepped lane by lane through the scalar path, which is the same arithmetic.
//
// Exactness: every line of `update` and `resplit` is one torch op of the reference
// (pilot_kernels/kernels/reference.py, pilot_kernels/init.py) in the same order, in fp32,
// one rounding per operation: the build passes -ffp-contract=off so no multiply-add is
// fused.  Scalars are rounded to fp32 exactly as torch rounds a Python float meeting an
// fp32 tensor, so m, w, both momentum buffers and x are bitwise equal to the reference;
// only Σ|m·w| is summed in another order.
//
// The caller (pilot_kernels.kernels.run_step) hands this kernel only what it can walk
// and bumps the version counters afterwards; every precondition is checked here anyway,
// before anything is written, with a message naming the fix.
//
// Vector width: at::vec::Vectorized<float> of the capability this file is compiled for
// (CPU_CAPABILITY, chosen by the Python build helper from torch's own runtime dispatch).
// Parallelism: one at::parallel_reduce over the concatenated element range of all
// tensors, so thousands of tiny tensors cost one parallel region, not one per tensor.
//
// Headers: the Tensor class, at::parallel, at::vec and torch's pybind11 casters only, not
// <torch/extension.h>, which triples the preprocessed lines and the first build's time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <variant>
#include <vector>

namespace pilot_cpu {
namespace {

using at::BFloat16;
using at::Half;
using Vec = at::vec::Vectorized<float>;

// Elements per parallel task at least: below this the call runs on the calling thread
// (torch's own GRAIN_SIZE for elementwise kernels).
constexpr int64_t kGrain = 32768;
// |x| is summed in fp32 vector lanes for at most this many elements, then added to a
// double: keeps Σ|m·w| as accurate as torch's cascade sum at no measurable cost.
constexpr int64_t kL1Block = 1024;

struct Flags {
  bool grad_scale, maximize, weight_decay, momentum, nesterov, adopt;
};

template <typename F>
struct Coeffs {
  F lr, momentum, one_minus_dampening, two_alpha, weight_decay, grad_scale;
};

// β as split() meets it: each Python-float expression rounded to fp32 once.
struct Beta {
  bool balanced;  // β = 0: m = sqrt|x|, w = sign(x)·m
  float beta, beta_sq, half;  // β, β², β/2
};

// One tensor of the call: raw storage (walked linearly) and its place in the global range.
struct Item {
  void* x;
  const void* g;
  float* m;
  float* w;
  float* b_m;
  float* b_w;
  int64_t begin;  // offset of its first element in the concatenated range
  bool first;
};

inline float neg(float v) { return -v; }
inline Vec neg(const Vec& v) { return v.neg(); }
inline float abs_(float v) { return std::abs(v); }
inline Vec abs_(const Vec& v) { return v.abs(); }

// The reference's arithmetic, line for line (F = float or Vec).  Returns the new m·w.
template <typename F>
C10_ALWAYS_INLINE F update(F g, F& m, F& w, F& b_m, F& b_w, bool first, const Flags& f,
                           const Coeffs<F>& c) {
  if (f.grad_scale) g = g / c.grad_scale;                  // (1) AMP unscale
  if (f.maximize) g = neg(g);                              // (2)
  if (f.weight_decay) g = g + c.weight_decay * (m * w);    // (3) L2 on x = m·w
  F d_m = g * w + c.two_alpha * m;                         // (4) both from the old m, w
  F d_w = g * m + c.two_alpha * w;
  if (f.momentum) {                                        // (5) torch.optim.SGD's momentum
    if (first) {
      b_m = d_m;
      b_w = d_w;
    } else {
      b_m = c.momentum * b_m + c.one_minus_dampening * d_m;
      b_w = c.momentum * b_w + c.one_minus_dampening * d_w;
    }
    if (f.nesterov) {
      d_m = d_m + c.momentum * b_m;
      d_w = d_w + c.momentum * b_w;
    } else {
      d_m = b_m;
      d_w = b_w;
    }
  }
  m = m - c.lr * d_m;                                      // (6)
  w = w - c.lr * d_w;
  return m * w;                                            // (7)
}

// ---------------------------------------------------------------- re-split (init.split)
// split()'s square roots are correctly rounded (init._sqrt_rn), as IEEE std::sqrt is.
inline void sqrt_(float* a, int n) {  // in place
  for (int i = 0; i < n; ++i) a[i] = std::sqrt(a[i]);
}

inline float sign_(float x) { return static_cast<float>((0.f < x) - (x < 0.f)); }  // torch.sign

inline float w_from_m(float x, float m, const Beta& b) {
  return b.balanced ? sign_(x) * m : x / m;
}

// m moved by k fp32 ulps (m >= 0; zeros, infs and NaNs stay as they are).
inline float nudge(float m, int32_t k) {
  if (!(m > 0.f) || !std::isfinite(m)) return m;
  int32_t bits;
  std::memcpy(&bits, &m, sizeof bits);
  bits += k;
  std::memcpy(&m, &bits, sizeof bits);
  return m;
}

constexpr int64_t kStep = 2 * Vec::size();  // elements per step of the vector loop

// m, w of the n <= kStep values x with m·w == x where fp32 allows and m² − w² ≈ β:
// split()'s closed form (its torch ops on arrays), then per element the first of the m
// nudges 0, +1, −1, +2, −2 ulps whose product is x exactly.
C10_NOINLINE void resplit(const float* x, int n, const Beta& b, float* m, float* w) {
  if (n == 0) return;
  bool any_huge = false;
  for (int i = 0; i < n; ++i) {
    m[i] = b.balanced ? std::abs(x[i]) : b.beta_sq + 4.0f * x[i] * x[i];
    any_huge = any_huge || std::abs(x[i]) > 0x1p60f;
  }
  sqrt_(m, n);
  if (!b.balanced) {
    for (int i = 0; i < n; ++i) m[i] = (b.beta + m[i]) * 0.5f;
    sqrt_(m, n);
    if (any_huge) {  // 4x² overflowed: m from hypot(β/2, x), the same number without the square
      float h[kStep];
      for (int i = 0; i < n; ++i) h[i] = b.half + std::hypot(b.half, x[i]);
      sqrt_(h, n);
      for (int i = 0; i < n; ++i) m[i] = std::abs(x[i]) > 0x1p60f ? h[i] : m[i];
    }
  }
  for (int i = 0; i < n; ++i) {
    w[i] = w_from_m(x[i], m[i], b);
    if (m[i] * w[i] == x[i]) continue;
    for (const int32_t k : {1, -1, 2, -2}) {
      const float mk = nudge(m[i], k);
      const float wk = w_from_m(x[i], mk, b);
      if (mk * wk == x[i]) {
        m[i] = mk;
        w[i] = wk;
        break;
      }
    }
  }
}

template <typename X>
inline bool same_bits(const X& a, const X& b) {
  return std::memcmp(&a, &b, sizeof(X)) == 0;
}

// ---------------------------------------------------------------- element loops
// Two float vectors' worth of elements of type T (one Vectorized<T> for 16-bit types).
template <typename T>
struct Lanes {
  static C10_ALWAYS_INLINE void load(const T* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
  static C10_ALWAYS_INLINE void store(T* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);  // round to nearest even, as torch
  }
};
template <>
struct Lanes<float> {
  static C10_ALWAYS_INLINE void load(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  }
  static C10_ALWAYS_INLINE void store(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + Vec::size());
  }
};
static_assert(at::vec::Vectorized<BFloat16>::size() == kStep, "16-bit lanes = 2 float vectors");

inline double hsum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

// Elements [lo, hi) of one tensor (at most kStep), on scalars: adopt the writes among
// them, update, store.  Returns their Σ|m·w|.
template <typename X, typename G>
C10_NOINLINE double step_elements(const Item& t, int64_t lo, int64_t hi, const Flags& f,
                                  const Coeffs<float>& cs, const Beta& beta) {
  X* x = static_cast<X*>(t.x);
  const G* g = static_cast<const G*>(t.g);
  float written[kStep], m_new[kStep], w_new[kStep];  // (0) keep what was written into x
  int64_t idx[kStep];
  int n = 0;
  if (f.adopt) {
    for (int64_t i = lo; i < hi; ++i) {
      if (!same_bits(x[i], static_cast<X>(t.m[i] * t.w[i]))) {
        idx[n] = i;
        written[n++] = static_cast<float>(x[i]);
      }
    }
    resplit(written, n, beta, m_new, w_new);
  }
  double l1 = 0;
  for (int64_t i = lo, k = 0; i < hi; ++i) {
    float gi = static_cast<float>(g[i]), mi = t.m[i], wi = t.w[i];
    bool first = t.first;
    if (k < n && idx[k] == i) {
      mi = m_new[k];
      wi = w_new[k++];
      first = true;
    }
    float bmi = f.momentum && !first ? t.b_m[i] : 0.f;
    float bwi = f.momentum && !first ? t.b_w[i] : 0.f;
    const float xi = update(gi, mi, wi, bmi, bwi, first, f, cs);
    t.m[i] = mi;
    t.w[i] = wi;
    if (f.momentum) {
      t.b_m[i] = bmi;
      t.b_w[i] = bwi;
    }
    x[i] = static_cast<X>(xi);  // c10::BFloat16/Half round to nearest even
    l1 += std::abs(xi);
  }
  return l1;
}

// Whether x[0, kStep) holds exactly fl(m·w) in X, the products a, b of the vectors' lanes.
template <typename X>
C10_ALWAYS_INLINE bool unwritten(const X* x, const Vec& a, const Vec& b) {
  alignas(64) X last[kStep];
  Lanes<X>::store(last, a, b);
  return std::memcmp(last, x, sizeof last) == 0;
}

// Update elements [lo, hi) of one tensor; returns their Σ|m·w|.
template <typename X, typename G>
double update_range(const Item& t, int64_t lo, int64_t hi, const Flags& f,
                    const Coeffs<float>& cs, const Coeffs<Vec>& cv, const Beta& beta) {
  X* x = static_cast<X*>(t.x);
  const G* g = static_cast<const G*>(t.g);
  float *m = t.m, *w = t.w, *b_m = t.b_m, *b_w = t.b_w;
  double l1 = 0;
  int64_t i = lo;
  while (i + kStep <= hi) {
    Vec acc(0.f);
    const int64_t block_end = std::min(hi, i + kL1Block);
    for (; i + kStep <= block_end; i += kStep) {
      Vec g0, g1, m0, m1, w0, w1, bm0, bm1, bw0, bw1;
      Lanes<float>::load(m + i, m0, m1);
      Lanes<float>::load(w + i, w0, w1);
      if (f.adopt && !unwritten(x + i, m0 * w0, m1 * w1)) {  // rare: some lane was written
        l1 += step_elements<X, G>(t, i, i + kStep, f, cs, beta);
        continue;
      }
      Lanes<G>::load(g + i, g0, g1);
      if (f.momentum && !t.first) {
        Lanes<float>::load(b_m + i, bm0, bm1);
        Lanes<float>::load(b_w + i, bw0, bw1);
      }
      Vec x0 = update(g0, m0, w0, bm0, bw0, t.first, f, cv);
      Vec x1 = update(g1, m1, w1, bm1, bw1, t.first, f, cv);
      Lanes<float>::store(m + i, m0, m1);
      Lanes<float>::store(w + i, w0, w1);
      if (f.momentum) {
        Lanes<float>::store(b_m + i, bm0, bm1);
        Lanes<float>::store(b_w + i, bw0, bw1);
      }
      Lanes<X>::store(x + i, x0, x1);
      acc = acc + abs_(x0) + abs_(x1);
    }
    l1 += hsum(acc);
  }
  for (; i < hi; i += kStep) l1 += step_elements<X, G>(t, i, std::min(hi, i + kStep), f, cs, beta);  // tail
  return l1;
}

// AMP step with inf/NaN gradients: nothing is written, Σ|m·w| of the old factors is summed.
double l1_range(const Item& t, int64_t lo, int64_t hi) {
  const float *m = t.m, *w = t.w;
  double l1 = 0;
  int64_t i = lo;
  while (i + Vec::size() <= hi) {
    Vec acc(0.f);
    const int64_t block_end = std::min(hi, i + kL1Block);
    for (; i + Vec::size() <= block_end; i += Vec::size()) {
      acc = acc + (Vec::loadu(m + i) * Vec::loadu(w + i)).abs();
    }
    l1 += hsum(acc);
  }
  for (; i < hi; ++i) l1 += std::abs(m[i] * w[i]);
  return l1;
}

// Σ|m·w| over [0, total) of the concatenated tensors, updating them unless `skip`.
template <typename X, typename G>
double run(const std::vector<Item>& items, int64_t total, bool skip, const Flags& f,
           const Coeffs<float>& cs, const Beta& beta) {
  const Coeffs<Vec> cv{Vec(cs.lr), Vec(cs.momentum), Vec(cs.one_minus_dampening),
                       Vec(cs.two_alpha), Vec(cs.weight_decay), Vec(cs.grad_scale)};
  auto body = [&](int64_t begin, int64_t end, double l1) -> double {
    // The last tensor starting at or before `begin`, then walk forward.
    size_t k = std::upper_bound(items.begin(), items.end(), begin,
                                [](int64_t v, const Item& it) { return v < it.begin; }) -
               items.begin() - 1;
    while (begin < end) {
      const Item& t = items[k];
      const int64_t t_end = k + 1 < items.size() ? items[k + 1].begin : total;
      const int64_t hi = std::min(end, t_end);
      l1 += skip ? l1_range(t, begin - t.begin, hi - t.begin)
                 : update_range<X, G>(t, begin - t.begin, hi - t.begin, f, cs, cv, beta);
      begin = hi;
      ++k;
    }
    return l1;
  };
  return at::parallel_reduce(int64_t{0}, total, kGrain, 0.0, body, std::plus<double>());
}

template <typename X>
double dispatch_grad(at::ScalarType g_dtype, const std::vector<Item>& items, int64_t total,
                     bool skip, const Flags& f, const Coeffs<float>& cs, const Beta& beta) {
  if (g_dtype == at::kFloat) return run<X, float>(items, total, skip, f, cs, beta);
  return run<X, X>(items, total, skip, f, cs, beta);  // checked: x's dtype
}

// ---------------------------------------------------------------- checks
constexpr const char* kRouting =
    "; step such tensors through pilot_kernels.kernels.run_step, which hands them to the "
    "reference backend";

// The kernel walks raw storage: t must hold x's elements in x's order (same sizes, and
// the same strides wherever a dimension has more than one element).
bool same_layout(const at::Tensor& x, const at::Tensor& t) {
  if (t.sizes() != x.sizes()) return false;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) > 1 && x.stride(d) != t.stride(d)) return false;
  }
  return true;
}

void check_scalar(const std::optional<at::Tensor>& t, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->device().is_cpu() && t->numel() == 1,
              "pilot_step (cpu): ", name, " must be a one-element CPU tensor, got ",
              t->numel(), " element(s) on ", t->device());
}

double read_scalar(const at::Tensor& t) {
  // A host read is free on the CPU; fp32 (the optimizer's dtype) skips the dispatcher.
  if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>();
  return t.item<double>();
}

using Scalar = std::variant<double, at::Tensor>;  // a float, or a 0-dim tensor (capturable)

std::optional<at::Tensor> scalar_tensor(const Scalar& v, const char* name) {
  if (const auto* t = std::get_if<at::Tensor>(&v)) {
    std::optional<at::Tensor> o = *t;
    check_scalar(o, name);
    return o;
  }
  return std::nullopt;
}

double scalar_value(const Scalar& v) {
  if (const auto* t = std::get_if<at::Tensor>(&v)) return read_scalar(*t);
  return std::get<double>(v);
}

bool is_step_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

// One fused step for CPU tensors; see pilot_kernels/kernels/reference.py for the contract
// and pilot_kernels/kernels/api.py for the arguments (StepTensors, StepHparams,
// StepExtras, field by field).  Every check runs before anything is written.
void pilot_step(
    const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& ms, const std::vector<at::Tensor>& ws,
    const std::optional<std::vector<at::Tensor>>& momentum_ms,
    const std::optional<std::vector<at::Tensor>>& momentum_ws, const std::vector<bool>& firsts,
    const Scalar& lr, double momentum, double dampening, bool nesterov, const Scalar& alpha,
    double beta, double weight_decay, bool maximize, bool adopt_writes,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& l1_accum, const std::optional<at::Tensor>& l1_clear) {
  const size_t n = xs.size();
  const bool has_momentum = momentum != 0;
  TORCH_CHECK(grads.size() == n && ms.size() == n && ws.size() == n && firsts.size() == n,
              "pilot_step (cpu): xs, grads, ms, ws and firsts must have the same length, got ",
              n, ", ", grads.size(), ", ", ms.size(), ", ", ws.size(), ", ", firsts.size());
  TORCH_CHECK(!has_momentum || (momentum_ms && momentum_ws && momentum_ms->size() == n &&
                                momentum_ws->size() == n),
              "pilot_step (cpu): momentum != 0 needs one momentum_m and momentum_w per tensor");
  TORCH_CHECK(!adopt_writes || beta >= 0,
              "pilot_step (cpu): beta must be >= 0 (m² − w² = beta has no real m > |w| "
              "otherwise), got ", beta);
  const std::optional<at::Tensor> lr_tensor = scalar_tensor(lr, "lr");
  const std::optional<at::Tensor> alpha_tensor = scalar_tensor(alpha, "alpha");
  check_scalar(grad_scale, "grad_scale");
  check_scalar(found_inf, "found_inf");
  check_scalar(l1_clear, "l1_clear");
  check_scalar(l1_accum, "l1_accum");
  TORCH_CHECK(!l1_accum || l1_accum->scalar_type() == at::kFloat,
              "pilot_step (cpu): l1_accum must be float32, got ", l1_accum->scalar_type());

  std::vector<Item> items;
  items.reserve(n);
  int64_t total = 0;
  const at::ScalarType x_dtype = n ? xs[0].scalar_type() : at::kFloat;
  const at::ScalarType g_dtype = n ? grads[0].scalar_type() : at::kFloat;
  TORCH_CHECK(is_step_dtype(x_dtype),
              "pilot_step (cpu): parameters must be float32, bfloat16 or float16, got ", x_dtype);
  TORCH_CHECK(g_dtype == x_dtype || g_dtype == at::kFloat,
              "pilot_step (cpu): gradients must have the parameters' dtype (", x_dtype,
              ") or float32, got ", g_dtype, "; cast them first (g.to(x.dtype))");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& x = xs[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(x.scalar_type() == x_dtype,
                "pilot_step (cpu): all parameters of one call must share a dtype; tensor ", i,
                " is ", x.scalar_type(), ", tensor 0 is ", x_dtype,
                "; split the call by dtype");
    TORCH_CHECK(g.scalar_type() == g_dtype,
                "pilot_step (cpu): all gradients of one call must share a dtype; tensor ", i,
                "'s is ", g.scalar_type(), ", tensor 0's is ", g_dtype, kRouting);
    TORCH_CHECK(x.device().is_cpu() && g.device().is_cpu(),
                "pilot_step (cpu): tensor ", i, " or its gradient is not on the CPU (",
                x.device(), ", ", g.device(), "); use backend='auto'");
    TORCH_CHECK(g.numel() == x.numel(), "pilot_step (cpu): the gradient of tensor ", i, " has ",
                g.numel(), " elements but the parameter has ", x.numel());
    std::vector<std::pair<const at::Tensor*, const char*>> state{{&ms[i], "m"}, {&ws[i], "w"}};
    if (has_momentum) {
      state.emplace_back(&(*momentum_ms)[i], "momentum_m");
      state.emplace_back(&(*momentum_ws)[i], "momentum_w");
    }
    for (const auto& [s, name] : state) {
      TORCH_CHECK(s->device().is_cpu(), "pilot_step (cpu): ", name, " of tensor ", i,
                  " is on ", s->device(), ", not on the CPU");
      TORCH_CHECK(s->numel() == x.numel(), "pilot_step (cpu): ", name, " of tensor ", i,
                  " has ", s->numel(), " elements but the parameter has ", x.numel());
      TORCH_CHECK(s->scalar_type() == at::kFloat, "pilot_step (cpu): ", name, " of tensor ", i,
                  " is ", s->scalar_type(), "; the state must be float32");
    }
    if (x.numel() == 0) continue;
    TORCH_CHECK(x.is_non_overlapping_and_dense(), "pilot_step (cpu): parameter ", i,
                " (sizes ", x.sizes(), ", strides ", x.strides(),
                ") is not dense, so the kernel cannot walk its storage", kRouting);
    TORCH_CHECK(same_layout(x, g), "pilot_step (cpu): the gradient of tensor ", i,
                " has strides ", g.strides(), " but the parameter has ", x.strides(), kRouting);
    for (const auto& [s, name] : state) {
      TORCH_CHECK(same_layout(x, *s), "pilot_step (cpu): ", name, " of tensor ", i,
                  " has strides ", s->strides(), " but the parameter has ", x.strides(),
                  "; create the state with torch.empty_like(x, dtype=torch.float32)", kRouting);
    }
    items.push_back(Item{x.data_ptr(), g.const_data_ptr(), ms[i].data_ptr<float>(),
                         ws[i].data_ptr<float>(),
                         has_momentum ? (*momentum_ms)[i].data_ptr<float>() : nullptr,
                         has_momentum ? (*momentum_ws)[i].data_ptr<float>() : nullptr, total,
                         static_cast<bool>(firsts[i])});
    total += x.numel();
  }

  // Scalars rounded to fp32 as torch does for `python_float * fp32_tensor`; 2α, 1−τ, β²
  // and β/2 are formed in double first, as the reference's Python expressions are.
  const double lr_v = lr_tensor ? read_scalar(*lr_tensor) : scalar_value(lr);
  const double alpha_v = alpha_tensor ? read_scalar(*alpha_tensor) : scalar_value(alpha);
  const Flags f{grad_scale.has_value(), maximize, weight_decay != 0, has_momentum, nesterov,
                adopt_writes};
  const Coeffs<float> cs{static_cast<float>(lr_v),
                         static_cast<float>(momentum),
                         static_cast<float>(1.0 - dampening),
                         static_cast<float>(2.0 * alpha_v),
                         static_cast<float>(weight_decay),
                         grad_scale ? static_cast<float>(read_scalar(*grad_scale)) : 1.f};
  const Beta b{beta == 0, static_cast<float>(beta), static_cast<float>(beta * beta),
               static_cast<float>(beta * 0.5)};
  const bool skip = found_inf && read_scalar(*found_inf) != 0;

  if (l1_clear) l1_clear->zero_();
  if (items.empty()) return;
  double l1 = 0;
  switch (x_dtype) {
    case at::kFloat: l1 = dispatch_grad<float>(g_dtype, items, total, skip, f, cs, b); break;
    case at::kBFloat16: l1 = dispatch_grad<BFloat16>(g_dtype, items, total, skip, f, cs, b); break;
    case at::kHalf: l1 = dispatch_grad<Half>(g_dtype, items, total, skip, f, cs, b); break;
    default: TORCH_INTERNAL_ASSERT(false, "unreachable parameter dtype");
  }
  if (l1_accum) {
    float* acc = l1_accum->data_ptr<float>();
    *acc = static_cast<float>(static_cast<double>(*acc) + l1);
  }
}

// The at::vec capability this module was compiled for ("AVX2", "AVX512", "DEFAULT", ...).
std::string capability() { return C10_STRINGIZE(CPU_CAPABILITY); }

}  // namespace pilot_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pilot_step", &pilot_cpu::pilot_step, "One fused PILoT step for CPU tensors");
  m.def("capability", &pilot_cpu::capability, "The at::vec capability compiled in");
  m.def("num_threads", &at::get_num_threads, "Threads of at::parallel_for in this module");
}
