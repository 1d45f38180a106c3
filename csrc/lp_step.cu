// CUDA kernels of the lp step family: steepest direction V_p(g), projection onto the lp
// ball ∩ box, and the fused PGD step delta' = Π(delta + alpha V_p(g)) of MAT eq. (6), for
// all M members of a MIMO ensemble in one launch (row r uses member r % M).
//
// One thread block owns one row. A row is small (784 to ~150k values), so it is kept on
// chip: the values the later passes need are staged in dynamic shared memory when they fit
// (the global-memory fallback recomputes them from the L2-resident inputs instead), and
// every row-wide quantity (norms, counts, masses) is a block reduction. There is no sort:
// the l1 top-k threshold is a bisection on the IEEE bit pattern of |g| and the ball ∩ box
// thresholds are bisections followed by an exact closed-form finish. The ground truth is
// pyens/reference/lp_step.py::lp_rows; formulas below follow it.

// torch wheels built without CUDA ship c10/cuda's headers but not the CMake-generated
// c10/cuda/impl/cuda_cmake_macros.h (it only carries the Windows DLL-export switch); skip it
// there, as ROCm builds do, so that this file also compiles against a CPU wheel's headers.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif

// torch 2.13's headers use one C++20 feature (default bit-field initialisers, in
// c10/core/AutogradState.h) and torch's CMake config asks for C++20. Built as C++17, both
// nvcc's front end and the host compiler accept it as an extension but warn; silence just
// that diagnostic, just for the includes.
#if __cplusplus < 202002L
#pragma nv_diag_suppress 3306
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpragmas"
#pragma GCC diagnostic ignored "-Wc++20-extensions"
#endif

#include "lp_step.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10::cuda::getCurrentCUDAStream is the function at::cuda re-exports; ATen/cuda/CUDAContext.h
// is not included because it pulls in the cuBLAS/cuSPARSE headers, which a bare CUDA
// toolkit (runtime and nvcc only) lacks, and this file needs nothing else from it.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstdint>
#include <tuple>

#if __cplusplus < 202002L
#pragma GCC diagnostic pop
#pragma nv_diag_default 3306
#endif

