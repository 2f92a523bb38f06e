// Torch binding of the CUDA sources: dualpipe_ext._cuda.
// Checks every input at the boundary, then calls the torch-free kernels (grouped_mm_sm90.h).
// Uses no c10/cuda header: the Python wrapper passes the current stream and makes the
// tensors' device current, so this file also compiles against a CPU build of torch.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include "grouped_mm_sm90.h"

namespace {

// out[rows of g] = x[rows of g] @ w[g]^T; x [rows, k] bf16, w [groups, n, k] bf16,
// group_ends [groups] int32 (cumulative row counts, ending at rows), all on one CUDA device.
// stream: the cudaStream_t of the caller's current stream (torch.cuda.current_stream().cuda_stream).
// sm_count: SMs the persistent kernel may use (0: all of the device; fewer leave room for communication).
at::Tensor grouped_mm_bf16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_ends, int64_t stream,
                           int64_t sm_count_limit) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && group_ends.is_cuda(), "grouped_mm_bf16: x, w, group_ends must be CUDA tensors");
  TORCH_CHECK(x.get_device() == w.get_device() && x.get_device() == group_ends.get_device(),
              "grouped_mm_bf16: x, w, group_ends must be on one device");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "grouped_mm_bf16: x and w must be bfloat16, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(group_ends.scalar_type() == at::kInt, "grouped_mm_bf16: group_ends must be int32");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && group_ends.dim() == 1,
              "grouped_mm_bf16: expected x [rows, k], w [groups, n, k], group_ends [groups]");
  TORCH_CHECK(w.size(2) == x.size(1), "grouped_mm_bf16: w must be [groups, n, k=", x.size(1), "], got ", w.sizes());
  TORCH_CHECK(group_ends.size(0) == w.size(0), "grouped_mm_bf16: group_ends must have ", w.size(0), " entries");
  TORCH_CHECK(x.size(1) % 8 == 0 && w.size(1) % 8 == 0, "grouped_mm_bf16: n and k must be multiples of 8");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto out = at::empty({x.size(0), w.size(1)}, x.options());
  const int num_groups = static_cast<int>(w.size(0));
  if (num_groups == 0 || x.size(0) == 0) return out;
  int sm_count = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.get_device()) == cudaSuccess,
              "grouped_mm_bf16: cannot query the SM count");
  TORCH_CHECK(sm_count_limit >= 0, "grouped_mm_bf16: sm_count must be >= 0, got ", sm_count_limit);
  if (sm_count_limit > 0 && sm_count_limit < sm_count) sm_count = static_cast<int>(sm_count_limit);
  const size_t bytes = dualpipe_grouped_mm_bf16_sm90_workspace_bytes(num_groups, sm_count);
  auto workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  const char* err = dualpipe_grouped_mm_bf16_sm90_run(
      xc.data_ptr(), wc.data_ptr(), out.data_ptr(), group_ends.data_ptr<int32_t>(), num_groups,
      static_cast<int>(w.size(1)), static_cast<int>(x.size(1)), workspace.data_ptr(), x.get_device(), sm_count,
      reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == nullptr, err);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dualpipe-ext CUDA kernels (sm90)";
  m.def("grouped_mm_bf16", &grouped_mm_bf16, "Grouped bf16 GEMM out[rows of g] = x[rows of g] @ w[g]^T (CUTLASS sm90)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("group_ends"), pybind11::arg("stream"),
        pybind11::arg("sm_count") = 0);
}
