// Farthest point sampling and k nearest neighbours on the CPU.
//
// Semantics (shared with the CUDA kernels and the pure-torch fallback, see docs/ops.md):
//  * squared distances are ((dx*dx + dy*dy) + dz*dz) in float32, never contracted to FMA
//    (the build passes -ffp-contract=off), so every backend returns the same indices;
//  * FPS follows pointnet2_ops: start at index 0, running distance starts at 1e10, points
//    with x^2+y^2+z^2 <= 1e-3 are never picked after the first, ties go to the lower index;
//  * kNN results are sorted by increasing distance, ties to the lower index.
//
// Clouds are copied to float32 structure-of-arrays planes so the inner loops run on
// 8-wide vectors (GCC/Clang vector extensions; an AVX2 clone is chosen at load time on
// x86-64). Clouds (FPS) or chunks of queries (kNN) are handed out to torch's intra-op
// threads (at::parallel_for, so torch.set_num_threads applies). Brute force on purpose:
// at backbone sizes (N <= 8192) a spatial index (Morton-ordered boxes were tried) cost
// about as much to build as it saved.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kLanes = 8;
constexpr int64_t kBlock = 2 * kLanes;  // two independent accumulators per step
constexpr float kFpsInit = 1e10f;        // pointnet2_ops' initial running distance
constexpr double kOriginEps = 1e-3;      // compared in double, as in pointnet2_ops

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define POINTCLORA_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define POINTCLORA_SIMD_CLONES
#endif

// Vector helpers are always inlined, so each SIMD clone compiles them for its own target
// (a 32-byte vector crossing a call between clones would change the calling convention).
#define POINTCLORA_INLINE inline __attribute__((always_inline))

POINTCLORA_INLINE vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

POINTCLORA_INLINE void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

POINTCLORA_INLINE vfloat splat(float s) {
  vfloat v;
  for (int64_t l = 0; l < kLanes; ++l) v[l] = s;
  return v;
}

POINTCLORA_INLINE vint iota(int32_t start) {
  vint v;
  for (int64_t l = 0; l < kLanes; ++l) v[l] = start + static_cast<int32_t>(l);
  return v;
}

POINTCLORA_INLINE vint splat(int32_t s) {
  vint v;
  for (int64_t l = 0; l < kLanes; ++l) v[l] = s;
  return v;
}

POINTCLORA_INLINE bool any(vint mask) {
  uint64_t words[sizeof(vint) / sizeof(uint64_t)];
  std::memcpy(words, &mask, sizeof(mask));
  uint64_t acc = 0;
  for (uint64_t w : words) acc |= w;
  return acc != 0;
}

inline int64_t padded(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

POINTCLORA_INLINE vfloat sqdist(vfloat x, vfloat y, vfloat z, vfloat cx, vfloat cy, vfloat cz) {
  const vfloat dx = x - cx, dy = y - cy, dz = z - cz;
  return dx * dx + dy * dy + dz * dz;
}

// fn(begin, end) over [0, n) in chunks handed out one at a time to torch's intra-op
// threads: on a busy machine a thread that the OS pauses holds back one chunk, not half
// of the work as with a static split.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  at::parallel_for(0, std::max<int64_t>(tasks, 1), 1, [&](int64_t, int64_t) {
    for (int64_t s; (s = next.fetch_add(chunk)) < n;) fn(s, std::min(n, s + chunk));
  });
}

// (x, y, z) planes of one cloud, padded to a multiple of kBlock with zeros.
void to_soa(const float* xyz, int64_t n, float* x, float* y, float* z) {
  const int64_t np = padded(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = xyz[3 * i];
    y[i] = xyz[3 * i + 1];
    z[i] = xyz[3 * i + 2];
  }
  std::fill(x + n, x + np, 0.f);
  std::fill(y + n, y + np, 0.f);
  std::fill(z + n, z + np, 0.f);
}

