// CPU kernels of the lp step family: steepest direction V_p(g), exact projection onto the
// lp ball ∩ box, and the fused PGD step delta' = Π(delta + alpha V_p(g)) of MAT eq. (6).
//
// Rows are independent, so rows are spread over ATen's intra-op pool (OpenMP in torch's
// CPU builds: one runtime, and torch.set_num_threads governs it); inner loops are plain
// contiguous loops written to vectorise (by-value min/max, selects instead of branches,
// `omp simd` reductions). No row is ever sorted: the l1 top-k threshold comes from selection
// among the few scores that a bound from group maxima lets through, and the l1/l2 ∩ box
// thresholds from an exact per-row search over the breakpoints (see l1_threshold /
// l2_threshold and docs/lp_step.md).
#include "lp_step.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

namespace pyens {
namespace {

// Forced inlining puts the row kernels inside each target clone below, so the clones really
// are compiled for their ISA (a call out to a baseline instantiation would not be).
#if defined(__GNUC__)
#define PYENS_INLINE __attribute__((always_inline)) inline
#else
#define PYENS_INLINE inline
#endif

constexpr int kL1BracketRounds = 4;  // vectorised false-position rounds before the exact search
constexpr int64_t kSumChunk = 256;     // phase-1 partial sums in T (see l1_threshold)
template <typename T>
constexpr double kSumTolerance = kSumChunk * std::numeric_limits<T>::epsilon() / 2;  // (m - 1) u
// The l1 direction's top-k groups: lane l of chunk c is {c kChunk + l + kLanes j}.
constexpr int kLanes = 8;
constexpr int64_t kChunk = 8 * kLanes;

template <typename T>
struct Scratch {
  std::vector<T> p0, p1, p2, p3;  // candidate breakpoints, their weights, marks
  std::vector<int64_t> idx;   // l1 direction: the top-k candidates' indices
  // Grow-only: capacity and size are kept across rows, so a task allocates (and
  // zero-fills) once instead of re-filling what a shorter use of the buffer gave up.
  static T* at_least(std::vector<T>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }
  void resize(int64_t n) {  // the breakpoint buffers; p3 and idx are taken where used
    at_least(p0, n);
    at_least(p1, n);
    at_least(p2, n);
  }
};

// Deterministic pseudo-random pivots: expected linear time without a global RNG.
struct XorShift {
  uint32_t s;
  uint32_t next() {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    return s;
  }
};

// By-value min/max without std::min's reference semantics: GCC if-converts these into
// vector min/max, where nested std::min/std::max left branches that stopped vectorisation
// (13 ms -> 2 ms for the linf step at 256 x 3072 in a micro-benchmark).
template <typename T>
inline T vmin(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T vmax(T a, T b) {
  return a < b ? b : a;
}

template <typename T>
inline T sgn(T v) {
  return static_cast<T>(v > T(0)) - static_cast<T>(v < T(0));
}

// Smallest lam >= 0 with f(lam) = sum_i min(max(u_i - lam, 0), r_i) <= eps (0 when f(0) <= eps).
// f is continuous, non-increasing and linear between the breakpoints {u_i - r_i, u_i}; a
// bracket (L, U) with f(L) > eps >= f(U) is shrunk onto breakpoints taken from the
// coordinates that still have one inside it. Coordinates whose piece is fixed on the whole
// bracket are folded into (clamped, linear) sums, so each round touches fewer of them; when
// none is left f is linear on the bracket and the root is solved in closed form.
// Croce & Hein 2021 ("Mind the box") for r < inf; Duchi et al. 2008 for r = inf.
template <typename T>
PYENS_INLINE double l1_threshold(const T* y, const T* x, int64_t n, double lo, double hi, double eps,
                    bool boxed, Scratch<T>& s, uint32_t seed) {
  s.resize(n);
  T* cu = s.p0.data();
  T* cv = s.p1.data();
  T* cr = s.p2.data();
  // Build every coordinate in one vectorised loop (no compaction, no branches on the sign
  // of y); the first fold below drops those that are zero for every lam >= 0.
  const T inf = std::numeric_limits<T>::infinity();
  T upper_t = 0;
  double f_zero = 0;  // f(0) = sum min(u, r)
#pragma omp simd reduction(max : upper_t) reduction(+ : f_zero)
  for (int64_t i = 0; i < n; ++i) {
    const T yi = y[i], u = std::abs(yi);
    const T room = yi >= T(0) ? vmax(T(hi) - x[i], T(0)) : vmax(x[i] - T(lo), T(0));
    const T r = boxed ? room : inf;
    const T uu = r > T(0) ? u : T(0);  // no room: zero for every lam, dropped by the first fold
    cu[i] = uu;
    cv[i] = vmax(uu - r, T(0));
    cr[i] = r;
    upper_t = vmax(upper_t, uu);
    f_zero += double(vmin(uu, r));
  }
  if (f_zero <= eps) return 0.0;  // inside the ball: no shrinkage
  double lower = 0, upper = upper_t;
  // Phase 1: a few vectorised rounds over the whole row shrink the bracket without
  // compaction (a dense delta makes every coordinate a candidate, and compacting all of
  // them round after round was the l1 step's main cost). f is piecewise linear with many
  // small pieces, so false position (Illinois variant: halve the stale end's value when
  // one end is kept twice) closes in much faster than bisection.
  double f_lo = f_zero - eps, f_up = -eps;  // f - eps at the bracket ends: > 0 and <= 0
  int kept = 0;                             // which end was kept last: -1 lower, +1 upper
  for (int round = 0; round < kL1BracketRounds; ++round) {
    double guess = lower + f_lo * (upper - lower) / (f_lo - f_up);
    if (!(guess > lower && guess < upper)) guess = 0.5 * (lower + upper);
    const T mid = T(guess);
    if (!(double(mid) > lower && double(mid) < upper)) break;
    // Partial sums in T over chunks of kSumChunk (full vector width for float: the double
    // conversions halved it), each added to a double. The terms are >= 0, so summing m of
    // them in any order errs by at most (m - 1) u f (u = 2^-24 for float): a round whose f
    // is within that of eps decides nothing (the bracket must keep f(L) > eps >= f(U)) and
    // ends phase 1; measured on the 256 x 3072 benchmark rows it never triggers.
    double f = 0;
    for (int64_t c0 = 0; c0 < n; c0 += kSumChunk) {
      const int64_t c1 = std::min<int64_t>(c0 + kSumChunk, n);
      T part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t i = c0; i < c1; ++i) part += vmin(vmax(cu[i] - mid, T(0)), cr[i]);
      f += double(part);
    }
    if (std::abs(f - eps) <= kSumTolerance<T> * (f + eps)) break;
    f -= eps;
    if (f <= 0) {
      upper = mid;
      f_up = f;
      if (kept == -1) f_lo *= 0.5;
      kept = -1;
    } else {
      lower = mid;
      f_lo = f;
      if (kept == 1) f_up *= 0.5;
      kept = 1;
    }
  }
  // Phase 2: one vectorised pass folds every coordinate whose piece is fixed on the bracket
  // into the sums and marks the candidates left (those with a breakpoint inside the
  // bracket); a compaction keeps them for the exact search below. After phase 1 a row of
  // thousands keeps some tens of candidates, so a branch on the stored mark is well
  // predicted and cheaper than a branch-free store of every coordinate; when many remain
  // (a bracket that did not shrink) the branch-free form is used.
  double clamped = 0, lin_sum = 0, lin_cnt_d = 0;
  T cand_f = 0;
  T* is_cand = Scratch<T>::at_least(s.p3, n);
  {
    const T lo_t = T(lower), up_t = T(upper);
#pragma omp simd reduction(+ : clamped, lin_sum, lin_cnt_d, cand_f)
    for (int64_t i = 0; i < n; ++i) {
      const T u = cu[i], v = cv[i];
      const bool zero = u <= lo_t;
      const bool clamp = !zero & (v >= up_t);
      const bool lin = !zero & !clamp & (v <= lo_t) & (u >= up_t);
      clamped += clamp ? double(cr[i]) : 0.0;
      lin_sum += lin ? double(u) : 0.0;
      lin_cnt_d += lin ? 1.0 : 0.0;
      const T c = (zero | clamp | lin) ? T(0) : T(1);
      is_cand[i] = c;
      cand_f += c;
    }
  }
  int64_t nc = 0;
  if (cand_f * T(8) < T(n)) {
    for (int64_t i = 0; i < n; ++i) {  // nc <= i: in place
      if (is_cand[i] != T(0)) {
        cu[nc] = cu[i];
        cv[nc] = cv[i];
        cr[nc] = cr[i];
        ++nc;
      }
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T u = cu[i], v = cv[i], r = cr[i];
      cu[nc] = u;
      cv[nc] = v;
      cr[nc] = r;
      nc += is_cand[i] != T(0) ? 1 : 0;
    }
  }
  int64_t lin_cnt = static_cast<int64_t>(lin_cnt_d);
  XorShift rng{seed | 1u};
  for (;;) {
    // Branch-free fold: which piece a coordinate is on is data-dependent and unpredictable.
    int64_t keep = 0;
    for (int64_t i = 0; i < nc; ++i) {
      const T u = cu[i], v = cv[i], r = cr[i];
      const bool zero = u <= T(lower);
      const bool clamp = !zero && v >= T(upper);
      const bool lin = !zero && !clamp && v <= T(lower) && u >= T(upper);
      clamped += clamp ? double(r) : 0.0;
      lin_sum += lin ? double(u) : 0.0;
      lin_cnt += lin ? 1 : 0;
      cu[keep] = u;
      cv[keep] = v;
      cr[keep] = r;
      keep += (zero || clamp || lin) ? 0 : 1;
    }
    nc = keep;
    if (nc == 0) break;
    const int64_t j = static_cast<int64_t>(rng.next() % static_cast<uint32_t>(nc));
    const double pivot = (cv[j] > lower && cv[j] < upper) ? double(cv[j]) : double(cu[j]);
    double f = clamped + lin_sum - lin_cnt * pivot;
#pragma omp simd reduction(+ : f)
    for (int64_t i = 0; i < nc; ++i)
      f += vmin(vmax(double(cu[i]) - pivot, 0.0), double(cr[i]));
    if (f <= eps)
      upper = pivot;
    else
      lower = pivot;
  }
  if (lin_cnt == 0) return upper;
  const double lam = (clamped + lin_sum - eps) / double(lin_cnt);
  return vmin(vmax(lam, lower), upper);
}

// Largest t in [0, 1] with F(t) = sum_i clamp(t y_i, a_i, b_i)^2 <= eps^2, given F(1) > eps^2.
// Coordinate i is free (t y_i) below its breakpoint t_i and at its bound c_i above, so
// F(t) = t^2 S(t) + C(t) is piecewise quadratic; same bracketing scheme as l1_threshold.
template <typename T>
PYENS_INLINE double l2_threshold(const T* y, const T* x, int64_t n, double lo, double hi, double eps,
                    Scratch<T>& s, uint32_t seed) {
  s.resize(n);
  T* ct = s.p0.data();
  T* cy2 = s.p1.data();
  T* cc2 = s.p2.data();
  // Vectorised build: t_i = bound_i / y_i where y_i would reach its bound, 0 where the
  // coordinate cannot move (it contributes 0), 1 where it stays free on all of [0, 1] (its
  // y^2 goes straight into the free sum). Then a compaction keeps the candidates 0 < t < 1;
  // in PGD steps those are few, so its branch is well predicted.
  double free_sum = 0;
#pragma omp simd reduction(+ : free_sum)
  for (int64_t i = 0; i < n; ++i) {
    const T v = y[i];
    const T bound = v > T(0) ? vmax(T(hi) - x[i], T(0)) : vmin(T(lo) - x[i], T(0));
    const bool moves = (v != T(0)) & (bound != T(0));
    const T t = moves ? vmin(bound / (moves ? v : T(1)), T(1)) : T(0);
    ct[i] = t;
    cy2[i] = v * v;
    cc2[i] = bound * bound;
    free_sum += t >= T(1) ? double(v) * double(v) : 0.0;
  }
  int64_t nc = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (ct[i] > T(0) && ct[i] < T(1)) {
      ct[nc] = ct[i];
      cy2[nc] = cy2[i];
      cc2[nc] = cc2[i];
      ++nc;
    }
  }
  const double e2 = eps * eps;
  double lower = 0, upper = 1, clamped = 0;
  XorShift rng{seed | 1u};
  for (;;) {
    int64_t keep = 0;  // branch-free fold, as in l1_threshold
    for (int64_t i = 0; i < nc; ++i) {
      const T t = ct[i], y2 = cy2[i], c2 = cc2[i];
      const bool clamp = t <= T(lower), free = t >= T(upper);
      clamped += clamp ? double(c2) : 0.0;
      free_sum += free ? double(y2) : 0.0;
      ct[keep] = t;
      cy2[keep] = y2;
      cc2[keep] = c2;
      keep += (clamp || free) ? 0 : 1;
    }
    nc = keep;
    if (nc == 0) break;
    const double pivot = ct[rng.next() % static_cast<uint32_t>(nc)];
    double fs = free_sum, fc = clamped;
#pragma omp simd reduction(+ : fs, fc)
    for (int64_t i = 0; i < nc; ++i) {
      const bool is_free = double(ct[i]) > pivot;
      fs += is_free ? double(cy2[i]) : 0.0;
      fc += is_free ? 0.0 : double(cc2[i]);
    }
    if (pivot * pivot * fs + fc <= e2)
      lower = pivot;
    else
      upper = pivot;
  }
  if (!(free_sum > 0)) return lower;
  const double t = std::sqrt(vmax(e2 - clamped, 0.0) / free_sum);
  return vmin(vmax(t, lower), upper);
}

// Writes V_1(g) scaled by `scale` (alpha for a step) and added to `base` (delta, or null).
// Movable: g != 0 and the step would not push x + delta further past the box. The k largest
// |g| among them are kept, ties to the lowest index, each moving scale / k_selected.

template <typename T>
PYENS_INLINE void l1_direction(const T* g, const T* x, const T* d, T* out, int64_t n, int k, double lo,
                               double hi, double scale, const T* base, Scratch<T>& s) {
  // Pass 1 (vectorised): score = |g| where the coordinate can move, -1 elsewhere, and the
  // largest score of each group {c kChunk + l + kLanes j : j} (chunk c, lane l). Lane-strided
  // groups make their maxima a vertical max of the chunk's vectors, with no horizontal
  // reduction per group; the selection below only needs the groups to be disjoint.
  const int64_t nchunk = (n + kChunk - 1) / kChunk;
  const int64_t nb = nchunk * kLanes;
  T* score = Scratch<T>::at_least(s.p0, n);
  T* bmax = Scratch<T>::at_least(s.p1, nb);
  const T tlo = T(lo), thi = T(hi);
  T cnt_f = 0;  // a float count keeps the loop in one vector width; exact below 2^24
#pragma omp simd reduction(+ : cnt_f)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i], p = x[i] + d[i];
    // Bitwise & and | (not && and ||): no short-circuit branches, so the loop vectorises.
    const bool blocked = ((p >= thi) & (gi > T(0))) | ((p <= tlo) & (gi < T(0))) | (gi == T(0));
    score[i] = blocked ? T(-1) : std::abs(gi);
    cnt_f += blocked ? T(0) : T(1);
  }
  const int64_t cnt = static_cast<int64_t>(cnt_f);
  for (int64_t c = 0; c < nchunk; ++c) {
    const int64_t i0 = c * kChunk;
    T mx[kLanes];
    std::fill(mx, mx + kLanes, T(-1));
    if (i0 + kChunk <= n) {
      for (int64_t j = 0; j < kChunk; j += kLanes) {
        const T* v = score + i0 + j;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) mx[l] = vmax(mx[l], v[l]);
      }
    } else {
      for (int64_t i = i0; i < n; ++i) mx[(i - i0) % kLanes] = vmax(mx[(i - i0) % kLanes], score[i]);
    }
    std::copy(mx, mx + kLanes, bmax + c * kLanes);
  }
  const int64_t ks = std::min<int64_t>(cnt, k);
  const T step = ks > 0 ? T(scale / double(ks)) : T(0);
  if (cnt <= k) {
    // Every movable coordinate is taken: one vectorised pass (score > 0 marks them).
    if (base) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = base[i] + T(score[i] > T(0)) * step * sgn(g[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = T(score[i] > T(0)) * step * sgn(g[i]);
    }
    return;
  }
  // Pass 2: tau = the k-th largest score, by selection on a short candidate list instead of
  // a heap over the whole row (whose unpredictable compare-and-sift was the direction's main
  // cost). Any k distinct scores bound tau from below by their minimum:
  //  (a) the maxima of k groups of blocks give bound1 cheaply (one pass over the maxima);
  //  (b) the blocks whose maximum reaches bound1 (at least k) give the exact k-th largest
  //      block maximum, bound, by selection on those few maxima;
  //  (c) only scores >= bound can be among the top k, and only the blocks whose maximum
  //      reaches bound (about k of them for real gradients) hold one: their scores >= bound
  //      are the candidates, kept in index order with their indices.
  T* cand = Scratch<T>::at_least(s.p2, n + nb);  // [0, n): candidate scores; [n, n + nb): maxima
  std::vector<int64_t>& cidx = s.idx;
  if (static_cast<int64_t>(cidx.size()) < n) cidx.resize(n);
  T bound = T(-1);  // fewer than k blocks: every score is a candidate
  if (nb >= k) {
    T bound1 = std::numeric_limits<T>::infinity();
    for (int g0 = 0; g0 < k; ++g0) {  // group g0: blocks [g0 nb / k, (g0 + 1) nb / k)
      const int64_t b0 = g0 * nb / k, b1 = (g0 + 1) * nb / k;
      T mx = T(-1);
      for (int64_t b = b0; b < b1; ++b) mx = vmax(mx, bmax[b]);
      bound1 = vmin(bound1, mx);
    }
    T* top = cand + n;
    int64_t nt = 0;
    for (int64_t b = 0; b < nb; ++b) {  // branch-free append
      top[nt] = bmax[b];
      nt += bmax[b] >= bound1 ? 1 : 0;
    }
    std::nth_element(top, top + (k - 1), top + nt, std::greater<T>());
    bound = top[k - 1];
  }
  int64_t nc = 0;
  for (int64_t b = 0; b < nb; ++b) {  // group b: chunk b / kLanes, lane b % kLanes
    if (bmax[b] < bound) continue;
    const int64_t i0 = (b / kLanes) * kChunk + b % kLanes, i1 = std::min<int64_t>((b / kLanes + 1) * kChunk, n);
    for (int64_t i = i0; i < i1; i += kLanes) {  // branch-free append
      cand[nc] = score[i];
      cidx[nc] = i;
      nc += score[i] >= bound ? 1 : 0;
    }
  }
  // nc >= k: the top k scores are all >= bound, and all > 0 since cnt > k of them move.
  // Selection permutes the scores, so the in-order pass below reads them again by index.
  std::nth_element(cand, cand + (k - 1), cand + nc, std::greater<T>());
  const T tau = cand[k - 1];
  // Pass 3: out = base (or 0) in one vectorised pass, then the k chosen coordinates move:
  // every score > tau, and of the scores equal to tau the lowest indices (ties go to the
  // lowest index; exact ties are rare in real gradients).
  if (base)
    std::copy(base, base + n, out);
  else
    std::fill(out, out + n, T(0));
  int64_t above = 0, equal = 0;
  for (int64_t j = 0; j < nc; ++j) {
    above += score[cidx[j]] > tau ? 1 : 0;
    equal += score[cidx[j]] == tau ? 1 : 0;
  }
  // The groups interleave, so the candidates are not in index order; only when more scores
  // equal tau than may be taken does the order matter, and then the few candidate indices
  // are put in order so the lowest win.
  if (ks - above < equal) std::sort(cidx.begin(), cidx.begin() + nc);
  int64_t ties = ks - above;  // how many coordinates equal to tau may still be taken
  for (int64_t j = 0; j < nc; ++j) {
    const int64_t i = cidx[j];
    const T v = score[i];
    const bool take = (v > tau) | ((v == tau) & (ties > 0));
    ties -= (v == tau) & take ? 1 : 0;
    out[i] = take ? (base ? base[i] : T(0)) + step * sgn(g[i]) : out[i];
  }
}

