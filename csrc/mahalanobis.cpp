// CPU kernels of the Mahalanobis distance map (DML eq. 2) and its randomized version (eq. 5).
// The driver (mahalanobis.h) transforms the points, ut[e, :, b] = F_e x_b and
// v[e, c, :] = F_e c; the kernels here turn those into distances and back into (dut, dv):
//
// * N < kGemmMinN (the papers' MNIST/CIFAR DMLs, N = 10): the difference form
//   sum_n (ut[e, n, b] - v[e, c, n])^2, register-tiled over 32 columns b x 5 centers c and
//   vectorised over b (the layout [E, N, B] makes b contiguous); the transforms and the
//   gradient products are register-tiled loops too (MKL's per-call cost dominated here).
// * N >= kGemmMinN (RESISC-45's N = 45, feature-space DMLs): the expansion
//   ||u||^2 + ||v||^2 - 2 u.v with the cross term a GEMM (MKL, at::bmm) and a fused
//   epilogue; the backward's far-pair terms are two GEMMs. From kSplitMinN on, a tril factor's
//   products skip its zero upper-right block.
// * Both: every pair with ||u - v||^2 < kClose (||u||^2 + ||v||^2) is recomputed from the
//   input-space difference y = F_e (x_b - c), in the forward and in the backward (u and v are
//   rounded separately, so their difference, let alone the expansion, is inaccurate for pairs
//   that close in); the others then have a relative error of a few ulp (docs/mahalanobis.md).
//
// Work is spread over ATen's intra-op pool (at::parallel_for, OpenMP); the tile loops are
// compiled for AVX-512, AVX2+FMA and baseline x86-64 (target_clones) and the loader picks.
#include "mahalanobis.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <vector>

