// Shared contract of the Mahalanobis distance-map kernels (CPU mahalanobis.cpp, CUDA
// mahalanobis.cu): argument checks, the noise stream, and the device-agnostic driver that
// both compile. The semantics are those of pyens/reference/mahalanobis.py (the ground truth):
//
//   d[b, e, c] = sqrt(||F_e (x_b - centers[e, c])||^2 + eps),  M_e = F_e^T F_e   (DML eq. 2)
//
// with F_e = diag(P_e), tril(P_e) or P_e (form). The fast algorithm transforms first,
// ut[e, :, b] = F_e x_b ([E, N, B], b contiguous) and v[e, c, :] = F_e centers[e, c]
// ([E, C, N]), with GEMMs, then evaluates distances between transformed points; the
// [B, E, C, N] difference tensor is never formed. A backend supplies three kernels
// (Kernels below): the distances, their backward (dut, dv), and the perturbed factor of the
// randomized DML (eq. 5); everything else here is ATen calls that run on either device.
//
// Ops (schemas in mahalanobis.cpp):
//   mahalanobis_fwd(x, P, centers, form, eps) -> (d [B,E,C], ut [E,N,B], v [E,C,N])
//   mahalanobis_bwd(grad, x, P, centers, d, ut, v, form, eps, needs[3]) -> (dx, dP, dcenters)
//   rmahalanobis_fwd(x, P, centers, noise?, seed, samples, sigma, form, eps) -> d
//   rmahalanobis_bwd(grad, x, P, centers, noise?, seed, samples, sigma, form, eps, needs[3])
//   mahalanobis_noise(like, seed, shape) -> float32 noise on like's device
// d, ut and v are in the accumulation dtype (float32 for half inputs); gradients come back
// in their input's dtype, and an input whose needs flag is false gets an empty tensor.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>

#if defined(__CUDACC__)
#define PYENS_HD __host__ __device__
#else
#define PYENS_HD
#endif

