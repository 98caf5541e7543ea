// Python binding of the fused PILoT step: checks every precondition (TORCH_CHECK with
// the fix in the message), builds the multi-tensor table, uploads it (pinned host memory,
// one asynchronous copy on the current stream; cached in the caller's workspace dict so
// an unchanged table is not uploaded again) and launches pilot_step.cu's kernel on the
// current stream.  Nothing here reads a device value on the host: no synchronization,
// and with a cached table nothing but the launch, so a step can be captured in a CUDA
// graph.
//
// It steps exactly what it is given: pilot_kernels.kernels.run_step has already handed
// the reference every entry the kernel cannot walk (layout.py's contract: every tensor
// of an entry dense, with x's shape and, on dimensions of size > 1, x's strides), split
// the call by gradient dtype (x's or float32), and bumps the version counters after the
// call.  Each of those is still checked here (TORCH_CHECK, before anything is written).
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "pilot_step.h"

namespace {

using TensorList = std::vector<at::Tensor>;

std::string describe(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

pilot::ParamType param_type_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return pilot::ParamType::kFloat32;
    case at::kBFloat16:
      return pilot::ParamType::kBFloat16;
    case at::kHalf:
      return pilot::ParamType::kFloat16;
    default:
      TORCH_CHECK(false, "xs[0] has dtype ", x.scalar_type(),
                  "; the cuda backend supports float32, bfloat16 and float16 parameters: "
                  "convert the model (e.g. model.float()) or use backend='reference'");
  }
}

// Same shape and, on every dimension of size > 1, the same stride as x: then the flat
// memory order of both is the same elementwise order.
bool same_layout(const at::Tensor& a, const at::Tensor& x) {
  if (a.sizes() != x.sizes()) return false;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) > 1 && a.stride(d) != x.stride(d)) return false;
  }
  return true;
}

// Raises, naming the fix, for anything the kernel cannot step: a missing tensor, another
// device, non-fp32 state, a gradient of another dtype than grads[0] (which is x's or
// fp32), another shape or a layout the kernel cannot walk together with x.
void check_tensor(const at::Tensor& t, const std::string& name, const at::Tensor& x,
                  const std::string& x_name, bool fp32_state, at::ScalarType grad_dtype) {
  TORCH_CHECK(t.defined(), name, " is undefined; pass a tensor");
  TORCH_CHECK(t.is_cuda(), name, " is on ", t.device(),
              "; the cuda backend needs CUDA tensors: move the model to the GPU or use "
              "backend='reference'");
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but ", x_name, " is on ",
              x.device(), "; all tensors of one call must share one device (move them with .to())");
  if (fp32_state) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " has dtype ", t.scalar_type(),
                "; PILoT state (m, w, momentum buffers) must be float32: create it with "
                "torch.float32 whatever the parameter dtype");
  } else {
    TORCH_CHECK(t.scalar_type() == grad_dtype, name, " has dtype ", t.scalar_type(),
                " but grads[0] has ", grad_dtype, "; one call takes one gradient dtype, the "
                "parameters' or float32 (call through pilot_kernels.kernels.run_step)");
  }
  TORCH_CHECK(t.numel() == x.numel() && t.sizes() == x.sizes(), name, " has shape ", t.sizes(),
              " but ", x_name, " has shape ", x.sizes(), "; every tensor of an entry must have "
              "the parameter's shape");
  TORCH_CHECK(same_layout(t, x), name, " has strides ", t.strides(), " but ", x_name, " has ",
              x.strides(), "; the kernel walks an entry's tensors in one memory order (call "
              "through pilot_kernels.kernels.run_step, which steps such entries with the "
              "reference)");
}

// A 1-element fp32 tensor on `device`, read by the kernel (never on the host).
const float* scalar_ptr(const std::optional<at::Tensor>& t, const char* name,
                        const at::Device& device, bool writable) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->device() == device, name, " is on ", t->device(),
              " but the parameters are on ", device, "; move it with .to(", device,
              ", non_blocking=True)");
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, " has dtype ", t->scalar_type(),
              "; it must be a float32 tensor (as torch.amp.GradScaler makes it)");
  TORCH_CHECK(t->numel() == 1, name, " has ", t->numel(), " elements; it must have exactly one",
              writable ? " (pass a 0-dim view such as buf[0])" : "");
  return t->data_ptr<float>();
}

bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Workspace keys (the dict may hold other backends' entries too).
constexpr const char* kHostKey = "cuda_table_host";
constexpr const char* kDeviceKey = "cuda_table";

// The table on the device: the workspace's cached copy when its bytes are unchanged,
// else a fresh upload: pinned host tensor + one asynchronous copy on the current stream.
// The caching host allocator records that copy, so the pinned block is not reused
// before it completes; the workspace also keeps both tensors alive.  Without a
// workspace the device copy is freed after the launch, stream-ordered.
at::Tensor device_table_for(const std::vector<uint8_t>& rows, const at::Device& device,
                            cudaStream_t stream, const py::object& workspace) {
  if (rows.empty()) return at::Tensor();
  py::dict cache;
  const bool has_cache = !workspace.is_none();
  if (has_cache) {
    TORCH_CHECK(py::isinstance<py::dict>(workspace), "workspace must be a dict or None, got ",
                Py_TYPE(workspace.ptr())->tp_name, "; pass {} and keep it between calls");
    cache = workspace.cast<py::dict>();
    if (cache.contains(kHostKey) && cache.contains(kDeviceKey)) {
      const at::Tensor host = cache[kHostKey].cast<at::Tensor>();
      const at::Tensor table = cache[kDeviceKey].cast<at::Tensor>();
      if (host.numel() == static_cast<int64_t>(rows.size()) && table.device() == device &&
          std::memcmp(host.data_ptr(), rows.data(), rows.size()) == 0) {
        return table;
      }
    }
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "PILoT's cuda backend cannot upload its kernel table while a CUDA graph is being "
              "captured: pass a workspace dict (the optimizer does), run a warm-up step with the "
              "same tensors before capturing, and keep gradients allocated across steps "
              "(opt.zero_grad(set_to_none=False))");
  const auto bytes = static_cast<int64_t>(rows.size());
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), rows.data(), rows.size());
  at::Tensor table = host.to(at::TensorOptions().device(device).dtype(at::kByte),
                             /*non_blocking=*/true);
  if (has_cache) {
    cache[kHostKey] = host;
    cache[kDeviceKey] = table;
  }
  return table;
}