namespace pyens {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;
constexpr unsigned kFullMask = 0xffffffffu;
// Target elements per thread when sizing the block: enough work per thread to hide the
// latency of each reduction, few enough that short rows still use several warps.
constexpr int kItemsPerThread = 16;

// Per accumulation type: the unsigned image of |v| used by the top-k bisection (monotone in
// |v| for non-negative floats, NaN above +inf), and the iteration cap of the threshold
// bisections (enough to shrink [0, 1] below the type's resolution; the loops also stop as
// soon as the bracket holds two adjacent values, which is where they converge anyway).
template <typename T>
struct AccTraits;

template <>
struct AccTraits<float> {
  using key_t = uint32_t;
  static constexpr int kBisect = 40;
  static constexpr key_t kKeyEnd = 0x80000000u;  // one past every |v| pattern
  static constexpr float kTiny = FLT_MIN;
  __device__ static __forceinline__ key_t key(float v) { return __float_as_uint(v) & 0x7fffffffu; }
  __device__ static __forceinline__ float inf() { return __int_as_float(0x7f800000); }
  __device__ static __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
};

template <>
struct AccTraits<double> {
  using key_t = uint64_t;
  static constexpr int kBisect = 64;
  static constexpr key_t kKeyEnd = 0x8000000000000000ull;
  static constexpr double kTiny = DBL_MIN;
  __device__ static __forceinline__ key_t key(double v) {
    return static_cast<key_t>(__double_as_longlong(v)) & 0x7fffffffffffffffull;
  }
  __device__ static __forceinline__ double inf() { return __longlong_as_double(0x7ff0000000000000ll); }
  __device__ static __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
};

// torch.sign semantics: sign(0) = 0.
template <typename T>
__device__ __forceinline__ T sgn(T v) {
  return v > T(0) ? T(1) : (v < T(0) ? T(-1) : T(0));
}
template <typename T>
__device__ __forceinline__ T min2(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
__device__ __forceinline__ T max2(T a, T b) {
  return b > a ? b : a;
}
// torch.clamp(v, a, b) = min(max(v, a), b).
template <typename T>
__device__ __forceinline__ T clampv(T v, T a, T b) {
  return min2(max2(v, a), b);
}

// ---------------------------------------------------------------------------------------
// Block reductions. Every thread receives the result, bit-identical across the block (the
// xor butterfly is order-symmetric and every warp reduces the same partials in the same
// order), so the data-dependent control flow built on them (bisection branches, early
// exits) is uniform and every __syncthreads() is reached by all threads.

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
// fmax is symmetric in a NaN operand (it returns the other one), which keeps the all-lanes
// result identical even on non-finite input (flagged to the caller, but must not hang).
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_all_reduce(T v, Op op) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ int warp_all_sum(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return static_cast<int>(__reduce_add_sync(kFullMask, static_cast<unsigned>(v)));
#else
  return warp_all_reduce(v, SumOp{});
#endif
}

// Two scratch buffers used alternately make one __syncthreads() per reduction enough: a
// buffer is rewritten two reductions later, after the barrier of the reduction in between,
// which every reader of its previous contents has already passed. The parity therefore
// lives for the whole kernel (across rows), never reset.
template <typename T>
struct BlockReduce {
  T* buf;  // [2][2 * kWarp]
  int parity;

  template <typename OpA, typename OpB>
  __device__ __forceinline__ void pair(T& a, T& b, OpA opa, OpB opb, T ida, T idb) {
    const int lane = threadIdx.x & (kWarp - 1), wid = threadIdx.x / kWarp;
    const int nwarps = blockDim.x / kWarp;
    a = warp_all_reduce(a, opa);
    b = warp_all_reduce(b, opb);
    T* s = buf + parity * (2 * kWarp);
    parity ^= 1;
    if (lane == 0) {
      s[wid] = a;
      s[kWarp + wid] = b;
    }
    __syncthreads();
    a = warp_all_reduce(lane < nwarps ? s[lane] : ida, opa);
    b = warp_all_reduce(lane < nwarps ? s[kWarp + lane] : idb, opb);
  }

  __device__ __forceinline__ T sum(T v) {
    const int lane = threadIdx.x & (kWarp - 1), wid = threadIdx.x / kWarp;
    const int nwarps = blockDim.x / kWarp;
    v = warp_all_reduce(v, SumOp{});
    T* s = buf + parity * (2 * kWarp);
    parity ^= 1;
    if (lane == 0) s[wid] = v;
    __syncthreads();
    return warp_all_reduce(lane < nwarps ? s[lane] : T(0), SumOp{});
  }
};

struct BlockCount {
  int* buf;  // [2][kWarp]
  int parity;

  __device__ __forceinline__ int sum(int v) {
    const int lane = threadIdx.x & (kWarp - 1), wid = threadIdx.x / kWarp;
    const int nwarps = blockDim.x / kWarp;
    v = warp_all_sum(v);
    int* s = buf + parity * kWarp;
    parity ^= 1;
    if (lane == 0) s[wid] = v;
    __syncthreads();
    return warp_all_sum(lane < nwarps ? s[lane] : 0);
  }
};

// ---------------------------------------------------------------------------------------
// One row. Element i of the row is always handled by thread i % blockDim.x, in every pass,
// so the staged shared-memory arrays are private per thread (written and read by the same
// thread) and need no barrier; only the reductions and the tie scan synchronise.
template <typename scalar_t, typename acc_t, bool kSmem>
struct RowOp {
  using Tr = AccTraits<acc_t>;
  using key_t = typename Tr::key_t;

  const scalar_t* __restrict__ d;
  const scalar_t* __restrict__ g;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ o;
  acc_t* sy;  // staged delta, then y = delta + alpha v (modes 0, 2)
  acc_t* sx;  // staged x (modes 0, 2)
  acc_t* sg;  // staged g (l2) or the movable part of g (l1) (modes 1, 2)
  BlockReduce<acc_t>& red;
  BlockCount& cnt;
  int* s_wtie;  // [kWarp] per-warp tie counts of the tie scan
  int* s_cut;
  int n, mode, norm, k;
  bool exact;
  acc_t lo, hi, eps, alpha;
  // Direction state, fixed once per row before the projection.
  acc_t nrm = acc_t(1);  // l2: max(||g||_2, 1e-12)
  acc_t ks = acc_t(1);   // l1: max(min(k, #movable), 1)
  key_t tau = 1;         // l1: chosen iff key > tau, or key == tau and index < cut
  int cut = 0;

  __device__ __forceinline__ acc_t ld(const scalar_t* p, int i) const {
    return static_cast<acc_t>(p[i]);
  }
  __device__ __forceinline__ void st(int i, acc_t v) const { o[i] = static_cast<scalar_t>(v); }
  // Room a = min(lo - x, 0) <= 0 <= b = max(hi - x, 0): for x outside the box z = 0 stays
  // admissible instead of the box becoming empty.
  __device__ __forceinline__ acc_t room_lo(acc_t xv) const { return min2(lo - xv, acc_t(0)); }
  __device__ __forceinline__ acc_t room_hi(acc_t xv) const { return max2(hi - xv, acc_t(0)); }
  // delta + alpha * v with the product rounded on its own, as the reference evaluates it:
  // a contracted fma could move y by an ulp and flip the l1 movability test of a later step.
  __device__ __forceinline__ acc_t step(acc_t dv, acc_t v) const {
    return dv + Tr::mul_rn(alpha, v);
  }
  __device__ __forceinline__ int nonfinite(acc_t dv, acc_t gv, acc_t xv) const {
    int bad = isfinite(dv) ? 0 : kBadDelta;
    if (mode != kProject && !isfinite(gv)) bad |= kBadGrad;
    if (!isfinite(xv)) bad |= kBadX;
    return bad;
  }

  // g where the l1 direction may move coordinate i, else 0: a zero gradient never moves, and
  // a coordinate of x + delta already at a bound is not pushed further out (the mask uses
  // x + delta, not the clean x).
  __device__ __forceinline__ acc_t movable_grad(acc_t gv, acc_t xv, acc_t dv) const {
    const acc_t pv = xv + dv;
    const bool mov = gv != acc_t(0) && !(pv >= hi && gv > acc_t(0)) && !(pv <= lo && gv < acc_t(0));
    return mov ? gv : acc_t(0);
  }
  __device__ __forceinline__ acc_t gm_at(int i) const {
    if constexpr (kSmem) {
      return sg[i];
    } else {
      return movable_grad(ld(g, i), ld(x, i), ld(d, i));
    }
  }
  __device__ __forceinline__ acc_t l1_dir(int i, acc_t gm) const {
    const key_t key = Tr::key(gm);
    const bool chosen = key != 0 && (key > tau || (key == tau && i < cut));
    return chosen ? sgn(gm) / ks : acc_t(0);
  }
  // The vector to project and x at i (staged, or recomputed from the inputs in the fallback).
  __device__ __forceinline__ void yx_at(int i, acc_t& y, acc_t& xv) const {
    if constexpr (kSmem) {
      y = sy[i];
      xv = sx[i];
    } else {
      xv = ld(x, i);
      const acc_t dv = ld(d, i);
      if (mode == kProject) {
        y = dv;
        return;
      }
      const acc_t gv = ld(g, i);
      y = step(dv, norm == kL2 ? gv / nrm : l1_dir(i, movable_grad(gv, xv, dv)));
    }
  }
  __device__ __forceinline__ void write_zero() const {
    for (int i = threadIdx.x; i < n; i += blockDim.x) st(i, acc_t(0));
  }

  // ---- linf: a single pass over global memory.
  __device__ int linf() const {
    int bad = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const acc_t dv = ld(d, i), xv = ld(x, i);
      const acc_t gv = mode != kProject ? ld(g, i) : acc_t(0);
      bad |= nonfinite(dv, gv, xv);
      if (mode == kDirection) {
        st(i, sgn(gv));
      } else {
        const acc_t y = mode == kStep ? step(dv, sgn(gv)) : dv;
        const acc_t lower = max2(-eps, room_lo(xv)), upper = min2(eps, room_hi(xv));
        st(i, min2(max2(y, lower), upper));
      }
    }
    return bad;
  }

  // ---- l2.
  __device__ int l2() {
    int bad = 0;
    acc_t g2 = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const acc_t dv = ld(d, i), xv = ld(x, i);
      const acc_t gv = mode != kProject ? ld(g, i) : acc_t(0);
      bad |= nonfinite(dv, gv, xv);
      g2 += gv * gv;
      if constexpr (kSmem) {
        if (mode != kDirection) {
          sy[i] = dv;
          sx[i] = xv;
        }
        if (mode != kProject) sg[i] = gv;
      }
    }
    if (mode != kProject) {
      // V_2(g) = g / max(||g||_2, 1e-12): a zero gradient gives a zero direction, not NaN.
      nrm = max2(sqrt(red.sum(g2)), acc_t(1e-12));
      if (mode == kDirection) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
          acc_t gv;
          if constexpr (kSmem) {
            gv = sg[i];
          } else {
            gv = ld(g, i);
          }
          st(i, gv / nrm);
        }
        return bad;
      }
      if constexpr (kSmem) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) sy[i] = step(sy[i], sg[i] / nrm);
      }
    }
    if (exact)
      project_l2_exact();
    else
      project_l2_sequential();
    return bad;
  }

  // Ball first, then the box clamp (torchattacks / MSD convention).
  __device__ void project_l2_sequential() {
    acc_t y2 = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      acc_t y, xv;
      yx_at(i, y, xv);
      y2 += y * y;
    }
    const acc_t ny = sqrt(red.sum(y2));
    const acc_t scale = ny > eps ? eps / max2(ny, Tr::kTiny) : acc_t(1);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      acc_t y, xv;
      yx_at(i, y, xv);
      st(i, clampv(y * scale, room_lo(xv), room_hi(xv)));
    }
  }

  // Exact projection onto {||z||_2 <= eps} ∩ {a <= z <= b}: z = clamp(t y, a, b) with the
  // largest t in [0, 1] such that F(t) = ||clamp(t y, a, b)||^2 <= eps^2 (the KKT point of
  // the box-constrained ball projection, t = 1 / (1 + mu)). F is non-decreasing, so t is
  // bracketed by bisection; on the final bracket every coordinate is either free (t y_i) or
  // at its bound c_i, F(t) = t^2 S + C, and t = sqrt((eps^2 - C) / S) solves it exactly.
  __device__ void project_l2_exact() {
    if (!(eps > acc_t(0))) {
      write_zero();
      return;
    }
    const acc_t e2 = eps * eps;
    acc_t c2 = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      acc_t y, xv;
      yx_at(i, y, xv);
      const acc_t c = clampv(y, room_lo(xv), room_hi(xv));
      c2 += c * c;
    }
    if (red.sum(c2) <= e2) {  // already inside ball ∩ box after the box clamp: t = 1
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        acc_t y, xv;
        yx_at(i, y, xv);
        st(i, clampv(y, room_lo(xv), room_hi(xv)));
      }
      return;
    }
    // F(t) = ||clamp(t y, a, b)||^2, reduced over the block (every thread gets the value).
    auto clamped_sq = [&](acc_t t) {
      acc_t s = 0;
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        acc_t y, xv;
        yx_at(i, y, xv);
        const acc_t z = clampv(t * y, room_lo(xv), room_hi(xv));
        s += z * z;
      }
      return red.sum(s);
    };
    // Invariant: F(tl) <= eps^2 < F(th) (F(0) = 0; F(1) > eps^2 as the row is outside).
    acc_t tl = 0, th = 1;
    for (int it = 0; it < Tr::kBisect; ++it) {
      const acc_t mid = acc_t(0.5) * (tl + th);
      if (mid <= tl || mid >= th) break;  // adjacent values: nothing left to halve
      if (clamped_sq(mid) <= e2)
        tl = mid;
      else
        th = mid;
    }
    const acc_t mid = acc_t(0.5) * (tl + th);
    acc_t fs = 0, fc = 0;  // S: sum y^2 over free coordinates; C: sum c^2 over clamped ones
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      acc_t y, xv;
      yx_at(i, y, xv);
      const acc_t a = room_lo(xv), b = room_hi(xv), my = mid * y;
      if (my > a && my < b) {
        fs += y * y;
      } else {
        const acc_t c = clampv(my, a, b);
        fc += c * c;
      }
    }
    red.pair(fs, fc, SumOp{}, SumOp{}, acc_t(0), acc_t(0));
    acc_t t = tl;
    if (fs > acc_t(0)) {
      t = sqrt(max2(e2 - fc, acc_t(0)) / max2(fs, Tr::kTiny));
      t = min2(max2(t, tl), th);
      if (t != tl) {
        // Rounding in the closed form must not leave the ball: keep tl (feasible) then.
        if (!(clamped_sq(t) <= e2)) t = tl;
      }
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      acc_t y, xv;
      yx_at(i, y, xv);
      st(i, clampv(t * y, room_lo(xv), room_hi(xv)));
    }
  }

  // ---- l1.
  __device__ int l1() {
    int bad = 0, movable = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const acc_t dv = ld(d, i), xv = ld(x, i);
      const acc_t gv = mode != kProject ? ld(g, i) : acc_t(0);
      bad |= nonfinite(dv, gv, xv);
      if (mode != kProject) {
        const acc_t gm = movable_grad(gv, xv, dv);
        movable += Tr::key(gm) != 0;
        if constexpr (kSmem) sg[i] = gm;
      }
      if constexpr (kSmem) {
        if (mode != kDirection) {
          sy[i] = dv;
          sx[i] = xv;
        }
      }
    }
    if (mode != kProject) {
      select_top_k(cnt.sum(movable));
      if (mode == kDirection) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) st(i, l1_dir(i, gm_at(i)));
        return bad;
      }
      if constexpr (kSmem) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) sy[i] = step(sy[i], l1_dir(i, sg[i]));
      }
    }
    project_l1();
    return bad;
  }

  // Sparse l1 steepest direction (MSD; MAT with k = 20): the ks = min(k, #movable) movable
  // coordinates of largest |g|, ties to the lowest index, each moved sign(g) / ks. The k-th
  // largest |g| is found exactly, without sorting, by bisection on its IEEE bit pattern
  // (the pattern of a non-negative float is monotone in its value): the largest key T with
  // #{key >= T} >= ks. Ties at T are then taken in index order by an exclusive prefix count
  // of the tie mask, which yields the index `cut` before which they are chosen.
  __device__ void select_top_k(int total) {
    const int kk = min(total, k);
    ks = static_cast<acc_t>(max(kk, 1));
    cut = n;
    tau = 1;  // key >= 1 <=> movable: with total <= k every movable coordinate is chosen
    if (total <= k) return;
    key_t lo_k = 1, hi_k = Tr::kKeyEnd;  // #{key >= lo_k} >= kk > #{key >= hi_k}
    int c_lo = total, c_hi = 0;
    while (hi_k - lo_k > 1) {
      const key_t mid = lo_k + (hi_k - lo_k) / 2;
      int c = 0;
      for (int i = threadIdx.x; i < n; i += blockDim.x) c += Tr::key(gm_at(i)) >= mid;
      c = cnt.sum(c);
      if (c >= kk) {
        lo_k = mid;
        c_lo = c;
        if (c == kk) break;  // {key >= mid} is exactly the chosen set
      } else {
        hi_k = mid;
        c_hi = c;
      }
    }
    tau = lo_k;
    if (c_lo == kk) return;
    // Here hi_k = tau + 1: c_hi keys lie above tau and c_lo - c_hi (more than need) equal it.
    const int need = kk - c_hi;
    const int lane = threadIdx.x & (kWarp - 1), wid = threadIdx.x / kWarp;
    const int nwarps = blockDim.x / kWarp;
    if (threadIdx.x == 0) *s_cut = n;  // ordered before any write below by the loop's barrier
    int running = 0;  // ties before the current tile
    for (int base = 0; base < n; base += blockDim.x) {
      const int i = base + threadIdx.x;
      const bool tie = i < n && Tr::key(gm_at(i)) == tau;
      const unsigned ballot = __ballot_sync(kFullMask, tie);
      const int in_warp = __popc(ballot & ((1u << lane) - 1u));
      __syncthreads();  // previous tile's readers of s_wtie are done
      if (lane == 0) s_wtie[wid] = __popc(ballot);
      __syncthreads();
      int before = 0, tile = 0;
      for (int w = 0; w < nwarps; ++w) {
        const int c = s_wtie[w];
        before += w < wid ? c : 0;
        tile += c;
      }
      if (tie && running + before + in_warp == need - 1) *s_cut = i + 1;  // the need-th tie
      running += tile;
      if (running >= need) break;  // uniform: `running` is a block-wide value
    }
    __syncthreads();
    cut = *s_cut;
  }

  // l1 projection. Exact (Croce & Hein 2021, "Mind the box", the projection onto the l1 ball
  // ∩ box): z_i = sign(y_i) min(max(|y_i| - lam, 0), r_i) with r_i the room along sign(y_i)
  // and the smallest lam >= 0 giving ||z||_1 <= eps. Sequential: the same with r = inf
  // (Duchi et al. 2008, projection onto the l1 ball), then the box clamp. The mass
  // f(lam) = sum min(max(u_i - lam, 0), r_i) is non-increasing and piecewise linear in lam:
  // bisection brackets the root, then on the bracket f = C + sum_linear u_i - cnt * lam,
  // so lam = (C + sum u - eps) / cnt exactly. Rows inside ball ∩ box are left unchanged.
  __device__ void project_l1() {
    const bool boxed = exact;
    const acc_t inf = Tr::inf();
    acc_t mass = 0, umax = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      acc_t y, xv;
      yx_at(i, y, xv);
      const acc_t u = fabs(y);
      const acc_t r = boxed ? (y >= acc_t(0) ? room_hi(xv) : -room_lo(xv)) : inf;
      mass += min2(u, r);
      umax = max2(umax, u);
    }
    red.pair(mass, umax, SumOp{}, MaxOp{}, acc_t(0), acc_t(0));
    if (mass <= eps) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        acc_t y, xv;
        yx_at(i, y, xv);
        const acc_t a = room_lo(xv), b = room_hi(xv);
        // boxed: sign(y) min(|y|, r) is the box clamp of y.
        st(i, clampv(y, a, b));
      }
      return;
    }
    if (!(eps > acc_t(0))) {
      write_zero();
      return;
    }
    // Invariant: f(ll) > eps >= f(lh) (f(0) = mass > eps; f(max |y|) = 0).
    acc_t ll = 0, lh = umax;
    for (int it = 0; it < Tr::kBisect; ++it) {
      const acc_t mid = acc_t(0.5) * (ll + lh);
      if (mid <= ll || mid >= lh) break;
      acc_t f = 0;
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        acc_t y, xv;
        yx_at(i, y, xv);
        const acc_t r = boxed ? (y >= acc_t(0) ? room_hi(xv) : -room_lo(xv)) : inf;
        f += min2(max2(fabs(y) - mid, acc_t(0)), r);
      }
      if (red.sum(f) <= eps)
        lh = mid;
      else
        ll = mid;
    }
    const acc_t mid = acc_t(0.5) * (ll + lh);
    acc_t fc = 0, lin = 0;  // C + sum of u over linear pieces; number of linear pieces
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      acc_t y, xv;
      yx_at(i, y, xv);
      const acc_t u = fabs(y);
      const acc_t r = boxed ? (y >= acc_t(0) ? room_hi(xv) : -room_lo(xv)) : inf;
      const acc_t dm = u - mid;
      if (dm > acc_t(0) && dm < r) {
        fc += u;
        lin += acc_t(1);
      } else {
        fc += min2(max2(dm, acc_t(0)), r);
      }
    }
    red.pair(fc, lin, SumOp{}, SumOp{}, acc_t(0), acc_t(0));
    acc_t lam = lh;
    if (lin > acc_t(0)) {
      lam = min2(max2((fc - eps) / lin, ll), lh);
      if (lam != lh) {
        // Rounding in the closed form must not leave the ball: keep lh (feasible) then.
        acc_t f = 0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
          acc_t y, xv;
          yx_at(i, y, xv);
          const acc_t r = boxed ? (y >= acc_t(0) ? room_hi(xv) : -room_lo(xv)) : inf;
          f += min2(max2(fabs(y) - lam, acc_t(0)), r);
        }
        if (!(red.sum(f) <= eps)) lam = lh;
      }
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      acc_t y, xv;
      yx_at(i, y, xv);
      const acc_t a = room_lo(xv), b = room_hi(xv);
      const acc_t shrunk = sgn(y) * max2(fabs(y) - lam, acc_t(0));
      // boxed: sign(y) min(shrunk magnitude, r) is the box clamp of the shrunk value.
      st(i, clampv(shrunk, a, b));
    }
  }
};