namespace pyens {
namespace maha {

constexpr int64_t kDiag = 0, kTril = 1, kFull = 2;

// ---------------------------------------------------------------------------------------------
// The noise: Philox4x32-10 (Salmon et al. 2011; the stream of Triton's tl.randint4x) keyed by
// the seed, counter = (q mod 2^32, q >> 32, 0, 0) for q = flat index into [T, E, N, N] / 4,
// then a Box-Muller transform built only from correctly rounded float32 + - * / and sqrt
// (polynomial log and sin/cos, no fused multiply-add). Every backend (this header on the CPU
// and on CUDA, kernels/mahalanobis.py, pyens/reference/mahalanobis.py) computes the same
// operations in the same order, so a seed gives bit-identical noise everywhere.

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

PYENS_HD inline void philox4x32_10(uint64_t counter, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// One rounding per operation: device code uses the _rn intrinsics (nvcc would otherwise
// contract a*b+c into an FMA); host code passes each result through an empty asm statement,
// which the compiler cannot see through, so it cannot fuse across it either.
#if defined(__CUDA_ARCH__)
__device__ inline float rn(float v) { return v; }
__device__ inline float rn_add(float a, float b) { return __fadd_rn(a, b); }
__device__ inline float rn_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ inline float rn_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ inline float rn_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ inline float rn_sqrt(float a) { return __fsqrt_rn(a); }
__device__ inline uint32_t float_bits(float v) { return __float_as_uint(v); }
__device__ inline float bits_float(uint32_t v) { return __uint_as_float(v); }
#else
inline float rn(float v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(v));
#else
  volatile float t = v;
  v = t;
#endif
  return v;
}
inline float rn_add(float a, float b) { return rn(a + b); }
inline float rn_sub(float a, float b) { return rn(a - b); }
inline float rn_mul(float a, float b) { return rn(a * b); }
inline float rn_div(float a, float b) { return rn(a / b); }
inline float rn_sqrt(float a) { return rn(__builtin_sqrtf(a)); }
inline uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}
inline float bits_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
#endif

// Two standard normals from two uint32 draws (the float32 constants are exact, in hex).
PYENS_HD inline void box_muller(uint32_t r0, uint32_t r1, float& z0, float& z1) {
  const float u1 = rn_mul(rn_add(static_cast<float>(r0 >> 9), 0.5f), 0x1p-23f);  // (0, 1), exact
  const float u2 = rn_mul(rn_add(static_cast<float>(r1 >> 9), 0.5f), 0x1p-23f);
  // log(u1) = e ln2 + log(m), m in (sqrt(2)/2, sqrt(2)], log(m) = 2 s P(s^2), s = (m-1)/(m+1)
  const uint32_t bits = float_bits(u1);
  int e = static_cast<int>(bits >> 23) - 127;
  float m = bits_float((bits & 0x7FFFFFu) | 0x3F800000u);
  if (m > 0x1.6a09e6p+0f) {
    m = rn_mul(m, 0.5f);
    e += 1;
  }
  const float s = rn_div(rn_sub(m, 1.0f), rn_add(m, 1.0f));
  const float s2 = rn_mul(s, s);
  float p = 0x1.3b13b2p-4f;
  p = rn_add(0x1.745d18p-4f, rn_mul(s2, p));
  p = rn_add(0x1.c71c72p-4f, rn_mul(s2, p));
  p = rn_add(0x1.24924ap-3f, rn_mul(s2, p));
  p = rn_add(0x1.99999ap-3f, rn_mul(s2, p));
  p = rn_add(0x1.555556p-2f, rn_mul(s2, p));
  p = rn_add(1.0f, rn_mul(s2, p));
  const float logu = rn_add(rn_mul(static_cast<float>(e), 0x1.62e430p-1f), rn_mul(rn_add(s, s), p));
  const float r = rn_sqrt(rn_mul(logu, -2.0f));
  // 2 pi u2 = (pi/2)(q + f): sin and cos of a in [0, pi/4], then the quarter-turn symmetries
  const float v = rn_mul(u2, 4.0f);
  const int q = static_cast<int>(v);  // v >= 0: truncation is floor
  const float f = rn_sub(v, static_cast<float>(q));
  const bool swap = f >= 0.5f;
  const float a = rn_mul(swap ? rn_sub(1.0f, f) : f, 0x1.921fb6p+0f);
  const float a2 = rn_mul(a, a);
  float ps = 0x1.71de3ap-19f;
  ps = rn_add(-0x1.a01a02p-13f, rn_mul(a2, ps));
  ps = rn_add(0x1.111112p-7f, rn_mul(a2, ps));
  ps = rn_add(-0x1.555556p-3f, rn_mul(a2, ps));
  const float sn0 = rn_add(a, rn_mul(rn_mul(a, a2), ps));
  float pc = -0x1.27e4fcp-22f;
  pc = rn_add(0x1.a01a02p-16f, rn_mul(a2, pc));
  pc = rn_add(-0x1.6c16c2p-10f, rn_mul(a2, pc));
  pc = rn_add(0x1.555556p-5f, rn_mul(a2, pc));
  pc = rn_add(-0x1.000000p-1f, rn_mul(a2, pc));
  const float cs0 = rn_add(1.0f, rn_mul(a2, pc));
  const float sn = swap ? cs0 : sn0, cs = swap ? sn0 : cs0;
  const float sin_t = q == 0 ? sn : q == 1 ? cs : q == 2 ? -sn : -cs;
  const float cos_t = q == 0 ? cs : q == 1 ? -sn : q == 2 ? -cs : sn;
  z0 = rn_mul(r, cos_t);
  z1 = rn_mul(r, sin_t);
}

// The four noise values of counter q: flat indices 4q .. 4q+3.
PYENS_HD inline void normal4(uint64_t seed, uint64_t q, float z[4]) {
  uint32_t r[4];
  philox4x32_10(q, seed, r);
  box_muller(r[0], r[1], z[0], z[1]);
  box_muller(r[2], r[3], z[2], z[3]);
}

// ---------------------------------------------------------------------------------------------
// checks (the Python layer checks first, with friendlier messages; these keep the kernels safe)

inline void check_inputs(const char* fn, const at::Tensor& x, const at::Tensor& P, const at::Tensor& c,
                         int64_t form) {
  TORCH_CHECK(form == kDiag || form == kTril || form == kFull, fn,
              ": form must be 0 (diag), 1 (tril) or 2 (full), got ", form);
  TORCH_CHECK(c.dim() == 3, fn, ": centers must be [E, C, N], got ", c.sizes());
  const int64_t E = c.size(0), N = c.size(2);
  TORCH_CHECK(x.dim() == 2 || (x.dim() == 3 && x.size(1) == E), fn,
              ": x must be [B, N] or [B, E, N] with E = ", E, ", got ", x.sizes());
  TORCH_CHECK(x.size(-1) == N, fn, ": x must have N = ", N, " features (centers' last dim), got ",
              x.sizes());
  if (form == kDiag) {
    TORCH_CHECK(P.dim() == 2 && P.size(0) == E && P.size(1) == N, fn, ": P must be [E, N] = [", E,
                ", ", N, "] for form diag, got ", P.sizes());
  } else {
    TORCH_CHECK(P.dim() == 3 && P.size(0) == E && P.size(1) == N && P.size(2) == N, fn,
                ": P must be [E, N, N] = [", E, ", ", N, ", ", N, "], got ", P.sizes());
  }
  TORCH_CHECK(x.scalar_type() == P.scalar_type() && x.scalar_type() == c.scalar_type(), fn,
              ": x, P and centers must share a dtype, got ", x.scalar_type(), ", ", P.scalar_type(),
              ", ", c.scalar_type());
  TORCH_CHECK(x.device() == P.device() && x.device() == c.device(), fn,
              ": x, P and centers must be on one device, got ", x.device(), ", ", P.device(), ", ",
              c.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), fn, ": inputs must be floating point, got ",
              x.scalar_type());
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// the driver

// What a kernel needs to recompute a pair from its difference: y = F_e (x_b - c[e, c]).
struct Points {
  at::Tensor x;  // [B, N] or [B, E, N], accumulation dtype, contiguous
  at::Tensor c;  // [E, C, N]
  at::Tensor F;  // [E, N, N] dense factor, or [E, N] diagonal (diag)
  bool diag;
  bool lower = false;  // F is lower-triangular (form tril): a kernel may skip its zero block
};

// Pairs closer than this, ||u - v||^2 < kClose (||u||^2 + ||v||^2), are recomputed from the
// difference: u and v are rounded separately, so in the transformed space their difference
// (and, worse, the expansion ||u||^2 + ||v||^2 - 2 u.v) loses accuracy as the pair closes in.
// Every other pair then has a relative error of a few ulp (docs/mahalanobis.md).
constexpr double kClose = 0.0625;

struct Grads;

struct Kernels {
  // d[b, e, c] = sqrt(||ut[e, :, b] - v[e, c, :]||^2 + eps), or d += scale * that (accumulate),
  // close pairs from the difference F (x_b - c). d is [B, E, C] contiguous; ut, v contiguous
  // in the accumulation dtype.
  void (*distances)(const at::Tensor& ut, const at::Tensor& v, const Points& p, at::Tensor& d, double eps,
                    double scale, bool accumulate);
  // With w = scale * grad / d (0 where d = 0) and r = ut[e, :, b] - v[e, c, :] (F (x_b - c)
  // for close pairs): dut[e, :, b] = sum_c w r, dv[e, c, :] = -sum_b w r; an undefined output
  // is not computed.
  void (*distances_backward)(const at::Tensor& ut, const at::Tensor& v, const Points& p, const at::Tensor& grad,
                             const at::Tensor& d, double scale, at::Tensor& dut, at::Tensor& dv);
  // out = F + sigma * Z[t] (Z the seed's noise of shape [samples, E, N, N]).
  void (*perturb)(const at::Tensor& F, int64_t seed, int64_t t, double sigma, at::Tensor& out);
  at::DeviceType device;  // where these kernels run
  // Optional replacements of the ATen GEMMs (nullptr: transform() and dense_grads() below):
  // (ut, v) for the points, and (dx, dF, dc) += the products of (dut, dv) for a dense factor.
  std::pair<at::Tensor, at::Tensor> (*transform)(const Points& p) = nullptr;
  void (*grads)(const Points& p, const at::Tensor& dut, const at::Tensor& dv, const std::array<bool, 3>& needs,
                Grads& g) = nullptr;
};

// ---- close pairs with ATen ops (any device; the CUDA backend's refinement)

struct Close {  // the close pairs (b, e, c) and their y = F_e (x_b - c[e, c]) [K, N]
  at::Tensor b, e, c, y;
  bool empty() const { return !y.defined(); }
};

// The pairs with sq [B, E, C] (a squared distance) below kClose (||u||^2 + ||v||^2), and their
// y from the difference; the factors are gathered in chunks of at most 2^24 values.
inline Close close_pairs(const at::Tensor& ut, const at::Tensor& v, const Points& p, const at::Tensor& sq) {
  const at::Tensor nu = ut.square().sum(1), nv = v.square().sum(2);  // [E, B], [E, C]
  const at::Tensor idx = at::nonzero(sq < (nu.t().unsqueeze(-1) + nv.unsqueeze(0)) * kClose);
  Close out;
  if (idx.size(0) == 0) return out;
  out.b = idx.select(1, 0);
  out.e = idx.select(1, 1);
  out.c = idx.select(1, 2);
  const at::Tensor xb = p.x.dim() == 2 ? p.x.index_select(0, out.b) : p.x.index({out.b, out.e});
  const at::Tensor z = xb - p.c.index({out.e, out.c});
  if (p.diag) {
    out.y = z * p.F.index_select(0, out.e);
    return out;
  }
  const int64_t N = p.F.size(-1), K = idx.size(0);
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(N * N, 1));
  out.y = at::empty_like(z);
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t k1 = std::min(K, k0 + chunk);
    at::Tensor y = out.y.slice(0, k0, k1).unsqueeze(-1);
    at::bmm_out(y, p.F.index_select(0, out.e.slice(0, k0, k1)), z.slice(0, k0, k1).unsqueeze(-1));
  }
  return out;
}