// One cloud. `work` holds 4 * padded(n) floats. Points that may never be picked carry a
// running distance of -1: min() keeps it there and the strict `>` against the initial
// best of -1 skips them, exactly like pointnet2_ops' `continue`.
POINTCLORA_SIMD_CLONES
void fps_cloud(const float* xyz, int64_t n, int64_t m, int64_t* out, float* work) {
  const int64_t np = padded(n);
  float *x = work, *y = work + np, *z = work + 2 * np, *dist = work + 3 * np;
  to_soa(xyz, n, x, y, z);
  for (int64_t i = 0; i < np; ++i) {
    const float mag = x[i] * x[i] + y[i] * y[i] + z[i] * z[i];
    dist[i] = (i < n && static_cast<double>(mag) > kOriginEps) ? kFpsInit : -1.f;
  }
  int64_t old = 0;
  out[0] = 0;
  const vint step = splat(static_cast<int32_t>(kBlock));
  for (int64_t j = 1; j < m; ++j) {
    const vfloat cx = splat(x[old]), cy = splat(y[old]), cz = splat(z[old]);
    vfloat best0 = splat(-1.f), best1 = splat(-1.f);
    vint arg0 = splat(0), arg1 = splat(0);
    vint idx0 = iota(0), idx1 = iota(kLanes);
    for (int64_t i = 0; i < np; i += kBlock) {
      vfloat d0 = sqdist(load(x + i), load(y + i), load(z + i), cx, cy, cz);
      vfloat d1 = sqdist(load(x + i + kLanes), load(y + i + kLanes), load(z + i + kLanes),
                         cx, cy, cz);
      const vfloat r0 = load(dist + i), r1 = load(dist + i + kLanes);
      d0 = d0 < r0 ? d0 : r0;
      d1 = d1 < r1 ? d1 : r1;
      store(dist + i, d0);
      store(dist + i + kLanes, d1);
      const vint up0 = d0 > best0, up1 = d1 > best1;
      best0 = up0 ? d0 : best0;
      arg0 = up0 ? idx0 : arg0;
      best1 = up1 ? d1 : best1;
      arg1 = up1 ? idx1 : arg1;
      idx0 += step;
      idx1 += step;
    }
    // Each lane holds its lowest index among its maxima; the lowest of the tied lanes wins.
    float best = -1.f;
    int32_t arg = 0;
    auto offer = [&](float v, int32_t a) {
      if (v > best || (v == best && a < arg)) {
        best = v;
        arg = a;
      }
    };
    for (int64_t l = 0; l < kLanes; ++l) {
      offer(best0[l], arg0[l]);
      offer(best1[l], arg1[l]);
    }
    old = arg;
    out[j] = old;
  }
}

at::Tensor furthest_point_sample(const at::Tensor& xyz, int64_t npoint) {
  TORCH_CHECK(xyz.dim() == 3 && xyz.size(2) == 3 && xyz.scalar_type() == at::kFloat &&
                  xyz.is_contiguous() && xyz.device().is_cpu(),
              "furthest_point_sample: xyz must be a contiguous float32 CPU tensor (B, N, 3)");
  const int64_t b = xyz.size(0), n = xyz.size(1);
  TORCH_CHECK(npoint >= 1 && npoint <= n, "furthest_point_sample: need 1 <= npoint <= N");
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max() - kBlock,
              "furthest_point_sample: too many points");
  at::Tensor out = at::empty({b, npoint}, xyz.options().dtype(at::kLong));
  const float* src = xyz.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  parallel_chunks(b, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work(4 * padded(n));
    for (int64_t c = begin; c < end; ++c) {
      fps_cloud(src + c * n * 3, n, npoint, dst + c * npoint, work.data());
    }
  });
  return out;
}

POINTCLORA_INLINE float hmin(vfloat v) {
  float m = v[0];
  for (int64_t l = 1; l < kLanes; ++l) m = v[l] < m ? v[l] : m;
  return m;
}