namespace pyens {
namespace maha {
namespace {

#if defined(__GNUC__)
#define MAHA_INLINE __attribute__((always_inline)) inline
#else
#define MAHA_INLINE inline
#endif
// Clones of the tile loops (each with its template inlined) for the ISAs the wheel may meet.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MAHA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MAHA_CLONES
#endif

constexpr int kB = 32;  // columns b per tile: the vectorised dimension
// centers (forward) or rows (dut, the small transforms) per tile: 5 x 2 x 16 floats is 10
// AVX-512 accumulators, and the papers' C = N = 10 splits into whole tiles (4 wasted 2 of 12).
constexpr int kC = 5;
constexpr int64_t kGemmMinN = 32;  // crossover of the two algorithms, measured at N = 10, 32, 45, 64

// at::parallel_for with chunks of at least kTaskWork multiply-adds: a small problem runs inline
// on the calling thread, where an OpenMP region would cost more than it saves (and, on a
// machine busy with other work, can wait a whole scheduler slice for its second thread).
constexpr int64_t kTaskWork = int64_t{1} << 18;
template <typename Fn>
void parallel(int64_t tasks, int64_t work_per_task, const Fn& fn) {
  at::parallel_for(0, tasks, std::max<int64_t>(1, kTaskWork / std::max<int64_t>(work_per_task, 1)), fn);
}

template <typename T>
struct Shape {  // ut [E, N, B], v [E, C, N], outputs [B, E, C]
  int64_t E, C, N, B;
  explicit Shape(const at::Tensor& ut, const at::Tensor& v)
      : E(ut.size(0)), C(v.size(1)), N(ut.size(1)), B(ut.size(2)) {}
  int64_t tiles_b() const { return (B + kB - 1) / kB; }
  int64_t out(int64_t b, int64_t e, int64_t c) const { return (b * E + e) * C + c; }
};

// ---------------------------------------------------------------------------------------------
// difference form

// acc[k][j] = sum_n (u[n * ldu + j] - rows[k][n])^2 for the first `width` columns j.
template <typename T, bool kFull>
MAHA_INLINE void diff_tile(const T* __restrict u, int64_t ldu, const T* const* rows, int64_t N, int width,
                           T (&out)[kC][kB]) {
  // In registers; `out` is memory the epilogue reads. The first feature initialises the sums:
  // zeroing first made the compiler clear `out` with a rep stos per tile.
  T acc[kC][kB];
  const int w = kFull ? kB : width;
  const bool first = kFull && N > 0;
  if (first) {
    for (int k = 0; k < kC; ++k) {
      const T r = rows[k][0];
#pragma omp simd
      for (int j = 0; j < kB; ++j) {
        const T z = u[j] - r;
        acc[k][j] = z * z;
      }
    }
  } else {
    for (int k = 0; k < kC; ++k)
      for (int j = 0; j < kB; ++j) acc[k][j] = T(0);
  }
  for (int64_t n = first ? 1 : 0; n < N; ++n) {
    const T* un = u + n * ldu;
    for (int k = 0; k < kC; ++k) {
      const T r = rows[k][n];
#pragma omp simd
      for (int j = 0; j < w; ++j) {
        const T z = un[j] - r;
        acc[k][j] += z * z;
      }
    }
  }
  for (int k = 0; k < kC; ++k)
#pragma omp simd
    for (int j = 0; j < kB; ++j) out[k][j] = acc[k][j];
}

template <typename T>
struct Pair {  // a close pair of one member (w: its backward weight)
  int64_t b, c;
  T w;
};
template <typename T>
using Pairs = std::vector<Pair<T>>;

template <typename T>
MAHA_INLINE void write_distance(T& o, T sq, T eps, T scale, bool accumulate) {
  const T r = std::sqrt(sq + eps);
  o = accumulate ? o + scale * r : r;
}

// Distances of the far pairs of tasks (e, b-tile); the close ones go to close[task].
template <typename T>
MAHA_INLINE void distance_tiles(const Shape<T>& s, const T* ut, const T* v, const T* nu, const T* nv, T* d,
                                int64_t begin, int64_t end, T eps, T scale, bool accumulate, Pairs<T>* close) {
  T acc[kC][kB];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t e = task / s.tiles_b(), b0 = (task % s.tiles_b()) * kB;
    const int nb = static_cast<int>(std::min<int64_t>(kB, s.B - b0));
    const T* u = ut + e * s.N * s.B + b0;
    for (int64_t c0 = 0; c0 < s.C; c0 += kC) {
      const T* rows[kC];  // a short last block repeats its last center; those results are dropped
      for (int k = 0; k < kC; ++k) rows[k] = v + (e * s.C + std::min(c0 + k, s.C - 1)) * s.N;
      if (nb == kB)
        diff_tile<T, true>(u, s.B, rows, s.N, nb, acc);
      else
        diff_tile<T, false>(u, s.B, rows, s.N, nb, acc);
      // Branch-free epilogue, vectorised over the tile: square roots and the close-pair test.
      // A close pair's entry is a placeholder (0 when accumulating) that the exact pass fixes.
      const T* nub = nu + e * s.B + b0;
      T nuj[kB], r[kC][kB];
      for (int j = 0; j < kB; ++j) nuj[j] = j < nb ? nub[j] : T(0);
      const T keep = accumulate ? T(0) : T(1);
      const int nc = static_cast<int>(std::min<int64_t>(kC, s.C - c0));
      for (int k = 0; k < kC; ++k) {
        const T nvc = nv[e * s.C + std::min(c0 + k, s.C - 1)];
        int any_close = 0;
#pragma omp simd reduction(| : any_close)
        for (int j = 0; j < kB; ++j) {
          const T q = acc[k][j], root = std::sqrt(q + eps);
          const int close_pair = q < T(kClose) * (nuj[j] + nvc);
          r[k][j] = close_pair ? keep * root : root;
          any_close |= close_pair;
        }
        if (any_close && k < nc)  // rare: scan this center's row
          for (int j = 0; j < nb; ++j)
            if (acc[k][j] < T(kClose) * (nuj[j] + nvc)) close[task].push_back({b0 + j, c0 + k, T(0)});
      }
      for (int j = 0; j < nb; ++j) {
        T* o = d + s.out(b0 + j, e, c0);  // nc consecutive centers
        for (int k = 0; k < nc; ++k) o[k] = accumulate ? o[k] + scale * r[k][j] : r[k][j];
      }
    }
  }
}

// dut[rows[k], j] = sum_c w[c, j] (u[rows[k], j] - v[c, rows[k]]) for the first `width` columns
// j and the first nr rows (stored from here, so the accumulators stay in registers).
template <typename T, bool kFull>
MAHA_INLINE void dut_tile(const T* __restrict u, const T* __restrict w, const T* __restrict v, const int64_t* rows,
                          const Shape<T>& s, int width, int nr, T* __restrict dut) {
  T acc[kC][kB];
  for (int k = 0; k < kC; ++k)
    for (int j = 0; j < kB; ++j) acc[k][j] = T(0);
  const int wd = kFull ? kB : width;
  for (int64_t c = 0; c < s.C; ++c) {
    const T* wc = w + c * s.B;
    const T* vc = v + c * s.N;
    for (int k = 0; k < kC; ++k) {
      const T r = vc[rows[k]];
      const T* un = u + rows[k] * s.B;
#pragma omp simd
      for (int j = 0; j < wd; ++j) acc[k][j] += wc[j] * (un[j] - r);
    }
  }
  for (int k = 0; k < kC; ++k)
    if (k < nr) {
#pragma omp simd
      for (int j = 0; j < wd; ++j) dut[rows[k] * s.B + j] = acc[k][j];
    }
}

// dut[e, n, b] = sum_c w[e, c, b] (ut[e, n, b] - v[e, c, n]), kC feature rows n at a time.
template <typename T>
MAHA_INLINE void dut_tiles(const Shape<T>& s, const T* ut, const T* v, const T* w, T* dut, int64_t begin,
                           int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    const int64_t e = task / s.tiles_b(), b0 = (task % s.tiles_b()) * kB;
    const int nb = static_cast<int>(std::min<int64_t>(kB, s.B - b0));
    const T* u = ut + e * s.N * s.B + b0;
    const T* we = w + e * s.C * s.B + b0;
    const T* ve = v + e * s.C * s.N;
    T* out = dut + e * s.N * s.B + b0;
    for (int64_t n0 = 0; n0 < s.N; n0 += kC) {
      int64_t rows[kC];  // a short last block repeats its last row; those results are dropped
      for (int k = 0; k < kC; ++k) rows[k] = std::min(n0 + k, s.N - 1);
      const int nr = static_cast<int>(std::min<int64_t>(kC, s.N - n0));
      if (nb == kB)
        dut_tile<T, true>(u, we, ve, rows, s, nb, nr, out);
      else
        dut_tile<T, false>(u, we, ve, rows, s, nb, nr, out);
    }
  }
}

// The weights of one b-tile (see weights() below), written straight into the [E, C, B] layout,
// one (e, c) row of kB columns at a time, reading grad and d at stride E*C: the row form with a
// scalar transposition afterwards spent most of its time in that transposition and in per-b
// loops of E*C = 50. Branch-free (a guarded division does not vectorise); the close-pair test
// (d^2 stands for ||u - v||^2 + eps) rides along as a per-lane minimum of the margins over the
// whole tile, reduced once per tile (a reduction per row cost as much as the division). Returns
// whether some margin is negative (a close pair).
// The backward's close-pair test: margin < 0 for a close pair, with knv = kClose * ||v||^2
// (d^2 stands for ||u - v||^2 + eps). One definition for the vectorised pass and the rescan.
template <typename T>
MAHA_INLINE T close_margin(T d, T nu, T knv) {
  return d * d - (T(kClose) * nu + knv);
}

template <typename T, bool kFull>
MAHA_INLINE bool weight_rows(const Shape<T>& s, const T* gp, const T* dp, T scale, const T* nu, const T* nv, T* wp,
                             int64_t b0, int nb) {
  const int64_t EC = s.E * s.C;
  const T k = T(kClose);
  const int w = kFull ? kB : nb;
  T lowest[kB];
  for (int j = 0; j < kB; ++j) lowest[j] = T(1);
  for (int64_t e = 0; e < s.E; ++e) {
    const T* nue = nu + e * s.B + b0;
    for (int64_t c = 0; c < s.C; ++c) {
      const int64_t i = e * s.C + c;
      const T *g = gp + b0 * EC + i, *dd = dp + b0 * EC + i;
      const T knv = k * nv[i];
      T* out = wp + i * s.B + b0;
#pragma omp simd
      for (int j = 0; j < w; ++j) {
        const T dj = dd[j * EC], wv = scale * g[j * EC] / dj;
        const T margin = close_margin(dj, nue[j], knv);
        out[j] = dj == T(0) ? T(0) : wv;
        lowest[j] = margin < lowest[j] ? margin : lowest[j];
      }
    }
  }
  T m = T(1);
  for (int j = 0; j < kB; ++j) m = lowest[j] < m ? lowest[j] : m;
  return m < T(0);
}

// The weights of b-tiles [begin, end); a tile with a close pair is rescanned, moving each close
// pair's weight out of w into close[e * tiles_b + tile].
template <typename T>
MAHA_INLINE void weight_tiles(const Shape<T>& s, const T* gp, const T* dp, T scale, const T* nu, const T* nv, T* wp,
                              Pairs<T>* close, int64_t begin, int64_t end) {
  const int64_t EC = s.E * s.C, tiles = s.tiles_b();
  const T k = T(kClose);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b0 = t * kB;
    const int nb = static_cast<int>(std::min<int64_t>(kB, s.B - b0));
    const bool any_close = nb == kB ? weight_rows<T, true>(s, gp, dp, scale, nu, nv, wp, b0, nb)
                                    : weight_rows<T, false>(s, gp, dp, scale, nu, nv, wp, b0, nb);
    if (!any_close) continue;
    for (int64_t e = 0; e < s.E; ++e)
      for (int64_t c = 0; c < s.C; ++c) {
        const int64_t i = e * s.C + c;
        T* out = wp + i * s.B + b0;
        for (int j = 0; j < nb; ++j) {
          const T dj = dp[(b0 + j) * EC + i];
          if (close_margin(dj, nu[e * s.B + b0 + j], k * nv[i]) < T(0)) {
            if (out[j] != T(0)) close[e * tiles + t].push_back({b0 + j, c, out[j]});
            out[j] = T(0);
          }
        }
      }
  }
}