// d[close] = sqrt(||y||^2 + eps).
inline void refine_distances(const Close& k, at::Tensor& d, double eps) {
  if (!k.empty()) d.index_put_({k.b, k.e, k.c}, (k.y.square().sum(1) + eps).sqrt());
}

// grad with the close pairs zeroed (their terms come from add_close_terms instead).
inline at::Tensor far_grad(const Close& k, const at::Tensor& grad) {
  if (k.empty()) return grad;
  at::Tensor g = grad.clone();
  g.index_put_({k.b, k.e, k.c}, at::zeros({}, g.options()));
  return g;
}

// dut[e, :, b] += w y and dv[e, c, :] -= w y for the close pairs, w = scale * grad / d (0 at d = 0).
inline void add_close_terms(const Close& k, const at::Tensor& grad, const at::Tensor& d, double scale,
                            at::Tensor& dut, at::Tensor& dv) {
  if (k.empty()) return;
  const at::Tensor dd = d.index({k.b, k.e, k.c});
  const at::Tensor w = at::where(dd == 0, at::zeros({}, dd.options()), grad.index({k.b, k.e, k.c}) * scale / dd);
  const at::Tensor r = k.y * w.unsqueeze(1);  // [K, N]
  if (dut.defined()) {  // pairs may share b: accumulate
    c10::List<std::optional<at::Tensor>> ix;
    ix.push_back(k.e);
    ix.push_back(std::nullopt);
    ix.push_back(k.b);
    dut.index_put_(ix, r, /*accumulate=*/true);
  }
  if (dv.defined()) dv.index_put_(c10::List<std::optional<at::Tensor>>({k.e, k.c}), -r, /*accumulate=*/true);
}

