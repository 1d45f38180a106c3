// CUDA kernels of the Mahalanobis distance map (DML eq. 2) and its randomized version (eq. 5).
// The driver is the one the CPU uses (mahalanobis.h): the points are transformed by cuBLAS
// GEMMs (at::matmul / at::bmm), ut[e, :, b] = F_e x_b and v[e, c, :] = F_e c, and the kernels
// here do the rest:
//
// * distances_kernel: a 16 x 16 tile of (b, c) pairs per block, ut and v staged through
//   shared memory 16 features at a time, in the difference form sum_n (ut - v)^2 (it does
//   not cancel like the expansion ||u||^2 + ||v||^2 - 2 u.v would); the randomized DML adds
//   each sample's distances to the mean with one ATen op.
// * distances_backward_kernel: the whole distance backward in ONE launch; blocks with
//   blockIdx.x < tiles_b make dut[e, n-tile, b-tile] = sum_c w (ut - v), the others
//   dv[e, c-tile, n-tile] = -sum_b w (ut - v), with w = scale * grad / d (0 where d = 0).
// * close pairs (||u - v||^2 < kClose (||u||^2 + ||v||^2)) are then redone from the difference
//   F (x_b - c) with ATen ops (mahalanobis.h): u and v are rounded separately, so their
//   difference alone would be inaccurate there (and x = c would not give exactly sqrt(eps)).
// * noise_kernel: one thread per Philox counter, four noise values each (mahalanobis.h),
//   written as F + sigma z (the perturbed factor of one sample) or as plain z.
//
// Half inputs are upcast by the driver: the kernels see float (or double) only, so fp16 and
// bf16 run with float32 accumulation. Kernels launch on the current stream.

// torch wheels built without CUDA lack the CMake-generated c10/cuda/impl/cuda_cmake_macros.h
// (the Windows DLL-export switch only); skip it there so this file also compiles, for the
// nvcc check in tests/test_build.py, against a CPU wheel's headers.
#if defined(__has_include) && !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif

#include "mahalanobis.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