// Small-N products (see small_transform / small_grads), on rows of length B (b contiguous).
//
// rows_product: out[r, :] = sum_q A(r, q) in[q, :] with A(r, q) = A[r * ar + q * aq]: the
// transform ut_e = F_e xt_m (ar = N, aq = 1) and dxt_m = sum_e F_e^T dut_e (ar = 1, aq = N).
// Tiles of kC rows x kB columns held in registers while q runs, so each output is written once
// (axpys over whole rows, the previous form, loaded and stored the output N times).
template <typename T, bool kFull>
MAHA_INLINE void product_tile(const T* A, int64_t ar, int64_t aq, const int64_t* rows, int64_t Q,
                              const T* __restrict in, int64_t ld, int width, int nr, T* __restrict out) {
  T acc[kC][kB];  // local and stored from inside: kept in registers
  for (int k = 0; k < kC; ++k)
    for (int j = 0; j < kB; ++j) acc[k][j] = T(0);
  const int w = kFull ? kB : width;
  for (int64_t q = 0; q < Q; ++q) {
    const T* iq = in + q * ld;
    for (int k = 0; k < kC; ++k) {
      const T a = A[rows[k] * ar + q * aq];
#pragma omp simd
      for (int j = 0; j < w; ++j) acc[k][j] += a * iq[j];
    }
  }
  for (int k = 0; k < kC; ++k)
    if (k < nr) {
#pragma omp simd
      for (int j = 0; j < w; ++j) out[k * ld + j] = acc[k][j];
    }
}

template <typename T>
MAHA_INLINE void rows_product(const T* A, int64_t ar, int64_t aq, int64_t R, int64_t Q, const T* in, T* out,
                              int64_t B) {
  for (int64_t b0 = 0; b0 < B; b0 += kB) {
    const int nb = static_cast<int>(std::min<int64_t>(kB, B - b0));
    for (int64_t r0 = 0; r0 < R; r0 += kC) {
      int64_t rows[kC];  // a short last block repeats its last row; those results are dropped
      for (int k = 0; k < kC; ++k) rows[k] = std::min(r0 + k, R - 1);
      const int nr = static_cast<int>(std::min<int64_t>(kC, R - r0));
      T* o = out + r0 * B + b0;
      if (nb == kB)
        product_tile<T, true>(A, ar, aq, rows, Q, in + b0, B, nb, nr, o);
      else
        product_tile<T, false>(A, ar, aq, rows, Q, in + b0, B, nb, nr, o);
    }
  }
}

// rows_dots: out[r * ldo + s] = sign * sum_b a[r, b] (u[s, b] - off[r * ldoff + s]) (off = 0
// without kOff), for r < R, s < S: dF_e = dut_e xt_m^T and, in the difference form,
// dv[e, c, n] = -sum_b w[e, c, b] (ut[e, n, b] - v[e, c, n]) with no transposition of ut.
// kR x kS dots at a time (4 x 4, with 2- and 1-wide tiles at the edges so that no dot is
// computed twice), each in a vector of kLanes partial sums: independent accumulators (a single
// running dot is a chain of dependent adds), one horizontal sum per dot at the end.
template <typename T, int kR, int kS, bool kOff>
MAHA_INLINE void dot_tile(const T* a, const T* u, int64_t B, const T* off, int64_t ldoff, T sign, T* out,
                          int64_t ldo) {
  constexpr int kLanes = 64 / sizeof(T);  // one AVX-512 register
  T o[kR][kS];
  for (int k = 0; k < kR; ++k)
    for (int l = 0; l < kS; ++l) o[k][l] = kOff ? off[k * ldoff + l] : T(0);
  T acc[kR][kS][kLanes];
  for (int k = 0; k < kR; ++k)
    for (int l = 0; l < kS; ++l)
      for (int j = 0; j < kLanes; ++j) acc[k][l][j] = T(0);
  int64_t b = 0;
  for (; b + kLanes <= B; b += kLanes)
    for (int k = 0; k < kR; ++k)
      for (int l = 0; l < kS; ++l) {
        const T *ak = a + k * B + b, *ul = u + l * B + b;
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) acc[k][l][j] += ak[j] * (kOff ? ul[j] - o[k][l] : ul[j]);
      }
  // Horizontal sums by halving, each step one vector add per dot (a lane-by-lane scalar sum
  // was as costly as the dots themselves).
  for (int h = kLanes / 2; h >= 1; h /= 2)
    for (int k = 0; k < kR; ++k)
      for (int l = 0; l < kS; ++l)
        for (int j = 0; j < h; ++j) acc[k][l][j] += acc[k][l][j + h];
  for (int k = 0; k < kR; ++k)
    for (int l = 0; l < kS; ++l) {
      T sum = acc[k][l][0];
      for (int64_t t = b; t < B; ++t) sum += a[k * B + t] * (kOff ? u[l * B + t] - o[k][l] : u[l * B + t]);
      out[k * ldo + l] = sign * sum;
    }
}