// tril of a contiguous [E, N, N] CPU tensor by row copies (at::tril goes element by element,
// ~1 ms for the feature-space factor, a few percent of the whole op); other devices: at::tril.
inline at::Tensor lower_triangle(const at::Tensor& P) {
  if (!P.is_cpu() || !P.is_contiguous() || !at::isFloatingType(P.scalar_type())) return P.tril();
  at::Tensor out = at::empty_like(P);
  const int64_t rows = P.numel() / std::max<int64_t>(P.size(-1), 1), N = P.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(), "lower_triangle", [&] {
    const scalar_t* src = P.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r % N;  // row within its matrix: keep columns 0..i
      std::copy(src + r * N, src + r * N + i + 1, dst + r * N);
      std::fill(dst + r * N + i + 1, dst + (r + 1) * N, scalar_t(0));
    }
  });
  return out;
}

inline at::Tensor dense_factor(const at::Tensor& P, int64_t form) {
  if (form == kDiag) return at::diag_embed(P);
  if (form == kTril) return lower_triangle(P);  // never reads the upper part
  return P.contiguous();
}

// x as [1 or E, N, B]: the right-hand side of the transforms.
inline at::Tensor x_columns(const at::Tensor& x) {
  return x.dim() == 2 ? x.t().unsqueeze(0) : x.permute({1, 2, 0});
}