namespace pyens {
namespace maha {
namespace {

constexpr int kTile = 16;              // pairs per block: kTile x kTile threads
constexpr int kNoiseThreads = 256;     // counters (4 noise values each) per block

inline unsigned blocks(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

template <typename T>
__global__ void distances_kernel(const T* __restrict__ ut, const T* __restrict__ v, T* __restrict__ d, int64_t B,
                                 int64_t C, int64_t N, int64_t E, T eps) {
  __shared__ T su[kTile][kTile + 1];  // [n][b]
  __shared__ T sv[kTile][kTile + 1];  // [c][n]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kTile, c0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t e = blockIdx.z, b = b0 + tx, c = c0 + ty;
  T acc = T(0);
  for (int64_t n0 = 0; n0 < N; n0 += kTile) {
    // Coalesced loads (consecutive tx read consecutive addresses); zeros pad both tiles.
    su[ty][tx] = (n0 + ty < N && b < B) ? ut[(e * N + n0 + ty) * B + b] : T(0);
    sv[ty][tx] = (c0 + ty < C && n0 + tx < N) ? v[(e * C + c0 + ty) * N + n0 + tx] : T(0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      const T z = su[k][tx] - sv[ty][k];
      acc += z * z;
    }
    __syncthreads();
  }
  if (b < B && c < C) d[(b * E + e) * C + c] = sqrt(acc + eps);
}

// w = scale * grad / d for pair (b, e, c), 0 where d = 0 and outside the problem.
template <typename T>
__device__ inline T weight(const T* __restrict__ g, const T* __restrict__ d, int64_t b, int64_t e, int64_t c,
                           int64_t B, int64_t E, int64_t C, T scale) {
  if (b >= B || c >= C) return T(0);
  const int64_t i = (b * E + e) * C + c;
  const T dd = d[i];
  return dd == T(0) ? T(0) : scale * g[i] / dd;
}

template <typename T>
__global__ void distances_backward_kernel(const T* __restrict__ ut, const T* __restrict__ v,
                                          const T* __restrict__ g, const T* __restrict__ d, T* __restrict__ dut,
                                          T* __restrict__ dv, int64_t B, int64_t C, int64_t N, int64_t E, T scale,
                                          int64_t tiles_b) {
  __shared__ T sw[kTile][kTile + 1];  // w [c][b]
  __shared__ T sx[kTile][kTile + 1];  // the other operand's tile
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t e = blockIdx.z;
  if (static_cast<int64_t>(blockIdx.x) < tiles_b) {
    // dut[e, n, b] for n = n0 + ty, b = b0 + tx: sum over c of w[b, c] (ut[n, b] - v[c, n])
    const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kTile, n0 = static_cast<int64_t>(blockIdx.y) * kTile;
    const int64_t b = b0 + tx, n = n0 + ty;
    const T u = (b < B && n < N) ? ut[(e * N + n) * B + b] : T(0);
    T acc = T(0);
    for (int64_t c0 = 0; c0 < C; c0 += kTile) {
      sw[ty][tx] = weight(g, d, b, e, c0 + ty, B, E, C, scale);
      sx[ty][tx] = (c0 + ty < C && n0 + tx < N) ? v[(e * C + c0 + ty) * N + n0 + tx] : T(0);  // [c][n]
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kTile; ++k) acc += sw[k][tx] * (u - sx[k][ty]);
      __syncthreads();
    }
    if (b < B && n < N) dut[(e * N + n) * B + b] = acc;
  } else {
    // dv[e, c, n] for c = c0 + ty, n = n0 + tx: -sum over b of w[b, c] (ut[n, b] - v[c, n])
    const int64_t c0 = (static_cast<int64_t>(blockIdx.x) - tiles_b) * kTile;
    const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTile;
    const int64_t c = c0 + ty, n = n0 + tx;
    const T vv = (c < C && n < N) ? v[(e * C + c) * N + n] : T(0);
    T acc = T(0);
    for (int64_t b0 = 0; b0 < B; b0 += kTile) {
      sw[ty][tx] = weight(g, d, b0 + tx, e, c0 + ty, B, E, C, scale);
      sx[ty][tx] = (n0 + ty < N && b0 + tx < B) ? ut[(e * N + n0 + ty) * B + b0 + tx] : T(0);  // [n][b]
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kTile; ++k) acc -= sw[ty][k] * (sx[tx][k] - vv);
      __syncthreads();
    }
    if (c < C && n < N) dv[(e * C + c) * N + n] = acc;
  }
}

// F + sigma z with one rounding per operation: nvcc would contract it into an FMA (one rounding),
// while the CPU and Triton paths round the product and the sum separately, and the docs promise
// the same perturbed factors on every backend.
__device__ inline float perturbed(float f, float sigma, float z) { return __fadd_rn(f, __fmul_rn(sigma, z)); }
__device__ inline double perturbed(double f, double sigma, double z) { return __dadd_rn(f, __dmul_rn(sigma, z)); }

// out[i] = F[i] + sigma z[base + i] (F given) or z[base + i], i < M; thread j owns counter
// (base >> 2) + j, i.e. noise indices 4 q .. 4 q + 3.
template <typename T>
__global__ void noise_kernel(const T* __restrict__ F, T* __restrict__ out, uint64_t seed, int64_t base, int64_t M,
                             T sigma, int64_t counters) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= counters) return;
  const int64_t q = (base >> 2) + j;
  float z[4];
  normal4(seed, static_cast<uint64_t>(q), z);
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const int64_t i = 4 * q + l - base;
    if (i >= 0 && i < M) out[i] = F != nullptr ? perturbed(F[i], sigma, static_cast<T>(z[l])) : static_cast<T>(z[l]);
  }
}

