// Shared host-side contract of the lp step kernels (CPU lp_step.cpp, CUDA lp_step.cu).
//
// Op pyens_C::lp_rows(int mode, Tensor delta, Tensor grad, Tensor x, int[] norms,
//                      float[] eps, float[] alpha, int[] k, float lo, float hi,
//                      bool exact) -> (Tensor out, Tensor flags)
// works on rows [R, n]; row r uses member r % M of the M-long parameter lists.
// The semantics are those of pyens/reference/lp_step.py::lp_rows, the ground truth.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace pyens {

constexpr int kLinf = 0, kL2 = 1, kL1 = 2;
constexpr int kProject = 0, kDirection = 1, kStep = 2;
// Bits of the flags output: which input held a NaN or an infinity.
constexpr int kBadDelta = 1, kBadGrad = 2, kBadX = 4;
// Passed by value to CUDA kernels, so it must stay well under the 4 KiB parameter limit.
constexpr int kMaxMembers = 64;

struct LpParams {
  int mode;
  int members;
  bool exact;
  double lo, hi;
  int norm[kMaxMembers];
  int k[kMaxMembers];
  double eps[kMaxMembers];
  double alpha[kMaxMembers];
};

inline LpParams make_lp_params(int64_t mode, at::IntArrayRef norms, at::ArrayRef<double> eps,
                               at::ArrayRef<double> alpha, at::IntArrayRef k, double lo,
                               double hi, bool exact) {
  TORCH_CHECK(mode >= kProject && mode <= kStep, "lp_rows: mode must be 0, 1 or 2, got ", mode);
  const auto m = static_cast<int64_t>(norms.size());
  TORCH_CHECK(m >= 1 && m <= kMaxMembers, "lp_rows: norms must have 1..", kMaxMembers,
              " entries, got ", m);
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == m, "lp_rows: eps must have ", m, " entries");
  TORCH_CHECK(static_cast<int64_t>(alpha.size()) == m, "lp_rows: alpha must have ", m, " entries");
  TORCH_CHECK(static_cast<int64_t>(k.size()) == m, "lp_rows: k must have ", m, " entries");
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo <= hi,
              "lp_rows: box must satisfy lo <= hi, got (", lo, ", ", hi, ")");
  LpParams p{};
  p.mode = static_cast<int>(mode);
  p.members = static_cast<int>(m);
  p.exact = exact;
  p.lo = lo;
  p.hi = hi;
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(norms[i] == kLinf || norms[i] == kL2 || norms[i] == kL1,
                "lp_rows: norms[", i, "] must be 0 (linf), 1 (l2) or 2 (l1), got ", norms[i]);
    TORCH_CHECK(eps[i] >= 0, "lp_rows: eps[", i, "] must be >= 0, got ", eps[i]);
    TORCH_CHECK(alpha[i] >= 0, "lp_rows: alpha[", i, "] must be >= 0, got ", alpha[i]);
    TORCH_CHECK(k[i] >= 1, "lp_rows: k[", i, "] must be >= 1, got ", k[i]);
    p.norm[i] = static_cast<int>(norms[i]);
    p.k[i] = static_cast<int>(std::min<int64_t>(k[i], INT32_MAX));
    p.eps[i] = eps[i];
    p.alpha[i] = alpha[i];
  }
  return p;
}

inline void check_lp_rows(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "lp_rows: x must be 2-D [rows, n], got ", x.dim(), "-D");
  TORCH_CHECK(delta.sizes() == x.sizes(), "lp_rows: delta must have x's shape ", x.sizes(),
              ", got ", delta.sizes());
  TORCH_CHECK(grad.sizes() == x.sizes(), "lp_rows: grad must have x's shape ", x.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(delta.scalar_type() == x.scalar_type() && grad.scalar_type() == x.scalar_type(),
              "lp_rows: delta, grad and x must share a dtype, got ", delta.scalar_type(), ", ",
              grad.scalar_type(), ", ", x.scalar_type());
  TORCH_CHECK(delta.device() == x.device() && grad.device() == x.device(),
              "lp_rows: delta, grad and x must be on one device, got ", delta.device(), ", ",
              grad.device(), ", ", x.device());
}

}  // namespace pyens