// Fused lp step of MAT (eq. 6, Algorithm 1): per row r (member m = r % p.members),
//   mode 0: out = Π_m(delta),  mode 1: out = V_m(g),  mode 2: out = Π_m(delta + alpha_m V_m(g)),
// with V the steepest ascent direction of the member's norm (linf sign(g); l2 g / ||g||;
// l1 the sparse top-k direction) and Π the projection onto {||z|| <= eps_m} ∩ box (exact:
// Croce & Hein 2021 for l1; otherwise ball then clamp, Duchi et al. 2008 for the l1 ball).
// Grid-stride over rows, one block per row. kSmem: the row's staged values live in dynamic
// shared memory (sized by the host for the mode); otherwise they are recomputed from global
// memory on every pass. flags collects which inputs hold a NaN or an infinity.
template <typename scalar_t, typename acc_t, bool kSmem>
__global__ void __launch_bounds__(kMaxThreads)
    lp_rows_kernel(const __grid_constant__ LpParams p, const scalar_t* __restrict__ delta,
                   const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                   scalar_t* __restrict__ out, int* __restrict__ flags, int64_t rows, int n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t s_red[2 * 2 * kWarp];
  __shared__ int s_cnt[2 * kWarp];
  __shared__ int s_wtie[kWarp];
  __shared__ int s_cut;

  acc_t* const s0 = reinterpret_cast<acc_t*>(smem_raw);
  // Slots: modes 0 and 2 stage delta/y and x first; the gradient goes after them (mode 2)
  // or alone (mode 1). The host sizes the allocation to match.
  acc_t* const sy = s0;
  acc_t* const sx = s0 + n;
  acc_t* const sg = p.mode == kDirection ? s0 : s0 + 2 * static_cast<int64_t>(n);

  BlockReduce<acc_t> red{s_red, 0};
  BlockCount cnt{s_cnt, 0};
  int bad = 0;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int m = static_cast<int>(row % p.members);
    const int64_t off = row * n;
    RowOp<scalar_t, acc_t, kSmem> op{delta + off, grad + off, x + off, out + off, sy, sx, sg,
                                     red, cnt, s_wtie, &s_cut};
    op.n = n;
    op.mode = p.mode;
    op.norm = p.norm[m];
    op.k = p.k[m];
    op.exact = p.exact;
    // The reference casts the scalars to the accumulation dtype before using them.
    op.lo = static_cast<acc_t>(p.lo);
    op.hi = static_cast<acc_t>(p.hi);
    op.eps = static_cast<acc_t>(p.eps[m]);
    op.alpha = static_cast<acc_t>(p.alpha[m]);
    if (op.norm == kLinf)
      bad |= op.linf();
    else if (op.norm == kL2)
      bad |= op.l2();
    else
      bad |= op.l1();
  }
  // One atomic per warp at most, and only when something was non-finite.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  bad = static_cast<int>(__reduce_or_sync(kFullMask, static_cast<unsigned>(bad)));