// k nearest reference points of one query without a running top-k list:
//  1. all distances, plus the minimum of each block of `block` points;
//  2. bound = the k-th smallest block minimum: those k blocks hold k distinct points at
//     most that far, so every one of the k nearest is within the bound;
//  3. the points within the bound (about 2k) are sorted by (distance, index).
// `d` holds padded(n) floats.
POINTCLORA_SIMD_CLONES
void knn_query(const float* x, const float* y, const float* z, int64_t n, const float* q,
               int64_t k, float* d, std::vector<float>& mins,
               std::vector<std::pair<float, int64_t>>& near, float* out_d, int64_t* out_i) {
  const int64_t np = padded(n);
  const vfloat qx = splat(q[0]), qy = splat(q[1]), qz = splat(q[2]);
  for (int64_t i = 0; i < np; i += kLanes) {
    store(d + i, sqdist(load(x + i), load(y + i), load(z + i), qx, qy, qz));
  }
  const float inf = std::numeric_limits<float>::infinity();
  std::fill(d + n, d + np, inf);  // padding is no point
  const int64_t block = std::max(kLanes, n / (4 * k) / kLanes * kLanes);
  const int64_t blocks = n / block;  // whole blocks of real points only
  float bound = inf;
  if (blocks >= k) {
    mins.resize(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      vfloat m = load(d + b * block);
      for (int64_t i = b * block + kLanes; i < (b + 1) * block; i += kLanes) {
        const vfloat v = load(d + i);
        m = v < m ? v : m;
      }
      mins[b] = hmin(m);
    }
    std::nth_element(mins.begin(), mins.begin() + (k - 1), mins.end());
    bound = mins[k - 1];
  }
  near.clear();
  const vfloat limit = splat(bound);
  for (int64_t i = 0; i < np; i += kLanes) {
    if (!any(load(d + i) <= limit)) continue;
    for (int64_t l = 0; l < kLanes; ++l) {
      if (d[i + l] <= bound && i + l < n) near.emplace_back(d[i + l], i + l);
    }
  }
  std::partial_sort(near.begin(), near.begin() + k, near.end());
  for (int64_t j = 0; j < k; ++j) {
    out_d[j] = near[j].first;
    out_i[j] = near[j].second;
  }
}

std::tuple<at::Tensor, at::Tensor> knn(const at::Tensor& ref, const at::Tensor& query,
                                       int64_t k) {
  for (const at::Tensor* t : {&ref, &query}) {
    TORCH_CHECK(t->dim() == 3 && t->size(2) == 3 && t->scalar_type() == at::kFloat &&
                    t->is_contiguous() && t->device().is_cpu(),
                "knn: ref and query must be contiguous float32 CPU tensors (B, *, 3)");
  }
  const int64_t b = ref.size(0), n = ref.size(1), m = query.size(1);
  TORCH_CHECK(query.size(0) == b, "knn: ref and query batch sizes differ");
  TORCH_CHECK(k >= 1 && k <= n, "knn: need 1 <= k <= N");
  const int64_t np = padded(n);
  at::Tensor dist = at::empty({b, m, k}, ref.options());
  at::Tensor idx = at::empty({b, m, k}, ref.options().dtype(at::kLong));
  std::vector<float> soa(b * 3 * np);
  const float* r = ref.data_ptr<float>();
  parallel_chunks(b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float* base = soa.data() + c * 3 * np;
      to_soa(r + c * n * 3, n, base, base + np, base + 2 * np);
    }
  });
  const float* q = query.data_ptr<float>();
  float* out_d = dist.data_ptr<float>();
  int64_t* out_i = idx.data_ptr<int64_t>();
  parallel_chunks(b * m, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> work(np), mins;
    std::vector<std::pair<float, int64_t>> near;
    for (int64_t t = begin; t < end; ++t) {
      const float* base = soa.data() + (t / m) * 3 * np;
      knn_query(base, base + np, base + 2 * np, n, q + t * 3, k, work.data(), mins, near,
                out_d + t * k, out_i + t * k);
    }
  });
  return {dist, idx};
}

}  // namespace

// Registered for the CPU dispatch key only: a tensor on another device gets the
// dispatcher's clear error instead of a bad pointer.
TORCH_LIBRARY(pointclora_cpu, lib) {
  lib.def("furthest_point_sample(Tensor xyz, int npoint) -> Tensor");
  lib.def("knn(Tensor ref, Tensor query, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pointclora_cpu, CPU, lib) {
  lib.impl("furthest_point_sample", &furthest_point_sample);
  lib.impl("knn", &knn);
}