// Which inputs hold a NaN or an infinity. The fast path is one float sum of v * 0 (0 for
// finite v, NaN otherwise), a reduction `omp simd` may reorder and vectorise; integer OR
// reductions of comparisons vectorised badly and cost more than the linf step itself.
template <typename T>
int name_bad_inputs(const T* d, const T* g, const T* x, int64_t n, bool reads_grad) {
  auto bad = [n](const T* v) {
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(v[i])) return true;
    return false;
  };
  return (bad(d) ? kBadDelta : 0) | (reads_grad && bad(g) ? kBadGrad : 0) | (bad(x) ? kBadX : 0);
}

template <typename T>
PYENS_INLINE int finite_flags(const T* d, const T* g, const T* x, int64_t n, bool reads_grad) {
  T acc = 0;
  if (reads_grad) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += (d[i] * T(0) + g[i] * T(0)) + x[i] * T(0);
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += d[i] * T(0) + x[i] * T(0);
  }
  return acc == T(0) ? 0 : name_bad_inputs(d, g, x, n, reads_grad);
}

// linf: clamp(delta + alpha sign(g), max(-eps, a), min(eps, b)) is exact for the
// intersection, so the whole step is one pass; the finite checks ride along in it.
template <typename T>
PYENS_INLINE int linf_row(int mode, const T* d, const T* g, const T* x, T* out, int64_t n, T e, T a, T lo, T hi) {
  T acc = 0;
  if (mode == kDirection) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
      acc += (d[i] * T(0) + g[i] * T(0)) + x[i] * T(0);
      out[i] = sgn(g[i]);
    }
  } else if (mode == kProject) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
      const T di = d[i], xi = x[i];
      acc += di * T(0) + xi * T(0);
      out[i] = vmin(vmax(di, vmax(-e, vmin(lo - xi, T(0)))), vmin(e, vmax(hi - xi, T(0))));
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
      const T di = d[i], gi = g[i], xi = x[i];
      acc += (di * T(0) + gi * T(0)) + xi * T(0);
      out[i] = vmin(vmax(di + a * sgn(gi), vmax(-e, vmin(lo - xi, T(0)))), vmin(e, vmax(hi - xi, T(0))));
    }
  }
  return acc == T(0) ? 0 : name_bad_inputs(d, g, x, n, mode != kProject);
}

