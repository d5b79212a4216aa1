// Launchers of the CUDA kernels; plain pointers so the .cu file needs no ATen headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pointclora {

// Largest k served by the kNN kernel (per-thread sorted lists live in local memory).
constexpr int64_t kKnnMaxK = 128;

// xyz (b, n, 3) float32, temp (b, n) scratch, out (b, m) int64.
cudaError_t launch_furthest_point_sample(const float* xyz, int64_t b, int64_t n, int64_t m,
                                         float* temp, int64_t* out, cudaStream_t stream);

// ref (b, n, 3), query (b, m, 3) float32; dist (b, m, k) float32, idx (b, m, k) int64.
cudaError_t launch_knn(const float* ref, const float* query, int64_t b, int64_t n, int64_t m,
                       int64_t k, float* dist, int64_t* idx, cudaStream_t stream);

}  // namespace pointclora
