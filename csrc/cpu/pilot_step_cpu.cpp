// The fused PILoT step on the CPU: one pass over every element of every tensor of a call.
//
// Per element it reads g, m, w (and the momentum buffers b_m, b_w) and writes m, w, b_m,
// b_w and x: 40 bytes for fp32 parameters with momentum, against ~256 for the plain-torch
// reference's separate passes.  x is never read; it is recomputed as m·w.  Σ|m·w| is
// accumulated in the same pass (per-thread partial sums, one add at the end).
//
// Exactness: every line of `update` is one torch op of the reference
// (pilot_kernels/kernels/reference.py) in the same order, in fp32, one rounding per
// operation: the build passes -ffp-contract=off so no multiply-add is fused.  Scalars are
// rounded to fp32 exactly as torch rounds a Python float multiplying an fp32 tensor, so
// m, w, both momentum buffers and x are bitwise equal to the reference; only Σ|m·w| is
// summed in another order.
//
// Vector width: at::vec::Vectorized<float> of the capability this file is compiled for
// (CPU_CAPABILITY, chosen by the Python build helper from torch's own runtime dispatch).
// Parallelism: one at::parallel_reduce over the concatenated element range of all
// tensors, so thousands of tiny tensors cost one parallel region, not one per tensor.
//
// Headers: the Tensor class, at::parallel, at::vec and torch's pybind11 casters only, not
// <torch/extension.h>: a third of the preprocessed lines, and 21 s instead of 57 s of
// compiler CPU time for the first build.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
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
  bool grad_scale, maximize, weight_decay, momentum, nesterov;
};

template <typename F>
struct Coeffs {
  F lr, momentum, one_minus_dampening, two_alpha, weight_decay, grad_scale;
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

// Two float vectors' worth of elements of type T (one Vectorized<T> for 16-bit types).
template <typename T>
struct Lanes {
  static constexpr int64_t size() { return 2 * Vec::size(); }
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
static_assert(at::vec::Vectorized<BFloat16>::size() == 2 * Vec::size(), "16-bit lanes = 2 float vectors");
constexpr int64_t kStep = 2 * Vec::size();

inline double hsum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

// Update elements [lo, hi) of one tensor; returns their Σ|m·w|.
template <typename X, typename G>
double update_range(const Item& t, int64_t lo, int64_t hi, const Flags& f,
                    const Coeffs<float>& cs, const Coeffs<Vec>& cv) {
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
      Lanes<G>::load(g + i, g0, g1);
      Lanes<float>::load(m + i, m0, m1);
      Lanes<float>::load(w + i, w0, w1);
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
  for (; i < hi; ++i) {  // tail: the same arithmetic on scalars
    float gi = static_cast<float>(g[i]), mi = m[i], wi = w[i];
    float bmi = f.momentum ? b_m[i] : 0.f, bwi = f.momentum ? b_w[i] : 0.f;
    float xi = update(gi, mi, wi, bmi, bwi, t.first, f, cs);
    m[i] = mi;
    w[i] = wi;
    if (f.momentum) {
      b_m[i] = bmi;
      b_w[i] = bwi;
    }
    x[i] = static_cast<X>(xi);  // c10::BFloat16/Half round to nearest even
    l1 += std::abs(xi);
  }
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
           const Coeffs<float>& cs) {
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
                 : update_range<X, G>(t, begin - t.begin, hi - t.begin, f, cs, cv);
      begin = hi;
      ++k;
    }
    return l1;
  };
  return at::parallel_reduce(int64_t{0}, total, kGrain, 0.0, body, std::plus<double>());
}

template <typename X>
double dispatch_grad(at::ScalarType g_dtype, const std::vector<Item>& items, int64_t total,
                     bool skip, const Flags& f, const Coeffs<float>& cs) {
  switch (g_dtype) {
    case at::kFloat: return run<X, float>(items, total, skip, f, cs);
    case at::kBFloat16: return run<X, BFloat16>(items, total, skip, f, cs);
    case at::kHalf: return run<X, Half>(items, total, skip, f, cs);
    default: TORCH_INTERNAL_ASSERT(false, "unreachable gradient dtype");
  }
}