template <typename T>
PYENS_INLINE int lp_row(const LpParams& p, int64_t row, const T* d, const T* g, const T* x, T* out, int64_t n,
           Scratch<T>& s) {
  const int m = static_cast<int>(row % p.members);
  const int norm = p.norm[m];
  const double eps = p.eps[m], alpha = p.alpha[m];
  const T lo = T(p.lo), hi = T(p.hi);
  const bool reads_grad = p.mode != kProject;
  // In uint32_t: row * 2654435761u is an int64_t product, which overflows (undefined) past
  // 3.4e9 rows; the low 32 bits, all the seed keeps, are the same.
  const uint32_t seed = 0x9E3779B9u ^ (static_cast<uint32_t>(row) * 2654435761u);

  if (norm == kLinf) return linf_row(p.mode, d, g, x, out, n, T(eps), T(alpha), lo, hi);

  // l2 in three passes over the row: (1) finite check + ||g||^2, (2) y = delta + alpha g/||g||
  // written to `out` + ||clamp(y)||^2 (exact) or ||y||^2 (sequential), (3) out = clamp(t y).
  if (norm == kL2) {
    T acc = 0;
    double g2 = 0;
    if (reads_grad) {
#pragma omp simd reduction(+ : acc, g2)
      for (int64_t i = 0; i < n; ++i) {
        acc += (d[i] * T(0) + g[i] * T(0)) + x[i] * T(0);
        g2 += double(g[i]) * double(g[i]);
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < n; ++i) acc += d[i] * T(0) + x[i] * T(0);
    }
    if (acc != T(0)) return name_bad_inputs(d, g, x, n, reads_grad);
    const double inv = 1.0 / vmax(std::sqrt(g2), 1e-12);
    if (p.mode == kDirection) {
      const T sc = T(inv);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = g[i] * sc;
      return 0;
    }
    // Projection mode has no gradient: y = delta + 0 * delta (finite, checked above) keeps
    // one loop for both modes without reading an unchecked grad.
    const T sc = p.mode == kStep ? T(alpha * inv) : T(0);
    const T* dir = p.mode == kStep ? g : d;
    const bool exact = p.exact;
    double y2 = 0;
#pragma omp simd reduction(+ : y2)
    for (int64_t i = 0; i < n; ++i) {
      const T y = d[i] + sc * dir[i];
      out[i] = y;
      const T c = exact ? vmin(vmax(y, vmin(lo - x[i], T(0))), vmax(hi - x[i], T(0))) : y;
      y2 += double(c) * double(c);
    }
    T t = T(1);
    if (eps == 0)
      t = T(0);
    else if (exact && y2 > eps * eps)
      t = T(l2_threshold(out, x, n, p.lo, p.hi, eps, s, seed));
    else if (!exact && y2 > eps * eps)
      t = T(eps / std::sqrt(y2));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      out[i] = vmin(vmax(t * out[i], vmin(lo - x[i], T(0))), vmax(hi - x[i], T(0)));
    return 0;
  }

  if (const int flags = finite_flags(d, g, x, n, reads_grad)) return flags;

  // l1
  if (p.mode == kDirection) {
    l1_direction(g, x, d, out, n, p.k[m], p.lo, p.hi, 1.0, static_cast<const T*>(nullptr), s);
    return 0;
  }
  if (p.mode == kStep)
    l1_direction(g, x, d, out, n, p.k[m], p.lo, p.hi, alpha, d, s);
  else
    std::copy(d, d + n, out);
  // lam = 0 inside the ball: l1_threshold's first pass computes ||clamp(y)||_1 (exact) or
  // ||y||_1 (sequential) as f(0) and stops there, so no separate pass measures the mass.
  const double lam = eps == 0 ? std::numeric_limits<double>::infinity()
                              : l1_threshold(out, x, n, p.lo, p.hi, eps, p.exact, s, seed);
  const T l = T(lam);
  for (int64_t i = 0; i < n; ++i) {
    const T v = out[i];
    const T shrunk = sgn(v) * vmax(std::abs(v) - l, T(0));
    // exact: min(shrunk, room) along sign(v) is the box clamp of the shrunk value.
    out[i] = vmin(vmax(shrunk, vmin(lo - x[i], T(0))), vmax(hi - x[i], T(0)));
  }
  return 0;
}

