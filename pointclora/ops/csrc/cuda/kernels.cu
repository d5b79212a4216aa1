// Farthest point sampling and k nearest neighbours on CUDA.
//
// Same semantics and arithmetic as csrc/cpu/ops_cpu.cpp: squared distances are
// ((dx*dx + dy*dy) + dz*dz) in float32 and the build passes --fmad=false, so indices are
// bit-identical to the CPU kernels; ties go to the lower index everywhere.
#include <climits>

#include "kernels.h"

namespace pointclora {
namespace {

constexpr int kWarp = 32;
constexpr int kFpsThreads = 512;
constexpr int kFpsMaxPointsPerThread = 16;  // clouds up to 8192 points stay in registers
constexpr float kFpsInit = 1e10f;            // pointnet2_ops' initial running distance
constexpr double kOriginEps = 1e-3;          // compared in double, as in pointnet2_ops
constexpr int kKnnThreads = 128;
constexpr int kKnnTile = 512;

__device__ __forceinline__ float sqdist(float x, float y, float z, float cx, float cy,
                                        float cz) {
  const float dx = x - cx, dy = y - cy, dz = z - cz;
  return dx * dx + dy * dy + dz * dz;
}

__device__ __forceinline__ bool pickable(float x, float y, float z) {
  return static_cast<double>(x * x + y * y + z * z) > kOriginEps;
}

// Keep (v, i) if it beats (best, arg): larger value, then lower index.
__device__ __forceinline__ void offer(float& best, int& arg, float v, int i) {
  if (v > best || (v == best && i < arg)) {
    best = v;
    arg = i;
  }
}

// Block-wide argmax of (best, arg); every thread gets the winning index.
__device__ int block_argmax(float best, int arg) {
  __shared__ float warp_best[kFpsThreads / kWarp];
  __shared__ int warp_arg[kFpsThreads / kWarp];
  __shared__ int winner;
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    offer(best, arg, __shfl_down_sync(0xffffffffu, best, off),
          __shfl_down_sync(0xffffffffu, arg, off));
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
    warp_best[warp] = best;
    warp_arg[warp] = arg;
  }
  __syncthreads();
  if (warp == 0) {
    const bool live = lane < static_cast<int>(blockDim.x) / kWarp;
    best = live ? warp_best[lane] : -2.f;
    arg = live ? warp_arg[lane] : INT_MAX;
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      offer(best, arg, __shfl_down_sync(0xffffffffu, best, off),
            __shfl_down_sync(0xffffffffu, arg, off));
    }
    if (lane == 0) winner = arg;
  }
  __syncthreads();
  return winner;
}

// One block per cloud. PPT > 0: each thread keeps PPT points and their running distances
// in registers; PPT == 0: running distances live in `temp` (any cloud size). Points that
// may never be picked carry distance -1, which neither min() nor the strict `>` against
// the initial best of -1 ever lets through (pointnet2_ops' `continue`).
template <int PPT>
__global__ void __launch_bounds__(kFpsThreads)
    fps_kernel(const float* __restrict__ xyz, int n, int m, float* __restrict__ temp,
               int64_t* __restrict__ out) {
  const int64_t cloud = blockIdx.x;
  xyz += cloud * n * 3;
  temp += cloud * n;
  out += cloud * m;
  const int tid = threadIdx.x;
  constexpr int kSlots = PPT > 0 ? PPT : 1;
  float px[kSlots], py[kSlots], pz[kSlots], pd[kSlots];
  if constexpr (PPT > 0) {
#pragma unroll
    for (int p = 0; p < PPT; ++p) {
      const int i = tid + p * kFpsThreads;
      const bool in = i < n;
      px[p] = in ? xyz[3 * i] : 0.f;
      py[p] = in ? xyz[3 * i + 1] : 0.f;
      pz[p] = in ? xyz[3 * i + 2] : 0.f;
      pd[p] = (in && pickable(px[p], py[p], pz[p])) ? kFpsInit : -1.f;
    }
  } else {
    for (int i = tid; i < n; i += kFpsThreads) {
      temp[i] = pickable(xyz[3 * i], xyz[3 * i + 1], xyz[3 * i + 2]) ? kFpsInit : -1.f;
    }
  }
  if (tid == 0) out[0] = 0;
  int old = 0;
  for (int j = 1; j < m; ++j) {
    const float cx = xyz[3 * old], cy = xyz[3 * old + 1], cz = xyz[3 * old + 2];
    float best = -1.f;
    int arg = 0;
    if constexpr (PPT > 0) {
#pragma unroll
      for (int p = 0; p < PPT; ++p) {
        const float d = fminf(sqdist(px[p], py[p], pz[p], cx, cy, cz), pd[p]);
        pd[p] = d;
        if (d > best) {
          best = d;
          arg = tid + p * kFpsThreads;
        }
      }
    } else {
      for (int i = tid; i < n; i += kFpsThreads) {
        const float d = fminf(sqdist(xyz[3 * i], xyz[3 * i + 1], xyz[3 * i + 2], cx, cy, cz),
                              temp[i]);
        temp[i] = d;
        if (d > best) {
          best = d;
          arg = i;
        }
      }
    }
    old = block_argmax(best, arg);
    if (tid == 0) out[j] = old;
  }
}