#else
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) bad |= __shfl_xor_sync(kFullMask, bad, o);
#endif
  if ((threadIdx.x & (kWarp - 1)) == 0 && bad != 0) atomicOr(flags, bad);
}

// Block size: a power of two with about kItemsPerThread elements per thread, 32..512.
int threads_for(int64_t n) {
  int t = kWarp;
  while (t < kMaxThreads && static_cast<int64_t>(t) * kItemsPerThread < n) t *= 2;
  return t;
}

// Number of n-long staged arrays the kernel uses for this mode (0 when every member is linf,
// which runs in one pass and stages nothing).
int staged_slots(const LpParams& p) {
  bool any = false;
  for (int i = 0; i < p.members; ++i) any = any || p.norm[i] != kLinf;
  if (!any) return 0;
  return p.mode == kProject ? 2 : (p.mode == kDirection ? 1 : 3);
}

template <typename scalar_t>
void launch_lp_rows(const LpParams& p, const at::Tensor& d, const at::Tensor& g, const at::Tensor& x,
                    at::Tensor& out, at::Tensor& flags) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0);
  const int n = static_cast<int>(x.size(1));
  const int threads = threads_for(n);
  const int64_t grid = std::min<int64_t>(rows, INT_MAX);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* dp = d.const_data_ptr<scalar_t>();
  // Mode 0 never reads grad (which need not be made contiguous then).
  const scalar_t* gp = p.mode == kProject ? dp : g.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  int* fp = flags.mutable_data_ptr<int>();

  const size_t bytes = static_cast<size_t>(staged_slots(p)) * static_cast<size_t>(n) * sizeof(acc_t);
  if (bytes > 0) {
    auto* kernel = &lp_rows_kernel<scalar_t, acc_t, true>;
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          static_cast<int>(x.get_device())));
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    const size_t optin_bytes = static_cast<size_t>(optin);
    const size_t limit =
        optin_bytes > attr.sharedSizeBytes ? optin_bytes - attr.sharedSizeBytes : 0;
    if (bytes <= limit) {
      // The launch takes at most maxDynamicSharedSizeBytes of dynamic memory: by default 48 KiB
      // less the kernel's static arrays (s_red, s_cnt: ~0.9 KB for float, ~1.4 KB for double),
      // so comparing with 48 KiB alone made rows just under it fail at launch.
      if (bytes > static_cast<size_t>(attr.maxDynamicSharedSizeBytes)) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(bytes)));
      }
      kernel<<<static_cast<unsigned>(grid), threads, bytes, stream>>>(p, dp, gp, xp, op, fp, rows, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  // Linf only, or a row too long for shared memory: stream the (L2-resident) row instead.
  lp_rows_kernel<scalar_t, acc_t, false>
      <<<static_cast<unsigned>(grid), threads, 0, stream>>>(p, dp, gp, xp, op, fp, rows, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lp_rows_cuda(int64_t mode, const at::Tensor& delta,
                                                const at::Tensor& grad, const at::Tensor& x,
                                                at::IntArrayRef norms, at::ArrayRef<double> eps,
                                                at::ArrayRef<double> alpha, at::IntArrayRef k,
                                                double lo, double hi, bool exact) {
  check_lp_rows(delta, grad, x);
  TORCH_CHECK(x.is_cuda() && delta.is_cuda() && grad.is_cuda(),
              "lp_rows (cuda): delta, grad and x must be CUDA tensors, got ", delta.device(), ", ",
              grad.device(), ", ", x.device());
  const LpParams p = make_lp_params(mode, norms, eps, alpha, k, lo, hi, exact);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xx = x.contiguous();
  const at::Tensor d = delta.contiguous();
  const at::Tensor g = p.mode == kProject ? grad : grad.contiguous();
  at::Tensor out = at::empty_like(xx, at::MemoryFormat::Contiguous);
  at::Tensor flags = at::zeros({1}, xx.options().dtype(at::kInt));
  const int64_t rows = xx.size(0), n = xx.size(1);
  TORCH_CHECK(n <= INT_MAX - kMaxThreads, "lp_rows (cuda): rows of ", n,
              " values are too long (at most ", INT_MAX - kMaxThreads, ")");
  if (rows == 0 || n == 0) return {out, flags};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xx.scalar_type(), "lp_rows_cuda", [&] {
    launch_lp_rows<scalar_t>(p, d, g, xx, out, flags);
  });
  return {out, flags};
}

TORCH_LIBRARY_IMPL(pyens_C, CUDA, m) { m.impl("lp_rows", &lp_rows_cuda); }

}  // namespace pyens
