// Launchers of the CUDA kernels; plain pointers so the .cu file needs no ATen headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pointclora {

// Largest k served by the kNN kernels (sorted lists in registers or local memory).
constexpr int64_t kKnnMaxK = 128;

// kNN kernel variants: one thread per query, one warp per query.
enum class KnnVariant : int64_t { kAuto = 0, kThread = 1, kWarp = 2 };

// xyz (b, n, 3) float32, out (b, m) int64. temp: (b, n) float32 scratch, used (and needed)
// only when fps_needs_scratch(n); may be null otherwise.
bool fps_needs_scratch(int64_t n);
cudaError_t launch_furthest_point_sample(const float* xyz, int64_t b, int64_t n, int64_t m,
                                         float* temp, int64_t* out, cudaStream_t stream);

// The variant `kAuto` resolves to for clouds of n points.
KnnVariant knn_auto_variant(int64_t n);

// ref (b, n, 3), query (b, m, 3) float32; dist (b, m, k) float32, idx (b, m, k) int64.
// `variant` must not be kAuto.
cudaError_t launch_knn(const float* ref, const float* query, int64_t b, int64_t n, int64_t m,
                       int64_t k, KnnVariant variant, float* dist, int64_t* idx,
                       cudaStream_t stream);

}  // namespace pointclora