// One row block of kR rows against all S rows of u, in column blocks of 4, 2 and 1.
template <typename T, int kR, bool kOff>
MAHA_INLINE void dot_row_block(const T* a, const T* u, int64_t S, int64_t B, const T* off, int64_t ldoff, T sign,
                               T* out, int64_t ldo) {
  auto col_off = [&](int64_t s) { return kOff ? off + s : off; };  // off is null without kOff
  int64_t s0 = 0;
  for (; s0 + 4 <= S; s0 += 4) dot_tile<T, kR, 4, kOff>(a, u + s0 * B, B, col_off(s0), ldoff, sign, out + s0, ldo);
  if (s0 + 2 <= S) {
    dot_tile<T, kR, 2, kOff>(a, u + s0 * B, B, col_off(s0), ldoff, sign, out + s0, ldo);
    s0 += 2;
  }
  if (s0 < S) dot_tile<T, kR, 1, kOff>(a, u + s0 * B, B, col_off(s0), ldoff, sign, out + s0, ldo);
}

template <typename T, bool kOff>
MAHA_INLINE void rows_dots(const T* a, int64_t R, const T* u, int64_t S, int64_t B, const T* off, int64_t ldoff,
                           T sign, T* out, int64_t ldo) {
  int64_t r0 = 0;
  auto row_off = [&](int64_t r) { return kOff ? off + r * ldoff : off; };
  for (; r0 + 4 <= R; r0 += 4)
    dot_row_block<T, 4, kOff>(a + r0 * B, u, S, B, row_off(r0), ldoff, sign, out + r0 * ldo, ldo);
  if (r0 + 2 <= R) {
    dot_row_block<T, 2, kOff>(a + r0 * B, u, S, B, row_off(r0), ldoff, sign, out + r0 * ldo, ldo);
    r0 += 2;
  }
  if (r0 < R) dot_row_block<T, 1, kOff>(a + r0 * B, u, S, B, row_off(r0), ldoff, sign, out + r0 * ldo, ldo);
}

// The small products with dv [E, C, N]: dF[e, i, :] += dv[e, c, i] c[e, c, :] (to_factor) or
// dc[e, c, :] += dv[e, c, i] F[e, i, :]. Rows of N <= kPadN go through copies padded to kPadN,
// so each is one fixed-width vector: loops of a run-time N = 10 spent more in their remainder
// and overlap checks than in the multiply-adds.
constexpr int64_t kPadN = 16;
template <typename T, bool kToFactor>
MAHA_INLINE void padded_center_products(const T* dv, const T* rows, T* out, int64_t E, int64_t C, int64_t N) {
  const int64_t K = kToFactor ? C : N;  // the summed index: c (to_factor) or i
  const int64_t R = kToFactor ? N : C;  // output rows per member
  std::vector<T> padded(K * kPadN, T(0));
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t k = 0; k < K; ++k)
      std::copy(rows + (e * K + k) * N, rows + (e * K + k + 1) * N, padded.data() + k * kPadN);
    const T* dve = dv + e * C * N;
    for (int64_t r = 0; r < R; ++r) {
      T acc[kPadN];
      for (int j = 0; j < kPadN; ++j) acc[j] = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T w = kToFactor ? dve[k * N + r] : dve[r * N + k];
        const T* src = padded.data() + k * kPadN;
#pragma omp simd
        for (int j = 0; j < kPadN; ++j) acc[j] += w * src[j];
      }
      T* dst = out + (e * R + r) * N;
      for (int64_t j = 0; j < N; ++j) dst[j] += acc[j];
    }
  }
}

template <typename T>
MAHA_INLINE void center_products(const T* dv, const T* rows, T* out, int64_t E, int64_t C, int64_t N, bool to_factor) {
  if (N > kPadN) {
    for (int64_t e = 0; e < E; ++e)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < N; ++i) {
          const T w = dv[(e * C + c) * N + i];
          const T* src = rows + (to_factor ? (e * C + c) : (e * N + i)) * N;
          T* dst = out + (to_factor ? (e * N + i) : (e * C + c)) * N;
          for (int64_t j = 0; j < N; ++j) dst[j] += w * src[j];
        }
    return;
  }
  if (to_factor)
    padded_center_products<T, true>(dv, rows, out, E, C, N);
  else
    padded_center_products<T, false>(dv, rows, out, E, C, N);
}