// The wheel targets baseline x86-64; target_clones adds an AVX2 copy of the row kernel
// (with the template inlined into it) that the loader picks on CPUs that have it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYENS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PYENS_CLONES
#endif

// target_clones cannot decorate a template, so one macro stamps out the float and double
// entry points (each a loop over its rows with lp_row inlined into every clone).
#define PYENS_ROWS_RANGE(T)                                                                   \
  PYENS_CLONES int lp_rows_range(const LpParams& p, int64_t begin, int64_t end, const T* d, \
                                 const T* g, const T* x, T* out, int64_t n, Scratch<T>& s) { \
    int flags = 0;                                                                           \
    for (int64_t r = begin; r < end; ++r)                                                    \
      flags |= lp_row<T>(p, r, d + r * n, g + r * n, x + r * n, out + r * n, n, s);          \
    return flags;                                                                            \
  }
PYENS_ROWS_RANGE(float)
PYENS_ROWS_RANGE(double)
#undef PYENS_ROWS_RANGE

std::tuple<at::Tensor, at::Tensor> lp_rows_cpu(int64_t mode, const at::Tensor& delta,
                                               const at::Tensor& grad, const at::Tensor& x,
                                               at::IntArrayRef norms, at::ArrayRef<double> eps,
                                               at::ArrayRef<double> alpha, at::IntArrayRef k,
                                               double lo, double hi, bool exact) {
  check_lp_rows(delta, grad, x);
  TORCH_CHECK(x.device().is_cpu(), "lp_rows (cpu): x must be a CPU tensor, got ", x.device());
  const LpParams p = make_lp_params(mode, norms, eps, alpha, k, lo, hi, exact);
  const at::Tensor d = delta.contiguous(), g = grad.contiguous(), xx = x.contiguous();
  at::Tensor out = at::empty_like(xx);
  const int64_t rows = xx.size(0), n = xx.size(1);
  std::atomic<int> flags{0};
  AT_DISPATCH_FLOATING_TYPES(xx.scalar_type(), "lp_rows_cpu", [&] {
    const scalar_t* dp = d.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = xx.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // Enough rows per task to amortise the scratch buffers and the pool's wake-up.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> s;
      const int local = lp_rows_range(p, begin, end, dp, gp, xp, op, n, s);
      if (local) flags.fetch_or(local);
    });
  });
  at::Tensor f = at::full({1}, flags.load(), xx.options().dtype(at::kInt));
  return {out, f};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyens_C, m) {
  m.def(
      "lp_rows(int mode, Tensor delta, Tensor grad, Tensor x, int[] norms, float[] eps, "
      "float[] alpha, int[] k, float lo, float hi, bool exact) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyens_C, CPU, m) { m.impl("lp_rows", &lp_rows_cpu); }

}  // namespace pyens