// (ut [E, N, B], v [E, C, N]) for a dense factor F [E, N, N].
inline std::pair<at::Tensor, at::Tensor> transform_dense(const at::Tensor& x, const at::Tensor& F,
                                                         const at::Tensor& c) {
  at::Tensor ut = x.dim() == 2 ? at::matmul(F, x.t()) : at::bmm(F, x.permute({1, 2, 0}));
  return {ut.contiguous(), at::bmm(c, F.transpose(1, 2)).contiguous()};
}

// (ut, v) for the factor of p (dense, or a diagonal scaling).
inline std::pair<at::Tensor, at::Tensor> transform(const Points& p) {
  if (!p.diag) return transform_dense(p.x, p.F, p.c);
  return {(p.F.unsqueeze(-1) * x_columns(p.x)).contiguous(), (p.c * p.F.unsqueeze(1)).contiguous()};
}

inline bool needs_ut_grad(const std::array<bool, 3>& needs) { return needs[0] || needs[1]; }
inline bool needs_v_grad(const std::array<bool, 3>& needs) { return needs[1] || needs[2]; }

struct Grads {
  at::Tensor dx, dF, dc;  // dF: gradient of the dense factor (or of P_diag for the diag form)
  void add(at::Tensor& into, at::Tensor part) {
    if (into.defined())
      into.add_(part);
    else
      into = std::move(part);
  }
};

// Gradients of x, F (dense) and centers from (dut, dv): GEMMs, accumulated into g.
inline void dense_grads(const at::Tensor& x, const at::Tensor& F, const at::Tensor& c, const at::Tensor& dut,
                        const at::Tensor& dv, const std::array<bool, 3>& needs, Grads& g) {
  const int64_t E = F.size(0), N = F.size(1), B = x.size(0);
  if (needs[0])
    g.add(g.dx, x.dim() == 2 ? at::mm(dut.reshape({E * N, B}).t(), F.reshape({E * N, N}))
                             : at::bmm(dut.transpose(1, 2), F).transpose(0, 1).contiguous());
  if (needs[1]) {
    at::Tensor dF = x.dim() == 2 ? at::matmul(dut, x) : at::bmm(dut, x.transpose(0, 1));
    g.add(g.dF, dF.baddbmm_(dv.transpose(1, 2), c));
  }
  if (needs[2]) g.add(g.dc, at::bmm(dv, F));
}

inline void product_grads(const Kernels& k, const Points& p, const at::Tensor& dut, const at::Tensor& dv,
                          const std::array<bool, 3>& needs, Grads& g) {
  if (k.grads)
    k.grads(p, dut, dv, needs, g);
  else
    dense_grads(p.x, p.F, p.c, dut, dv, needs, g);
}

inline std::pair<at::Tensor, at::Tensor> transform_points(const Kernels& k, const Points& p) {
  return k.transform ? k.transform(p) : transform(p);
}