// target_clones cannot decorate a template: one macro stamps out the float and double entries.
#define MAHA_ENTRIES(T)                                                                             \
  MAHA_CLONES void distance_range(const Shape<T>& s, const T* ut, const T* v, const T* nu,          \
                                  const T* nv, T* d, int64_t begin, int64_t end, T eps, T scale,    \
                                  bool accumulate, Pairs<T>* close) {                               \
    distance_tiles<T>(s, ut, v, nu, nv, d, begin, end, eps, scale, accumulate, close);              \
  }                                                                                                 \
  MAHA_CLONES void dut_range(const Shape<T>& s, const T* ut, const T* v, const T* w, T* dut,        \
                             int64_t begin, int64_t end) {                                          \
    dut_tiles<T>(s, ut, v, w, dut, begin, end);                                                     \
  }                                                                                                 \
  MAHA_CLONES void weight_range(const Shape<T>& s, const T* gp, const T* dp, T scale, const T* nu,  \
                                const T* nv, T* wp, Pairs<T>* close, int64_t begin, int64_t end) {  \
    weight_tiles<T>(s, gp, dp, scale, nu, nv, wp, close, begin, end);                               \
  }                                                                                                 \
  MAHA_CLONES void transpose(const T* in, int64_t rows, int64_t cols, T* out) {                    \
    for (int64_t r0 = 0; r0 < rows; r0 += kB) {                                                     \
      const int64_t nr = std::min<int64_t>(kB, rows - r0);                                          \
      for (int64_t c = 0; c < cols; ++c) {                                                          \
        const T* src = in + r0 * cols + c;                                                          \
        T* dst = out + c * rows + r0;                                                               \
        _Pragma("omp simd") for (int64_t r = 0; r < nr; ++r) dst[r] = src[r * cols];                \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
  MAHA_CLONES void column_norms(const T* u, int64_t N, int64_t B, T* out) {                        \
    for (int64_t b0 = 0; b0 < B; b0 += kB) {                                                        \
      const int64_t nb = std::min<int64_t>(kB, B - b0);                                             \
      T acc[kB] = {};                                                                               \
      for (int64_t n = 0; n < N; ++n)                                                               \
        for (int64_t j = 0; j < nb; ++j) acc[j] += u[n * B + b0 + j] * u[n * B + b0 + j];           \
      std::copy(acc, acc + nb, out + b0);                                                           \
    }                                                                                               \
  }                                                                                                 \
  MAHA_CLONES void center_loops(const T* dv, const T* rows, T* out, int64_t E, int64_t C, int64_t N, \
                                bool to_factor) {                                                   \
    center_products<T>(dv, rows, out, E, C, N, to_factor);                                          \
  }                                                                                                 \
  MAHA_CLONES void products(const T* A, int64_t ar, int64_t aq, int64_t R, int64_t Q, const T* in, T* out,  \
                            int64_t B) {                                                            \
    rows_product<T>(A, ar, aq, R, Q, in, out, B);                                                   \
  }                                                                                                 \
  MAHA_CLONES void dots(const T* a, int64_t R, const T* u, int64_t S, int64_t B, const T* off,     \
                        int64_t ldoff, T sign, T* out, int64_t ldo) {                               \
    if (off)                                                                                        \
      rows_dots<T, true>(a, R, u, S, B, off, ldoff, sign, out, ldo);                                \
    else                                                                                            \
      rows_dots<T, false>(a, R, u, S, B, off, ldoff, sign, out, ldo);                               \
  }
MAHA_ENTRIES(float)
MAHA_ENTRIES(double)
#undef MAHA_ENTRIES

// ---------------------------------------------------------------------------------------------
// close pairs: recomputed from the difference, y = F_e (x_b - c)

// nu[e, b] = ||ut[e, :, b]||^2 (vectorised over b) and nv[e, c] = ||v[e, c, :]||^2.
template <typename T>
struct Norms {
  std::vector<T> nu, nv;
  Norms(const Shape<T>& s, const at::Tensor& ut, const at::Tensor& v) : nu(s.E * s.B), nv(s.E * s.C) {
    const T *up = ut.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
    parallel(s.E, s.N * s.B, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) column_norms(up + e * s.N * s.B, s.N, s.B, nu.data() + e * s.B);
    });
    parallel(s.E * s.C, s.N, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T acc = T(0);
        for (int64_t n = 0; n < s.N; ++n) acc += vp[r * s.N + n] * vp[r * s.N + n];
        nv[r] = acc;
      }
    });
  }
};

// Per-task lists regrouped by member (task t belongs to member t / per_member).
template <typename T>
std::vector<Pairs<T>> by_member(int64_t E, int64_t per_member, std::vector<Pairs<T>>& tasks) {
  std::vector<Pairs<T>> out(E);
  for (size_t t = 0; t < tasks.size(); ++t)
    out[t / per_member].insert(out[t / per_member].end(), tasks[t].begin(), tasks[t].end());
  return out;
}

// From this many multiply-adds (K N^2) on, a member's close pairs go through one GEMM.
constexpr int64_t kRefineGemm = int64_t{1} << 20;

// y [K, N]: y_k = F_e (x_b - c) for the close pairs of member e (a GEMM for big blocks).
template <typename T>
std::vector<T> exact_rows(const Shape<T>& s, const Points& p, int64_t e, const Pairs<T>& pairs) {
  const int64_t K = static_cast<int64_t>(pairs.size()), N = s.N;
  const T *xp = p.x.const_data_ptr<T>(), *cp = p.c.const_data_ptr<T>(), *Fp = p.F.const_data_ptr<T>();
  const bool member_x = p.x.dim() == 3;
  std::vector<T> z(K * N), y(K * N);
  parallel(K, N, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const T* xb = xp + (member_x ? pairs[k].b * s.E + e : pairs[k].b) * N;
      const T* cc = cp + (e * s.C + pairs[k].c) * N;
      for (int64_t n = 0; n < N; ++n) z[k * N + n] = xb[n] - cc[n];
    }
  });
  if (p.diag) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) y[k * N + n] = Fp[e * N + n] * z[k * N + n];
  } else if (K * N * N >= kRefineGemm) {
    at::Tensor yt = at::from_blob(y.data(), {K, N}, p.x.options());
    at::mm_out(yt, at::from_blob(z.data(), {K, N}, p.x.options()), p.F[e].t());
  } else {
    // y_k = sum_j z_kj F[:, j]: axpys over F^T's rows vectorise (a dot per output would be a
    // chain of dependent scalar adds).
    std::vector<T> Ft(N * N);
    const T* Fe = Fp + e * N * N;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) Ft[j * N + i] = Fe[i * N + j];
    parallel(K, N * N, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        T* yk = y.data() + k * N;
        for (int64_t j = 0; j < N; ++j) {
          const T zj = z[k * N + j];
          const T* col = Ft.data() + j * N;
#pragma omp simd
          for (int64_t i = 0; i < N; ++i) yk[i] += zj * col[i];
        }
      }
    });
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// the distances

// Expansion ||u||^2 + ||v||^2 - 2 u.v with the cross term from one GEMM; rows (e, c) are tasks.
template <typename T>
void expanded_distances(const Shape<T>& s, const at::Tensor& ut, const at::Tensor& v, const T* nu, const T* nv,
                        T* d, T eps, T scale, bool accumulate, std::vector<Pairs<T>>& close) {
  const at::Tensor cross = at::bmm(v, ut);  // [E, C, B]
  const T* xp = cross.const_data_ptr<T>();
  parallel(s.E * s.C, s.B, [&](int64_t begin, int64_t end) {
    std::vector<T> sq(s.B), r(s.B);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t e = row / s.C, c = row % s.C;
      const T* cr = xp + row * s.B;
      const T* nue = nu + e * s.B;
      const T nvc = nv[row];
      const T keep = accumulate ? T(0) : T(1);
      int any_close = 0;
#pragma omp simd reduction(| : any_close)
      for (int64_t b = 0; b < s.B; ++b) {
        const T q = nue[b] + nvc - T(2) * cr[b];
        const int close_pair = q < T(kClose) * (nue[b] + nvc);
        sq[b] = q;
        // clamps the expansion; NaN propagates; a close pair's entry is fixed by the exact pass
        const T root = std::sqrt((q < T(0) ? T(0) : q) + eps);
        r[b] = close_pair ? keep * root : root;
        any_close |= close_pair;
      }
      if (any_close)
        for (int64_t b = 0; b < s.B; ++b)
          if (sq[b] < T(kClose) * (nue[b] + nvc)) close[row].push_back({b, c, T(0)});
      T* o = d + e * s.C + c;
      const int64_t stride = s.E * s.C;
      for (int64_t b = 0; b < s.B; ++b) o[b * stride] = accumulate ? o[b * stride] + scale * r[b] : r[b];
    }
  });
}