bool is_float16ish_or_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

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

}  // namespace

// One fused step for CPU tensors; see pilot_kernels/kernels/reference.py for the contract.
// Every check runs before anything is written.  Returns the indices of the tensors it did
// not update because their storage cannot be walked linearly with x's (or their state is
// not fp32): the caller updates those with the reference.
std::vector<int64_t> pilot_step(
    const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& ms, const std::vector<at::Tensor>& ws,
    const std::optional<std::vector<at::Tensor>>& momentum_ms,
    const std::optional<std::vector<at::Tensor>>& momentum_ws, const std::vector<bool>& firsts,
    double lr, const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
    bool nesterov, double alpha, const std::optional<at::Tensor>& alpha_tensor,
    double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& l1_accum,
    const std::optional<at::Tensor>& l1_clear) {
  const size_t n = xs.size();
  const bool has_momentum = momentum != 0;
  TORCH_CHECK(grads.size() == n && ms.size() == n && ws.size() == n && firsts.size() == n,
              "pilot_step (cpu): xs, grads, ms, ws and firsts must have the same length");
  TORCH_CHECK(!has_momentum || (momentum_ms && momentum_ws && momentum_ms->size() == n &&
                                momentum_ws->size() == n),
              "pilot_step (cpu): momentum != 0 needs one momentum_m and momentum_w per tensor");
  check_scalar(lr_tensor, "lr");
  check_scalar(alpha_tensor, "alpha");
  check_scalar(grad_scale, "grad_scale");
  check_scalar(found_inf, "found_inf");
  check_scalar(l1_clear, "l1_clear");
  check_scalar(l1_accum, "l1_accum");
  TORCH_CHECK(!l1_accum || l1_accum->scalar_type() == at::kFloat,
              "pilot_step (cpu): l1_accum must be float32, got ", l1_accum->scalar_type());

  std::vector<int64_t> slow;
  std::vector<size_t> fused;  // indices of the tensors the kernel updates
  std::vector<Item> items;
  items.reserve(n);
  fused.reserve(n);
  int64_t total = 0;
  const at::ScalarType x_dtype = n ? xs[0].scalar_type() : at::kFloat;
  std::optional<at::ScalarType> g_dtype;
  TORCH_CHECK(is_float16ish_or_float(x_dtype),
              "pilot_step (cpu): parameters must be float32, bfloat16 or float16, got ", x_dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& x = xs[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(x.scalar_type() == x_dtype,
                "pilot_step (cpu): all parameters of one call must share a dtype; tensor ", i,
                " is ", x.scalar_type(), ", tensor 0 is ", x_dtype);
    std::vector<const at::Tensor*> state{&ms[i], &ws[i]};
    if (has_momentum) {
      state.push_back(&(*momentum_ms)[i]);
      state.push_back(&(*momentum_ws)[i]);
    }
    TORCH_CHECK(x.device().is_cpu() && g.device().is_cpu(),
                "pilot_step (cpu): tensor ", i, " or its gradient is not on the CPU (",
                x.device(), ", ", g.device(), "); use backend='auto'");
    for (const at::Tensor* s : state) {
      TORCH_CHECK(s->device().is_cpu(), "pilot_step (cpu): the state of tensor ", i,
                  " is on ", s->device(), ", not on the CPU");
      TORCH_CHECK(s->numel() == x.numel(), "pilot_step (cpu): the state of tensor ", i,
                  " has ", s->numel(), " elements but the parameter has ", x.numel());
    }
    TORCH_CHECK(g.numel() == x.numel(), "pilot_step (cpu): the gradient of tensor ", i, " has ",
                g.numel(), " elements but the parameter has ", x.numel());
    if (x.numel() == 0) continue;
    bool fusable = x.is_non_overlapping_and_dense() && same_layout(x, g) &&
                   is_float16ish_or_float(g.scalar_type()) &&
                   (!g_dtype || *g_dtype == g.scalar_type());
    for (const at::Tensor* s : state) {
      fusable = fusable && s->scalar_type() == at::kFloat && same_layout(x, *s);
    }
    if (!fusable) {
      slow.push_back(static_cast<int64_t>(i));
      continue;
    }
    g_dtype = g.scalar_type();
    items.push_back(Item{x.data_ptr(), g.const_data_ptr(), ms[i].data_ptr<float>(),
                         ws[i].data_ptr<float>(),
                         has_momentum ? (*momentum_ms)[i].data_ptr<float>() : nullptr,
                         has_momentum ? (*momentum_ws)[i].data_ptr<float>() : nullptr, total,
                         static_cast<bool>(firsts[i])});
    fused.push_back(i);
    total += x.numel();
  }

  // Autograd's view of the kernel's in-place writes, as an in-place torch op gives it (the
  // reference's copy_ bumps the slow ones): a graph that saved x before the step then
  // refuses to backward through the stale value.  Raises, before anything is written, for
  // an inference tensor outside InferenceMode.
  for (const size_t i : fused) {
    torch::autograd::impl::bump_version(xs[i]);
    torch::autograd::impl::bump_version(ms[i]);
    torch::autograd::impl::bump_version(ws[i]);
    if (has_momentum) {
      torch::autograd::impl::bump_version((*momentum_ms)[i]);
      torch::autograd::impl::bump_version((*momentum_ws)[i]);
    }
  }

  // Scalars rounded to fp32 as torch does for `python_float * fp32_tensor`; 2α and 1−τ
  // are formed in double first, as the reference's Python expressions are.
  const double lr_v = lr_tensor ? read_scalar(*lr_tensor) : lr;
  const double alpha_v = alpha_tensor ? read_scalar(*alpha_tensor) : alpha;
  const Flags f{grad_scale.has_value(), maximize, weight_decay != 0, has_momentum, nesterov};
  const Coeffs<float> cs{static_cast<float>(lr_v),
                         static_cast<float>(momentum),
                         static_cast<float>(1.0 - dampening),
                         static_cast<float>(2.0 * alpha_v),
                         static_cast<float>(weight_decay),
                         grad_scale ? static_cast<float>(read_scalar(*grad_scale)) : 1.f};
  const bool skip = found_inf && read_scalar(*found_inf) != 0;

  if (l1_clear) l1_clear->zero_();
  if (items.empty()) return slow;
  double l1 = 0;
  switch (x_dtype) {
    case at::kFloat: l1 = dispatch_grad<float>(*g_dtype, items, total, skip, f, cs); break;
    case at::kBFloat16: l1 = dispatch_grad<BFloat16>(*g_dtype, items, total, skip, f, cs); break;
    case at::kHalf: l1 = dispatch_grad<Half>(*g_dtype, items, total, skip, f, cs); break;
    default: TORCH_INTERNAL_ASSERT(false, "unreachable parameter dtype");
  }
  if (l1_accum) {
    float* acc = l1_accum->data_ptr<float>();
    *acc = static_cast<float>(static_cast<double>(*acc) + l1);
  }
  return slow;
}

// The at::vec capability this module was compiled for ("AVX2", "AVX512", "DEFAULT", ...).
std::string capability() { return C10_STRINGIZE(CPU_CAPABILITY); }

}  // namespace pilot_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pilot_step", &pilot_cpu::pilot_step, "One fused PILoT step for CPU tensors");
  m.def("capability", &pilot_cpu::capability, "The at::vec capability compiled in");
  m.def("num_threads", &at::get_num_threads, "Threads of at::parallel_for in this module");
}