template <typename T>
void launch_noise(const T* F, T* out, int64_t seed, int64_t base, int64_t M, double sigma) {
  if (M == 0) return;
  const int64_t counters = ((base + M - 1) >> 2) - (base >> 2) + 1;
  noise_kernel<T><<<blocks(counters, kNoiseThreads), kNoiseThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      F, out, static_cast<uint64_t>(seed), base, M, static_cast<T>(sigma), counters);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_distances(const at::Tensor& ut, const at::Tensor& v, at::Tensor& d, double eps) {
  const int64_t E = ut.size(0), N = ut.size(1), B = ut.size(2), C = v.size(1);
  TORCH_CHECK(blocks(C, kTile) <= 65535u && E <= 65535, "mahalanobis (cuda): C = ", C, " and E = ", E,
              " must be at most ", 65535 * kTile, " and 65535");
  const dim3 grid(blocks(B, kTile), blocks(C, kTile), static_cast<unsigned>(E)), block(kTile, kTile);
  AT_DISPATCH_FLOATING_TYPES(ut.scalar_type(), "mahalanobis_distances_cuda", [&] {
    distances_kernel<scalar_t><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ut.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), d.mutable_data_ptr<scalar_t>(), B, C, N, E,
        static_cast<scalar_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The kernel for every pair, then the close pairs again from the difference (mahalanobis.h);
// finding them costs one host synchronisation (at::nonzero).
void distances_cuda(const at::Tensor& ut, const at::Tensor& v, const Points& p, at::Tensor& d, double eps,
                    double scale, bool accumulate) {
  const c10::cuda::CUDAGuard guard(ut.device());
  at::Tensor dt = accumulate ? at::empty_like(d) : d;
  launch_distances(ut, v, dt, eps);
  refine_distances(close_pairs(ut, v, p, dt.square() - eps), dt, eps);
  if (accumulate) d.add_(dt, scale);
}

void distances_backward_cuda(const at::Tensor& ut, const at::Tensor& v, const Points& p, const at::Tensor& grad,
                             const at::Tensor& d, double scale, at::Tensor& dut, at::Tensor& dv) {
  const int64_t E = ut.size(0), N = ut.size(1), B = ut.size(2), C = v.size(1);
  const int64_t tiles_b = dut.defined() ? blocks(B, kTile) : 0, tiles_c = dv.defined() ? blocks(C, kTile) : 0;
  if (tiles_b + tiles_c == 0) return;
  TORCH_CHECK(blocks(N, kTile) <= 65535u && E <= 65535, "mahalanobis_backward (cuda): N = ", N, " and E = ", E,
              " must be at most ", 65535 * kTile, " and 65535");
  const c10::cuda::CUDAGuard guard(ut.device());
  const Close close = close_pairs(ut, v, p, d.square());
  const at::Tensor g = far_grad(close, grad);
  const dim3 grid(static_cast<unsigned>(tiles_b + tiles_c), blocks(N, kTile), static_cast<unsigned>(E));
  const dim3 block(kTile, kTile);
  AT_DISPATCH_FLOATING_TYPES(ut.scalar_type(), "mahalanobis_distances_backward_cuda", [&] {
    distances_backward_kernel<scalar_t><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ut.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
        d.const_data_ptr<scalar_t>(), dut.defined() ? dut.mutable_data_ptr<scalar_t>() : nullptr,
        dv.defined() ? dv.mutable_data_ptr<scalar_t>() : nullptr, B, C, N, E, static_cast<scalar_t>(scale),
        tiles_b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  add_close_terms(close, grad, d, scale, dut, dv);
}

void perturb_cuda(const at::Tensor& F, int64_t seed, int64_t t, double sigma, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(F.device());
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "mahalanobis_perturb_cuda", [&] {
    launch_noise<scalar_t>(F.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), seed, t * F.numel(),
                           F.numel(), sigma);
  });
}

const Kernels kCuda{&distances_cuda, &distances_backward_cuda, &perturb_cuda, at::kCUDA};
using Ops = Entries<kCuda, c10::cuda::CUDAGuard>;

at::Tensor noise_cuda(const at::Tensor& like, int64_t seed, at::IntArrayRef shape) {
  TORCH_CHECK(seed >= 0, "mahalanobis_noise: seed must be >= 0, got ", seed);
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty(shape, like.options().dtype(at::kFloat));
  launch_noise<float>(nullptr, out.mutable_data_ptr<float>(), seed, 0, out.numel(), 0.0);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyens_C, CUDA, m) {
  Ops::impl(m, &noise_cuda);
}

}  // namespace maha
}  // namespace pyens