template <typename T>
void distances_typed(const at::Tensor& ut, const at::Tensor& v, const Points& p, at::Tensor& d, double eps0,
                     double scale0, bool accumulate) {
  const Shape<T> s(ut, v);
  const T eps = T(eps0), scale = T(scale0);
  const Norms<T> norms(s, ut, v);
  const T *nup = norms.nu.data(), *nvp = norms.nv.data();
  T* dp = d.mutable_data_ptr<T>();
  std::vector<Pairs<T>> close;
  int64_t per_member;
  if (s.N >= kGemmMinN) {
    per_member = s.C;
    close.resize(s.E * per_member);
    expanded_distances<T>(s, ut, v, nup, nvp, dp, eps, scale, accumulate, close);
  } else {
    per_member = s.tiles_b();
    close.resize(s.E * per_member);
    const T *up = ut.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
    parallel(s.E * per_member, kB * s.C * s.N, [&](int64_t begin, int64_t end) {
      distance_range(s, up, vp, nup, nvp, dp, begin, end, eps, scale, accumulate, close.data());
    });
  }
  const auto members = by_member<T>(s.E, per_member, close);
  for (int64_t e = 0; e < s.E; ++e) {
    if (members[e].empty()) continue;
    const std::vector<T> y = exact_rows<T>(s, p, e, members[e]);
    const T* yp = y.data();
    for (size_t k = 0; k < members[e].size(); ++k) {
      T sq = T(0);
      for (int64_t n = 0; n < s.N; ++n) sq += yp[k * s.N + n] * yp[k * s.N + n];
      write_distance(dp[s.out(members[e][k].b, e, members[e][k].c)], sq, eps, scale, accumulate);
    }
  }
}

void distances_cpu(const at::Tensor& ut, const at::Tensor& v, const Points& p, at::Tensor& d, double eps,
                   double scale, bool accumulate) {
  AT_DISPATCH_FLOATING_TYPES(ut.scalar_type(), "mahalanobis_distances_cpu",
                             [&] { distances_typed<scalar_t>(ut, v, p, d, eps, scale, accumulate); });
}

// ---------------------------------------------------------------------------------------------
// the backward

// w[e, c, b] = scale * grad / d (0 where d = 0), in the [E, C, B] layout of the small-N
// kernels (grad and d are [B, E, C]; see weight_rows). The close pairs (judged from d^2, which
// stands for ||u - v||^2 + eps) leave w, with their weights, for close[e * tiles_b + tile]; the
// test is vectorised, the rare hits handled apart.
template <typename T>
at::Tensor weights(const Shape<T>& s, const at::Tensor& grad, const at::Tensor& d, T scale, const T* nu,
                   const T* nv, std::vector<Pairs<T>>& close) {
  at::Tensor w = at::empty({s.E, s.C, s.B}, grad.options());
  const T *gp = grad.const_data_ptr<T>(), *dp = d.const_data_ptr<T>();
  T* wp = w.mutable_data_ptr<T>();
  close.assign(s.E * s.tiles_b(), {});
  parallel(s.tiles_b(), kB * s.E * s.C, [&](int64_t begin, int64_t end) {
    weight_range(s, gp, dp, scale, nu, nv, wp, close.data(), begin, end);
  });
  return w;
}

template <typename T>
void distances_backward_typed(const at::Tensor& ut, const at::Tensor& v, const Points& p, const at::Tensor& grad,
                              const at::Tensor& d, double scale, at::Tensor& dut, at::Tensor& dv) {
  const Shape<T> s(ut, v);
  const Norms<T> norms(s, ut, v);
  std::vector<Pairs<T>> close;
  const at::Tensor w = weights<T>(s, grad, d, T(scale), norms.nu.data(), norms.nv.data(), close);
  const auto members = by_member<T>(s.E, s.tiles_b(), close);
  // The far pairs in the transformed space.
  if (s.N >= kGemmMinN) {
    // GEMMs: dut = ut * rowsum(w) - v^T w, dv = v * colsum(w) - w ut^T.
    if (dut.defined()) at::baddbmm_out(dut, ut * w.sum(1, true), v.transpose(1, 2), w, 1, -1);
    if (dv.defined()) at::baddbmm_out(dv, v * w.sum(2, true), w, ut.transpose(1, 2), 1, -1);
  } else {
    const T *up = ut.const_data_ptr<T>(), *vp = v.const_data_ptr<T>(), *wp = w.const_data_ptr<T>();
    if (dut.defined()) {
      T* out = dut.mutable_data_ptr<T>();
      parallel(s.E * s.tiles_b(), kB * s.C * s.N,
               [&](int64_t begin, int64_t end) { dut_range(s, up, vp, wp, out, begin, end); });
    }
    if (dv.defined()) {
      T* out = dv.mutable_data_ptr<T>();
      parallel(s.E, s.C * s.N * s.B, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e)
          dots(wp + e * s.C * s.B, s.C, up + e * s.N * s.B, s.N, s.B, vp + e * s.C * s.N, s.N, T(-1),
               out + e * s.C * s.N, s.N);
      });
    }
  }
  // The close pairs from the difference, r = w F (x_b - c).
  T* dup = dut.defined() ? dut.mutable_data_ptr<T>() : nullptr;
  T* dvp = dv.defined() ? dv.mutable_data_ptr<T>() : nullptr;
  for (int64_t e = 0; e < s.E; ++e) {
    if (members[e].empty()) continue;
    const std::vector<T> y = exact_rows<T>(s, p, e, members[e]);
    const T* yp = y.data();
    for (size_t k = 0; k < members[e].size(); ++k) {
      const auto& [b, c, wv] = members[e][k];
      for (int64_t n = 0; n < s.N; ++n) {
        const T r = wv * yp[k * s.N + n];
        if (dup) dup[(e * s.N + n) * s.B + b] += r;
        if (dvp) dvp[(e * s.C + c) * s.N + n] -= r;
      }
    }
  }
}

void distances_backward_cpu(const at::Tensor& ut, const at::Tensor& v, const Points& p, const at::Tensor& grad,
                            const at::Tensor& d, double scale, at::Tensor& dut, at::Tensor& dv) {
  AT_DISPATCH_FLOATING_TYPES(ut.scalar_type(), "mahalanobis_distances_backward_cpu", [&] {
    distances_backward_typed<scalar_t>(ut, v, p, grad, d, scale, dut, dv);
  });
}