inline at::Tensor factor_grad(const at::Tensor& dF, int64_t form) {
  if (form == kDiag) return dF.diagonal(0, -2, -1).contiguous();
  if (form != kTril) return dF;
  if (!dF.is_cpu() || !dF.is_contiguous()) return dF.tril();
  // dF is the driver's own temporary: zero its upper part in place (no second [E, N, N]).
  const int64_t N = dF.size(-1), rows = dF.numel() / std::max<int64_t>(N, 1);
  AT_DISPATCH_FLOATING_TYPES(dF.scalar_type(), "zero_upper", [&] {
    scalar_t* p = dF.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) std::fill(p + r * N + r % N + 1, p + (r + 1) * N, scalar_t(0));
  });
  return dF;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_grads(Grads& g, const at::Tensor& x,
                                                                   const at::Tensor& P, const at::Tensor& c,
                                                                   const std::array<bool, 3>& needs) {
  auto out = [](const at::Tensor& grad, const at::Tensor& like, bool need) {
    return need ? grad.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  return {out(g.dx, x, needs[0]), out(g.dF, P, needs[1]), out(g.dc, c, needs[2])};
}

// The inputs in the accumulation dtype, and the factor built once: the dense F for tril and
// full, P itself for diag (randomized: always dense, as F + sigma Z is a full matrix).
struct Acc {
  at::Tensor x, P, c;
  Points pts;
  Acc(const at::Tensor& x0, const at::Tensor& P0, const at::Tensor& c0, int64_t form, bool dense) {
    const auto t = acc_type(x0.scalar_type());
    x = x0.to(t).contiguous();
    P = P0.to(t).contiguous();
    c = c0.to(t).contiguous();
    const bool diag = form == kDiag && !dense;
    pts = Points{x, c, diag ? P : dense_factor(P, form).contiguous(), diag, form == kTril && !dense};
  }
};

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const Kernels& k, const at::Tensor& x0,
                                                              const at::Tensor& P0, const at::Tensor& c0,
                                                              int64_t form, double eps) {
  check_inputs("mahalanobis", x0, P0, c0, form);
  const Acc a(x0, P0, c0, form, false);
  auto [ut, v] = transform_points(k, a.pts);
  at::Tensor d = at::empty({a.x.size(0), a.c.size(0), a.c.size(1)}, a.x.options());
  if (d.numel() > 0) k.distances(ut, v, a.pts, d, eps, 1.0, false);
  return {d, ut, v};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const Kernels& k, const at::Tensor& grad, const at::Tensor& x0, const at::Tensor& P0, const at::Tensor& c0,
    const at::Tensor& d, const at::Tensor& ut0, const at::Tensor& v0, int64_t form, double eps,
    const std::array<bool, 3>& needs) {
  check_inputs("mahalanobis_backward", x0, P0, c0, form);
  const Acc a(x0, P0, c0, form, false);
  const int64_t B = a.x.size(0), E = a.c.size(0), C = a.c.size(1), N = a.c.size(2);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({B, E, C}) && d.sizes() == grad.sizes(),
              "mahalanobis_backward: grad and d must be [B, E, C] = [", B, ", ", E, ", ", C, "]");
  TORCH_CHECK(ut0.sizes() == at::IntArrayRef({E, N, B}) && v0.sizes() == at::IntArrayRef({E, C, N}),
              "mahalanobis_backward: ut must be [E, N, B] and v [E, C, N], got ", ut0.sizes(), ", ",
              v0.sizes());
  const auto t = a.x.scalar_type();
  const at::Tensor ut = ut0.to(t).contiguous(), v = v0.to(t).contiguous();
  at::Tensor dut, dv;
  if (needs_ut_grad(needs)) dut = at::empty_like(ut);
  if (needs_v_grad(needs)) dv = at::empty_like(v);
  if (grad.numel() > 0 && N > 0) {
    k.distances_backward(ut, v, a.pts, grad.to(t).contiguous(), d.to(t).contiguous(), 1.0, dut, dv);
  } else {
    if (dut.defined()) dut.zero_();
    if (dv.defined()) dv.zero_();
  }
  Grads g;
  if (form != kDiag) {
    product_grads(k, a.pts, dut, dv, needs, g);
    if (needs[1]) g.dF = factor_grad(g.dF, form);
  } else {
    const at::Tensor p = a.P.unsqueeze(-1);  // [E, N, 1]
    if (needs[0]) g.dx = x0.dim() == 2 ? (dut * p).sum(0).t() : (dut * p).permute({2, 0, 1});
    if (needs[1]) g.dF = (dut * x_columns(a.x)).sum(-1) + (dv * a.c).sum(1);
    if (needs[2]) g.dc = dv * a.P.unsqueeze(1);
  }
  return finish_grads(g, x0, P0, c0, needs);
}

