// pyens._C: loading this module registers the pyens_C::* kernels with the dispatcher (static
// TORCH_LIBRARY initialisers in the op files). pybind11 only carries non-tensor helpers.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include "pyens_build_config.h"


namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyens compiled kernels (C++ CPU always, CUDA when built with a CUDA toolchain)";
  m.def("build_info", [] {
    py::dict info;
    info["cuda"] = static_cast<bool>(PYENS_WITH_CUDA);
    info["cuda_note"] = PYENS_CUDA_NOTE;
    info["cuda_archs"] = PYENS_CUDA_ARCHS;
    info["torch_version"] = PYENS_TORCH_VERSION;
#if defined(__clang__)
    info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = std::string("gcc ") + __VERSION__;
#else
    info["compiler"] = "unknown";
#endif
    info["cplusplus"] = static_cast<long>(__cplusplus);
    return info;
  });
  m.def("parallel_info", [] { return at::get_parallel_info(); },
        "ATen's intra-op thread pool, which the CPU kernels run on");
}