// ---------------------------------------------------------------------------------------------
// small N: the transforms and gradient products as loops (MKL's per-call cost, ~10 us with two
// threads, was most of the op at the papers' N = 10)

// x transposed to [m][j][b] (m: member for a per-member x, else one), b contiguous: x read as
// [B, M * N] rows.
template <typename T>
std::vector<T> x_transposed(const at::Tensor& x, int64_t E, int64_t N) {
  const int64_t B = x.size(0), M = x.dim() == 3 ? E : 1;
  std::vector<T> xt(M * N * B);
  transpose(x.const_data_ptr<T>(), B, M * N, xt.data());
  return xt;
}

template <typename T>
std::pair<at::Tensor, at::Tensor> small_transform(const Points& p) {
  const int64_t E = p.F.size(0), N = p.F.size(1), B = p.x.size(0), C = p.c.size(1);
  const bool member = p.x.dim() == 3;
  at::Tensor ut = at::empty({E, N, B}, p.x.options()), v = at::empty({E, C, N}, p.x.options());
  const std::vector<T> xt = x_transposed<T>(p.x, E, N);
  const T *F = p.F.const_data_ptr<T>(), *cp = p.c.const_data_ptr<T>();
  T* vp = v.mutable_data_ptr<T>();
  T* up = ut.mutable_data_ptr<T>();
  for (int64_t e = 0; e < E; ++e)  // ut_e = F_e xt_m
    products(F + e * N * N, N, 1, N, N, xt.data() + (member ? e : 0) * N * B, up + e * N * B, B);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < N; ++i) {
        T acc = T(0);
        for (int64_t j = 0; j < N; ++j) acc += F[(e * N + i) * N + j] * cp[(e * C + c) * N + j];
        vp[(e * C + c) * N + i] = acc;
      }
  return {ut, v};
}

// dx = F^T dut (summed over members for a shared x), dF = dut x^T + dv^T c, dc = dv F.
template <typename T>
void small_grads(const Points& p, const at::Tensor& dut, const at::Tensor& dv, const std::array<bool, 3>& needs,
                 Grads& g) {
  const int64_t E = p.F.size(0), N = p.F.size(1), B = p.x.size(0), C = p.c.size(1);
  const bool member = p.x.dim() == 3;
  const int64_t M = member ? E : 1;
  const T *F = p.F.const_data_ptr<T>(), *cp = p.c.const_data_ptr<T>();
  const T* du = dut.defined() ? dut.const_data_ptr<T>() : nullptr;
  const T* dvp = dv.defined() ? dv.const_data_ptr<T>() : nullptr;
  if (needs[0]) {
    // dxt_m = sum_e F_e^T dut_e: for a shared x the sum over (e, i) is one product, since
    // F [E, N, N] read as [E * N, N] rows and dut [E, N, B] as [E * N, B] rows line up.
    std::vector<T> dxt(M * N * B);  // [m][j][b]
    for (int64_t m = 0; m < M; ++m)
      products(F + m * N * N, 1, N, N, member ? N : E * N, du + m * N * B, dxt.data() + m * N * B, B);
    at::Tensor dx = at::empty(p.x.sizes(), p.x.options());
    transpose(dxt.data(), M * N, B, dx.mutable_data_ptr<T>());  // [m][j][b] -> [b][m][j]
    g.add(g.dx, dx);
  }
  if (needs[1]) {
    const std::vector<T> xt = x_transposed<T>(p.x, E, N);
    at::Tensor dF = at::empty({E, N, N}, p.x.options());
    T* dFp = dF.mutable_data_ptr<T>();
    for (int64_t e = 0; e < E; ++e)  // dF_e = dut_e xt_m^T
      dots(du + e * N * B, N, xt.data() + (member ? e : 0) * N * B, N, B, nullptr, 0, T(1), dFp + e * N * N, N);
    center_loops(dvp, cp, dFp, E, C, N, true);
    g.add(g.dF, dF);
  }
  if (needs[2]) {
    at::Tensor dc = at::zeros({E, C, N}, p.x.options());
    center_loops(dvp, F, dc.mutable_data_ptr<T>(), E, C, N, false);
    g.add(g.dc, dc);
  }
}

// ---------------------------------------------------------------------------------------------
// large N, lower-triangular factor (form "tril"): each product with F in two halves, rows or
// columns split at h = N / 2, so that the zero block F[:h, h:] is never multiplied (a quarter
// of the multiply-adds of the transforms and of the gradient products; ATen has no batched
// triangular product). The halves are GEMMs written into views of the outputs.

constexpr int64_t kSplitMinN = 128;  // below it the extra GEMM calls cost more than they save

bool split_lower(const Points& p) { return p.lower && !p.diag && p.F.size(-1) >= kSplitMinN; }

struct Halves {  // views of F and x
  int64_t E, N, h, B;
  at::Tensor F11, F22, Frows2, Fcols1, X;  // [E,h,h], [E,N-h,N-h], [E,N-h,N], [E,N,h], x as [E,N,B]
  explicit Halves(const Points& p)
      : E(p.F.size(0)), N(p.F.size(1)), h(N / 2), B(p.x.size(0)),
        F11(p.F.narrow(1, 0, h).narrow(2, 0, h)), F22(p.F.narrow(1, h, N - h).narrow(2, h, N - h)),
        Frows2(p.F.narrow(1, h, N - h)), Fcols1(p.F.narrow(2, 0, h)), X(x_columns(p.x).expand({E, N, B})) {}
};

// out = a b (batched) into a view of a larger tensor; accumulate: out += a b.
void bmm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false) {
  if (accumulate)
    out.baddbmm_(a, b);
  else
    at::bmm_out(out, a, b);
}

std::pair<at::Tensor, at::Tensor> lower_transform(const Points& p) {
  const Halves H(p);
  const int64_t C = p.c.size(1), N = H.N, h = H.h;
  at::Tensor ut = at::empty({H.E, N, H.B}, p.x.options()), v = at::empty({H.E, C, N}, p.x.options());
  bmm_into(ut.narrow(1, 0, h), H.F11, H.X.narrow(1, 0, h));        // ut[:h] = F11 x[:h]
  bmm_into(ut.narrow(1, h, N - h), H.Frows2, H.X);                  // ut[h:] = F[h:, :] x
  bmm_into(v.narrow(2, 0, h), p.c.narrow(2, 0, h), H.F11.transpose(1, 2));  // v[:, :h] = c[:, :h] F11^T
  bmm_into(v.narrow(2, h, N - h), p.c, H.Frows2.transpose(1, 2));   // v[:, h:] = c F[h:, :]^T
  return {ut, v};
}