// One thread per query; reference points stream through shared memory in index order, so
// the strict comparisons of the sorted insertion keep equal distances in index order.
template <int KMAX>
__global__ void __launch_bounds__(kKnnThreads)
    knn_kernel(const float* __restrict__ ref, const float* __restrict__ query, int n, int m,
               int k, float* __restrict__ dist, int64_t* __restrict__ idx) {
  __shared__ float sx[kKnnTile], sy[kKnnTile], sz[kKnnTile];
  const int64_t cloud = blockIdx.y;
  ref += cloud * n * 3;
  const int q = blockIdx.x * kKnnThreads + threadIdx.x;
  const bool active = q < m;
  const int64_t row = (cloud * m + q) * k;
  float qx = 0.f, qy = 0.f, qz = 0.f;
  if (active) {
    const float* p = query + (cloud * m + q) * 3;
    qx = p[0];
    qy = p[1];
    qz = p[2];
  }
  float best_d[KMAX];
  int best_i[KMAX];
  int count = 0;
  for (int start = 0; start < n; start += kKnnTile) {
    const int len = min(kKnnTile, n - start);
    __syncthreads();
    for (int s = threadIdx.x; s < len; s += kKnnThreads) {
      sx[s] = ref[3 * (start + s)];
      sy[s] = ref[3 * (start + s) + 1];
      sz[s] = ref[3 * (start + s) + 2];
    }
    __syncthreads();
    if (!active) continue;
    for (int s = 0; s < len; ++s) {
      const float d = sqdist(sx[s], sy[s], sz[s], qx, qy, qz);
      if (count == k && !(d < best_d[k - 1])) continue;
      int pos = count < k ? count++ : k - 1;
      while (pos > 0 && best_d[pos - 1] > d) {
        best_d[pos] = best_d[pos - 1];
        best_i[pos] = best_i[pos - 1];
        --pos;
      }
      best_d[pos] = d;
      best_i[pos] = start + s;
    }
  }
  if (!active) return;
  for (int j = 0; j < k; ++j) {
    dist[row + j] = best_d[j];
    idx[row + j] = best_i[j];
  }
}

template <int PPT>
void launch_fps(const float* xyz, int64_t b, int64_t n, int64_t m, float* temp, int64_t* out,
                cudaStream_t stream) {
  fps_kernel<PPT><<<static_cast<unsigned>(b), kFpsThreads, 0, stream>>>(
      xyz, static_cast<int>(n), static_cast<int>(m), temp, out);
}

template <int KMAX>
void launch_knn_k(const float* ref, const float* query, int64_t b, int64_t n, int64_t m,
                  int64_t k, float* dist, int64_t* idx, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((m + kKnnThreads - 1) / kKnnThreads),
                  static_cast<unsigned>(b));
  knn_kernel<KMAX><<<grid, kKnnThreads, 0, stream>>>(ref, query, static_cast<int>(n),
                                                     static_cast<int>(m), static_cast<int>(k),
                                                     dist, idx);
}

}  // namespace

cudaError_t launch_furthest_point_sample(const float* xyz, int64_t b, int64_t n, int64_t m,
                                         float* temp, int64_t* out, cudaStream_t stream) {
  static_assert(kFpsMaxPointsPerThread == 16, "update the dispatch below");
  const int64_t per_thread = (n + kFpsThreads - 1) / kFpsThreads;
  if (per_thread <= 1) {
    launch_fps<1>(xyz, b, n, m, temp, out, stream);
  } else if (per_thread <= 2) {
    launch_fps<2>(xyz, b, n, m, temp, out, stream);
  } else if (per_thread <= 4) {
    launch_fps<4>(xyz, b, n, m, temp, out, stream);
  } else if (per_thread <= 8) {
    launch_fps<8>(xyz, b, n, m, temp, out, stream);
  } else if (per_thread <= kFpsMaxPointsPerThread) {
    launch_fps<16>(xyz, b, n, m, temp, out, stream);
  } else {
    launch_fps<0>(xyz, b, n, m, temp, out, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_knn(const float* ref, const float* query, int64_t b, int64_t n, int64_t m,
                       int64_t k, float* dist, int64_t* idx, cudaStream_t stream) {
  static_assert(kKnnMaxK == 128, "update the dispatch below");
  if (k <= 16) {
    launch_knn_k<16>(ref, query, b, n, m, k, dist, idx, stream);
  } else if (k <= 32) {
    launch_knn_k<32>(ref, query, b, n, m, k, dist, idx, stream);
  } else if (k <= 64) {
    launch_knn_k<64>(ref, query, b, n, m, k, dist, idx, stream);
  } else {
    launch_knn_k<128>(ref, query, b, n, m, k, dist, idx, stream);
  }
  return cudaGetLastError();
}

}  // namespace pointclora