// F_t = F + sigma Z[t]: from the explicit noise, or regenerated from the seed by the kernel.
inline void perturbed_factor(const Kernels& k, const at::Tensor& F, const std::optional<at::Tensor>& noise,
                             int64_t seed, int64_t t, double sigma, at::Tensor& Ft) {
  if (noise.has_value())
    at::add_out(Ft, F, (*noise)[t].to(F.scalar_type()), sigma);
  else
    k.perturb(F, seed, t, sigma, Ft);
}

inline int64_t check_randomized(const char* fn, const at::Tensor& x, const at::Tensor& P, const at::Tensor& c,
                                const std::optional<at::Tensor>& noise, int64_t seed, int64_t samples,
                                double sigma, int64_t form) {
  check_inputs(fn, x, P, c, form);
  TORCH_CHECK(sigma >= 0, fn, ": sigma must be >= 0, got ", sigma);
  TORCH_CHECK(seed >= 0, fn, ": seed must be >= 0, got ", seed);
  const int64_t E = c.size(0), N = c.size(2);
  if (noise.has_value()) {
    const at::Tensor& z = *noise;
    TORCH_CHECK(z.dim() == 4 && z.size(1) == E && z.size(2) == N && z.size(3) == N, fn,
                ": noise must be [T, E, N, N] = [T, ", E, ", ", N, ", ", N, "], got ", z.sizes());
    TORCH_CHECK(z.device() == x.device(), fn, ": noise must be on x's device ", x.device(), ", got ",
                z.device());
    TORCH_CHECK(z.size(0) == samples, fn, ": samples = ", samples, " but noise has ", z.size(0));
  }
  TORCH_CHECK(samples >= 1, fn, ": samples must be >= 1, got ", samples);
  return samples;
}

inline at::Tensor randomized_forward(const Kernels& k, const at::Tensor& x0, const at::Tensor& P0,
                                     const at::Tensor& c0, const std::optional<at::Tensor>& noise,
                                     int64_t seed, int64_t samples, double sigma, int64_t form, double eps) {
  const int64_t T = check_randomized("randomized_mahalanobis", x0, P0, c0, noise, seed, samples, sigma, form);
  const Acc a(x0, P0, c0, form, true);
  const at::Tensor& F = a.pts.F;
  at::Tensor d = at::zeros({a.x.size(0), a.c.size(0), a.c.size(1)}, a.x.options());
  if (d.numel() == 0) return d;
  at::Tensor Ft = at::empty_like(F);
  // One sample at a time: the memory does not grow with T.
  for (int64_t t = 0; t < T; ++t) {
    perturbed_factor(k, F, noise, seed, t, sigma, Ft);
    const Points pts{a.x, a.c, Ft, false};
    auto [ut, v] = transform_points(k, pts);
    k.distances(ut, v, pts, d, eps, 1.0 / static_cast<double>(T), true);
  }
  return d;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_backward(
    const Kernels& k, const at::Tensor& grad, const at::Tensor& x0, const at::Tensor& P0, const at::Tensor& c0,
    const std::optional<at::Tensor>& noise, int64_t seed, int64_t samples, double sigma, int64_t form,
    double eps, const std::array<bool, 3>& needs) {
  const int64_t T = check_randomized("randomized_mahalanobis_backward", x0, P0, c0, noise, seed, samples,
                                     sigma, form);
  const Acc a(x0, P0, c0, form, true);
  const int64_t B = a.x.size(0), E = a.c.size(0), C = a.c.size(1);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({B, E, C}),
              "randomized_mahalanobis_backward: grad must be [B, E, C] = [", B, ", ", E, ", ", C, "], got ",
              grad.sizes());
  const at::Tensor& F = a.pts.F;
  const at::Tensor g = grad.to(a.x.scalar_type()).contiguous();
  Grads out;
  at::Tensor Ft = at::empty_like(F), dt = at::empty({B, E, C}, a.x.options());
  // The forward's draws again, one sample at a time (regenerated from the seed, not stored).
  for (int64_t t = 0; t < T && g.numel() > 0; ++t) {
    perturbed_factor(k, F, noise, seed, t, sigma, Ft);
    const Points pts{a.x, a.c, Ft, false};
    auto [ut, v] = transform_points(k, pts);
    k.distances(ut, v, pts, dt, eps, 1.0, false);
    at::Tensor dut, dv;
    if (needs_ut_grad(needs)) dut = at::empty_like(ut);
    if (needs_v_grad(needs)) dv = at::empty_like(v);
    k.distances_backward(ut, v, pts, g, dt, 1.0 / static_cast<double>(T), dut, dv);
    product_grads(k, pts, dut, dv, needs, out);
  }
  if (needs[0] && !out.dx.defined()) out.dx = at::zeros_like(a.x);
  if (needs[1]) out.dF = out.dF.defined() ? factor_grad(out.dF, form) : at::zeros_like(a.P);
  if (needs[2] && !out.dc.defined()) out.dc = at::zeros_like(a.c);
  return finish_grads(out, x0, P0, c0, needs);
}