void lower_grads(const Points& p, const at::Tensor& dut, const at::Tensor& dv, const std::array<bool, 3>& needs,
                 Grads& g) {
  const Halves H(p);
  const int64_t N = H.N, h = H.h;
  const at::Tensor dut2 = dut.defined() ? dut.narrow(1, h, N - h) : dut;  // undefined when only dc is asked
  if (needs[0]) {  // dx_e^T = F_e^T dut_e: columns j < h meet every row i, columns j >= h rows i >= h
    at::Tensor dxt = at::empty({H.E, H.B, N}, p.x.options());  // [E, B, N]
    bmm_into(dxt.narrow(2, 0, h), dut.transpose(1, 2), H.Fcols1);
    bmm_into(dxt.narrow(2, h, N - h), dut2.transpose(1, 2), H.F22);
    g.add(g.dx, p.x.dim() == 2 ? dxt.sum(0) : dxt.transpose(0, 1).contiguous());
  }
  if (needs[1]) {  // dF = dut x^T + dv^T c on the lower blocks
    // The block dF[:h, h:] is left unwritten: factor_grad zeroes dF's whole upper triangle,
    // which contains it (grads_cpu serves only form tril here, see split_lower).
    at::Tensor dF = at::empty({H.E, N, N}, p.x.options());
    const at::Tensor Xt = H.X.transpose(1, 2), dvt = dv.transpose(1, 2);  // [E, B, N], [E, N, C]
    at::Tensor top = dF.narrow(1, 0, h).narrow(2, 0, h), bottom = dF.narrow(1, h, N - h);
    bmm_into(top, dut.narrow(1, 0, h), Xt.narrow(2, 0, h));
    bmm_into(top, dvt.narrow(1, 0, h), p.c.narrow(2, 0, h), true);
    bmm_into(bottom, dut2, Xt);
    bmm_into(bottom, dvt.narrow(1, h, N - h), p.c, true);
    g.add(g.dF, dF);
  }
  if (needs[2]) {  // dc = dv F: columns j < h meet every row i, columns j >= h rows i >= h
    at::Tensor dc = at::empty({H.E, p.c.size(1), N}, p.x.options());
    bmm_into(dc.narrow(2, 0, h), dv, H.Fcols1);
    bmm_into(dc.narrow(2, h, N - h), dv.narrow(2, h, N - h), H.F22);
    g.add(g.dc, dc);
  }
}

std::pair<at::Tensor, at::Tensor> transform_cpu(const Points& p) {
  if (split_lower(p)) return lower_transform(p);
  if (p.diag || p.F.size(-1) >= kGemmMinN) return transform(p);
  std::pair<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "mahalanobis_transform_cpu",
                             [&] { out = small_transform<scalar_t>(p); });
  return out;
}

void grads_cpu(const Points& p, const at::Tensor& dut, const at::Tensor& dv, const std::array<bool, 3>& needs,
               Grads& g) {
  if (split_lower(p)) return lower_grads(p, dut, dv, needs, g);
  if (p.F.size(-1) >= kGemmMinN) return dense_grads(p.x, p.F, p.c, dut, dv, needs, g);
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "mahalanobis_grads_cpu",
                             [&] { small_grads<scalar_t>(p, dut, dv, needs, g); });
}

// f(i, z) for the flat noise indices i in [begin, end) (counter q covers 4q .. 4q + 3).
template <typename Fn>
void for_each_normal(uint64_t seed, int64_t begin, int64_t end, Fn&& f) {
  for (int64_t q = begin >> 2; q <= (end - 1) >> 2; ++q) {
    float z[4];
    normal4(seed, static_cast<uint64_t>(q), z);
    for (int l = 0; l < 4; ++l) {
      const int64_t i = 4 * q + l;
      if (i >= begin && i < end) f(i, z[l]);
    }
  }
}

void perturb_cpu(const at::Tensor& F, int64_t seed, int64_t t, double sigma, at::Tensor& out) {
  const int64_t M = F.numel(), base = t * M;
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "mahalanobis_perturb_cpu", [&] {
    const scalar_t* fp = F.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t sg = static_cast<scalar_t>(sigma);
    parallel(M, 32, [&](int64_t begin, int64_t end) {
      for_each_normal(static_cast<uint64_t>(seed), base + begin, base + end, [&](int64_t i, float z) {
        op[i - base] = fp[i - base] + sg * static_cast<scalar_t>(z);
      });
    });
  });
}

const Kernels kCpu{&distances_cpu, &distances_backward_cpu, &perturb_cpu, at::kCPU, &transform_cpu, &grads_cpu};
using Ops = Entries<kCpu, NoGuard>;

at::Tensor noise_cpu(const at::Tensor& like, int64_t seed, at::IntArrayRef shape) {
  TORCH_CHECK(seed >= 0, "mahalanobis_noise: seed must be >= 0, got ", seed);
  at::Tensor out = at::empty(shape, like.options().dtype(at::kFloat));
  float* op = out.mutable_data_ptr<float>();
  parallel(out.numel(), 32, [&](int64_t begin, int64_t end) {
    for_each_normal(static_cast<uint64_t>(seed), begin, end, [&](int64_t i, float z) { op[i] = z; });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyens_C, m) {
  m.def("mahalanobis_fwd(Tensor x, Tensor P, Tensor centers, int form, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mahalanobis_bwd(Tensor grad, Tensor x, Tensor P, Tensor centers, Tensor d, Tensor ut, Tensor v, "
      "int form, float eps, bool[3] needs) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rmahalanobis_fwd(Tensor x, Tensor P, Tensor centers, Tensor? noise, int seed, int samples, "
      "float sigma, int form, float eps) -> Tensor");
  m.def(
      "rmahalanobis_bwd(Tensor grad, Tensor x, Tensor P, Tensor centers, Tensor? noise, int seed, "
      "int samples, float sigma, int form, float eps, bool[3] needs) -> (Tensor, Tensor, Tensor)");
  m.def("mahalanobis_noise(Tensor like, int seed, int[] shape) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyens_C, CPU, m) {
  Ops::impl(m, &noise_cpu);
}


}  // namespace maha
}  // namespace pyens