// lr / alpha: a float, or (lr_tensor / alpha_tensor) a 1-element fp32 device tensor read
// by the kernel.  workspace: None or a dict kept by the caller between calls; the device
// table is cached in it and re-uploaded only when a pointer, size or flag changed.
// The kernel clears l1_clear.
void pilot_step(const TensorList& xs, const TensorList& grads, const TensorList& ms,
                const TensorList& ws, const std::optional<TensorList>& momentum_ms,
                const std::optional<TensorList>& momentum_ws, const std::vector<bool>& firsts,
                double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
                double dampening, bool nesterov, double alpha,
                const std::optional<at::Tensor>& alpha_tensor, double weight_decay,
                bool maximize, double beta, bool adopt_writes,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& l1_accum,
                const std::optional<at::Tensor>& l1_clear, const py::object& workspace) {
  const size_t n = xs.size();
  TORCH_CHECK(grads.size() == n && ms.size() == n && ws.size() == n && firsts.size() == n,
              "xs, grads, ms, ws and firsts must have the same length; got ", n, ", ",
              grads.size(), ", ", ms.size(), ", ", ws.size(), " and ", firsts.size(),
              ": pass one entry per parameter in each list");
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) {
    TORCH_CHECK(momentum_ms.has_value() && momentum_ws.has_value(),
                "momentum is ", momentum, " but momentum_ms/momentum_ws are None; pass the fp32 "
                "momentum buffers (zeros before the first step) or set momentum=0");
    TORCH_CHECK(momentum_ms->size() == n && momentum_ws->size() == n,
                "momentum_ms and momentum_ws must have one buffer per parameter; got ",
                momentum_ms->size(), " and ", momentum_ws->size(), " for ", n, " parameters");
  } else {
    TORCH_CHECK(!momentum_ms.has_value() && !momentum_ws.has_value(),
                "momentum is 0 but momentum_ms/momentum_ws were passed; pass None for both "
                "(no buffers are used without momentum) or set momentum > 0");
  }

  TORCH_CHECK(!adopt_writes || (beta >= 0.0 && beta <= pilot::kPilotMaxBeta), "beta is ", beta,
              "; the cuda backend re-splits written elements with 0 <= beta <= 2^47 (use "
              "backend='reference' for a larger one)");
  if (n == 0) {  // nothing to step; still honour l1_clear, as the reference does
    if (l1_clear.has_value() && l1_clear->defined()) l1_clear->zero_();
    return;
  }

  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(x0.defined() && x0.is_cuda(), "xs[0] is ",
              x0.defined() ? x0.device().str() : std::string("undefined"),
              "; the cuda backend needs CUDA tensors: move the model to the GPU or use "
              "backend='reference'");
  const at::Device device = x0.device();
  const pilot::ParamType ptype = param_type_of(x0);
  const at::ScalarType dtype = x0.scalar_type();
  const size_t elem = x0.element_size();
  TORCH_CHECK(grads[0].defined(), "grads[0] is undefined; pass a tensor");
  const at::ScalarType grad_dtype = grads[0].scalar_type();
  TORCH_CHECK(grad_dtype == dtype || grad_dtype == at::kFloat, "grads[0] has dtype ", grad_dtype,
              " for ", dtype, " parameters; the cuda backend reads gradients of the parameters' "
              "dtype or float32 (cast it with .to())");
  const pilot::ParamType gtype = param_type_of(grads[0]);
  const size_t grad_elem = grads[0].element_size();

  const float* lr_ptr = scalar_ptr(lr_tensor, "lr (a tensor)", device, false);
  const float* alpha_ptr = scalar_ptr(alpha_tensor, "alpha (a tensor)", device, false);
  const float* grad_scale_ptr = scalar_ptr(grad_scale, "grad_scale", device, false);
  const float* found_inf_ptr = scalar_ptr(found_inf, "found_inf", device, false);
  float* l1_accum_ptr = const_cast<float*>(scalar_ptr(l1_accum, "l1_accum", device, true));
  float* l1_clear_ptr = const_cast<float*>(scalar_ptr(l1_clear, "l1_clear", device, true));

  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  // Validate everything before anything is written.
  int64_t n_entries = 0;
  for (size_t i = 0; i < n; ++i) {
    const std::string xn = describe("xs", i);
    const at::Tensor& x = xs[i];
    TORCH_CHECK(x.defined() && x.is_cuda() && x.device() == device, xn, " is on ",
                x.defined() ? x.device().str() : std::string("nothing (undefined)"),
                " but xs[0] is on ", device,
                "; call once per device (the optimizer groups tensors by device and dtype)");
    TORCH_CHECK(x.scalar_type() == dtype, xn, " has dtype ", x.scalar_type(), " but xs[0] has ",
                dtype, "; call once per dtype (the optimizer groups tensors by device and dtype)");
    TORCH_CHECK(x.is_non_overlapping_and_dense(), xn, " is not dense (a strided view); the "
                "kernel walks dense tensors only (call through pilot_kernels.kernels.run_step, "
                "which steps it with the reference)");
    check_tensor(grads[i], describe("grads", i), x, xn, false, grad_dtype);
    check_tensor(ms[i], describe("ms", i), x, xn, true, grad_dtype);
    check_tensor(ws[i], describe("ws", i), x, xn, true, grad_dtype);
    if (has_momentum) {
      check_tensor((*momentum_ms)[i], describe("momentum_ms", i), x, xn, true, grad_dtype);
      check_tensor((*momentum_ws)[i], describe("momentum_ws", i), x, xn, true, grad_dtype);
    }
    if (x.numel() > 0) ++n_entries;
  }

  // The table (pilot_step.h), built on the host every call: gradients may move between
  // steps (zero_grad(set_to_none=True)), and the first-step flags change once.
  int64_t total_chunks = 0;
  std::vector<uint8_t> rows;
  if (n_entries > 0) {
    rows.assign(static_cast<size_t>(pilot::table_bytes(n_entries)), 0);
    auto* chunk_starts = reinterpret_cast<int64_t*>(rows.data());
    auto* entries = reinterpret_cast<pilot::PilotTensorEntry*>(
        rows.data() + pilot::table_entries_offset(n_entries));
    int64_t k = 0;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& x = xs[i];
      if (x.numel() == 0) continue;
      pilot::PilotTensorEntry& e = entries[k];
      e.x = x.data_ptr();
      e.grad = grads[i].data_ptr();
      e.m = ms[i].data_ptr<float>();
      e.w = ws[i].data_ptr<float>();
      e.momentum_m = has_momentum ? (*momentum_ms)[i].data_ptr<float>() : nullptr;
      e.momentum_w = has_momentum ? (*momentum_ws)[i].data_ptr<float>() : nullptr;
      e.numel = x.numel();
      e.first = firsts[i] ? 1 : 0;
      const bool aligned = aligned_to(e.x, 4 * elem) && aligned_to(e.grad, 4 * grad_elem) &&
                           aligned_to(e.m, 16) && aligned_to(e.w, 16) &&
                           aligned_to(e.momentum_m, 16) && aligned_to(e.momentum_w, 16);
      e.aligned = aligned ? 1 : 0;
      chunk_starts[k] = total_chunks;
      total_chunks += pilot::chunks_of(e.numel);
      ++k;
    }
    chunk_starts[n_entries] = total_chunks;
  }
  const at::Tensor device_table = device_table_for(rows, device, stream, workspace);

  // l1_accum and l1_clear the same element: clear first (as the reference), then add.
  if (l1_clear_ptr != nullptr && l1_clear_ptr == l1_accum_ptr) {
    l1_clear->zero_();
    l1_clear_ptr = nullptr;
  }

  pilot::PilotHyper hyper;
  hyper.lr = static_cast<float>(lr);
  hyper.momentum = static_cast<float>(momentum);
  hyper.one_minus_dampening = static_cast<float>(1.0 - dampening);
  hyper.two_alpha = static_cast<float>(2.0 * alpha);
  hyper.weight_decay = static_cast<float>(weight_decay);
  hyper.beta = static_cast<float>(beta);
  hyper.beta_sq = static_cast<float>(beta * beta);
  hyper.half_beta = static_cast<float>(beta * 0.5);
  hyper.adopt_writes = adopt_writes ? 1 : 0;
  hyper.beta_zero = beta == 0.0 ? 1 : 0;
  hyper.has_momentum = has_momentum ? 1 : 0;
  hyper.nesterov = nesterov ? 1 : 0;
  hyper.maximize = maximize ? 1 : 0;
  hyper.has_weight_decay = weight_decay != 0.0 ? 1 : 0;
  hyper.lr_device = lr_ptr;
  hyper.alpha_device = alpha_ptr;

  const cudaError_t err = pilot::pilot_step_launch(
      ptype, gtype, device_table.defined() ? device_table.data_ptr() : nullptr, n_entries, total_chunks,
      hyper, grad_scale_ptr, found_inf_ptr, l1_accum_ptr, l1_clear_ptr,
      static_cast<int>(device.index()), stream);
  C10_CUDA_CHECK(err);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA C++ fused PILoT step (pilot_kernels.kernels.fused_cuda)";
  m.def("pilot_step", &pilot_step,
        "One fused PILoT step for the tensors of one (device, dtype) group; see "
        "pilot_kernels.kernels.reference.pilot_step for the semantics; called by "
        "pilot_kernels.kernels.run_step (which bumps the version counters).",
        py::arg("xs"), py::arg("grads"), py::arg("ms"), py::arg("ws"), py::arg("momentum_ms"),
        py::arg("momentum_ws"), py::arg("firsts"), py::arg("lr"), py::arg("lr_tensor"),
        py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"), py::arg("alpha"),
        py::arg("alpha_tensor"), py::arg("weight_decay"), py::arg("maximize"),
        py::arg("beta"), py::arg("adopt_writes"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("l1_accum"), py::arg("l1_clear"),
        py::arg("workspace"));
  m.attr("CHUNK") = pilot::kPilotChunk;
  m.attr("BLOCK") = pilot::kPilotBlock;
}