// ---------------------------------------------------------------------------------------------
// the op entry points of one device: its kernels K and a device guard (CUDA's, or NoGuard)

struct NoGuard {
  explicit NoGuard(at::Device) {}
};

template <const Kernels& K, typename Guard>
struct Entries {
  static void check(const char* fn, const at::Tensor& x) {
    TORCH_CHECK(x.device().type() == K.device, fn, " (", K.device, "): x must be a ", K.device, " tensor, got ",
                x.device());
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& P,
                                                            const at::Tensor& c, int64_t form, double eps) {
    check("mahalanobis", x);
    const Guard guard(x.device());
    return forward(K, x, P, c, form, eps);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& P, const at::Tensor& c,
                                                            const at::Tensor& d, const at::Tensor& ut,
                                                            const at::Tensor& v, int64_t form, double eps,
                                                            std::array<bool, 3> needs) {
    check("mahalanobis_backward", x);
    const Guard guard(x.device());
    return backward(K, grad, x, P, c, d, ut, v, form, eps, needs);
  }
  static at::Tensor rfwd(const at::Tensor& x, const at::Tensor& P, const at::Tensor& c,
                         const std::optional<at::Tensor>& noise, int64_t seed, int64_t samples, double sigma,
                         int64_t form, double eps) {
    check("randomized_mahalanobis", x);
    const Guard guard(x.device());
    return randomized_forward(K, x, P, c, noise, seed, samples, sigma, form, eps);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> rbwd(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& P, const at::Tensor& c,
                                                             const std::optional<at::Tensor>& noise, int64_t seed,
                                                             int64_t samples, double sigma, int64_t form,
                                                             double eps, std::array<bool, 3> needs) {
    check("randomized_mahalanobis_backward", x);
    const Guard guard(x.device());
    return randomized_backward(K, grad, x, P, c, noise, seed, samples, sigma, form, eps, needs);
  }
  // TORCH_LIBRARY_IMPL body: these entries plus the device's noise generator.
  static void impl(torch::Library& m, at::Tensor (*noise)(const at::Tensor&, int64_t, at::IntArrayRef)) {
    m.impl("mahalanobis_fwd", &fwd);
    m.impl("mahalanobis_bwd", &bwd);
    m.impl("rmahalanobis_fwd", &rfwd);
    m.impl("rmahalanobis_bwd", &rbwd);
    m.impl("mahalanobis_noise", noise);
  }
};

}  // namespace maha
}  // namespace pyens
