// Torch operator bindings of the CUDA kernels (namespace torch.ops.pointclora_cuda).
// Inputs arrive validated and converted by pointclora/ops/functional.py; the checks here
// only guard direct calls. Registered for the CUDA dispatch key, so a CPU tensor gets the
// dispatcher's clear error instead of a bad pointer.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "kernels.h"

namespace {

void check_cloud(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(2) == 3 && t.scalar_type() == at::kFloat &&
                  t.is_contiguous() && t.is_cuda(),
              op, ": ", name, " must be a contiguous float32 CUDA tensor (B, N, 3)");
  TORCH_CHECK(t.size(1) * 3 < INT_MAX, op, ": ", name, " has too many points");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor furthest_point_sample(const at::Tensor& xyz, int64_t npoint) {
  check_cloud(xyz, "furthest_point_sample", "xyz");
  const int64_t b = xyz.size(0), n = xyz.size(1);
  TORCH_CHECK(npoint >= 1 && npoint <= n, "furthest_point_sample: need 1 <= npoint <= N");
  const c10::cuda::CUDAGuard guard(xyz.device());
  at::Tensor out = at::empty({b, npoint}, xyz.options().dtype(at::kLong));
  if (b == 0) return out;
  // Running distances stay in registers up to 8192 points; only larger clouds need scratch.
  at::Tensor temp;
  if (pointclora::fps_needs_scratch(n)) temp = at::empty({b, n}, xyz.options());
  check_launch(pointclora::launch_furthest_point_sample(
                   xyz.data_ptr<float>(), b, n, npoint,
                   temp.defined() ? temp.data_ptr<float>() : nullptr, out.data_ptr<int64_t>(),
                   c10::cuda::getCurrentCUDAStream()),
               "furthest_point_sample");
  return out;
}

// variant: 0 picks by cloud size, 1 forces one thread per query, 2 one warp per query.
std::tuple<at::Tensor, at::Tensor> knn(const at::Tensor& ref, const at::Tensor& query,
                                       int64_t k, int64_t variant) {
  check_cloud(ref, "knn", "ref");
  check_cloud(query, "knn", "query");
  const int64_t b = ref.size(0), n = ref.size(1), m = query.size(1);
  TORCH_CHECK(query.size(0) == b && query.device() == ref.device(),
              "knn: ref and query must share batch size and device");
  TORCH_CHECK(k >= 1 && k <= n && k <= pointclora::kKnnMaxK, "knn: need 1 <= k <= min(N, ",
              pointclora::kKnnMaxK, ")");
  TORCH_CHECK(variant >= 0 && variant <= 2, "knn: variant must be 0 (auto), 1 (thread per "
              "query) or 2 (warp per query), got ", variant);
  const c10::cuda::CUDAGuard guard(ref.device());
  at::Tensor dist = at::empty({b, m, k}, ref.options());
  at::Tensor idx = at::empty({b, m, k}, ref.options().dtype(at::kLong));
  if (b == 0 || m == 0) return {dist, idx};
  auto chosen = static_cast<pointclora::KnnVariant>(variant);
  if (chosen == pointclora::KnnVariant::kAuto) chosen = pointclora::knn_auto_variant(n);
  check_launch(pointclora::launch_knn(ref.data_ptr<float>(), query.data_ptr<float>(), b, n, m,
                                      k, chosen, dist.data_ptr<float>(),
                                      idx.data_ptr<int64_t>(),
                                      c10::cuda::getCurrentCUDAStream()),
               "knn");
  return {dist, idx};
}

}  // namespace

TORCH_LIBRARY(pointclora_cuda, lib) {
  lib.def("furthest_point_sample(Tensor xyz, int npoint) -> Tensor");
  lib.def("knn(Tensor ref, Tensor query, int k, int variant=0) -> (Tensor, Tensor)");
  lib.def("knn_max_k() -> int", [] { return pointclora::kKnnMaxK; });
}

TORCH_LIBRARY_IMPL(pointclora_cuda, CUDA, lib) {
  lib.impl("furthest_point_sample", &furthest_point_sample);
  lib.impl("knn", &knn);
}
