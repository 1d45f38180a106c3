"""Build of pyens: setuptools drives CMake to compile ``pyens._C``.

Environment:
  PYENS_CUDA=0|1         force the CUDA kernels off / on (default: on when nvcc is found and
                         torch is a CUDA build; decided from the toolchain, never from whether
                         a GPU is visible, so GPU-less build machines still build CUDA).
  TORCH_CUDA_ARCH_LIST   e.g. "8.0;9.0+PTX" (the default): the architectures compiled for.
  MAX_JOBS               parallel compile jobs (default: the CPU count).
  PYENS_CMAKE_ARGS       extra arguments passed to CMake's configure step.
  PYENS_SANITIZE         e.g. "address,undefined": compile and link the C++ sources with those
                         sanitizers (-fsanitize=..., -O1 -g, frame pointers; CUDA sources are not
                         instrumented). For `make sanitize` (tools/sanitize.sh), not for installs.

torch must be installed first and the build run with ``--no-build-isolation``: the extension
is compiled against, and is only ABI-compatible with, the torch it finds here.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

try:
    import torch
except ImportError as exc:  # pragma: no cover - build-time message only
    raise SystemExit(
        "pyens builds against an installed torch: run `pip install torch==2.13.0` first, then "
        "`pip install --no-build-isolation .`"
    ) from exc


def _log(msg: str) -> None:
    print(f"pyens build: {msg}", file=sys.stderr, flush=True)


def cuda_decision() -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why (shown by ``pyens info``)."""
    forced = os.environ.get("PYENS_CUDA")
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    if nvcc and not os.path.exists(nvcc):
        nvcc = None
    if forced == "0":
        return False, "CUDA skipped: PYENS_CUDA=0"
    if torch.version.cuda is None:
        why = f"CUDA skipped: torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
        if forced == "1":
            raise SystemExit(f"PYENS_CUDA=1 but {why[len('CUDA skipped: '):]}; install a CUDA build of torch")
        return False, why + (f"; nvcc found at {nvcc}" if nvcc else "")
    if nvcc is None:
        why = "CUDA skipped: no nvcc on PATH or in $CUDA_HOME/bin"
        if forced == "1":
            raise SystemExit(f"PYENS_CUDA=1 but {why[len('CUDA skipped: '):]}")
        return False, why
    return True, f"CUDA built with {nvcc} for torch CUDA {torch.version.cuda}"


def cuda_toolkit_root(nvcc: str) -> str:
    """The CUDA toolkit directory that ``nvcc`` belongs to ($CUDA_HOME / $CUDA_PATH first).

    torch's CMake config finds the toolkit (headers, libcudart) from nvcc's directory's parent,
    which is wrong for a wrapper script such as /usr/local/bin/nvcc (it then looks in
    /usr/local and fails with "Your installed Caffe2 version uses CUDA but I cannot find the
    CUDA libraries"). nvcc itself knows its root: a ``--dryrun`` compile prints ``TOP=<root>``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        top = None
    if top:
        return os.path.realpath(top.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def nvrtc_library(root: str) -> str | None:
    """libnvrtc for torch's CMake targets (they name it; pyens's kernels do not use it).

    A toolkit installed without NVRTC leaves ``CUDA_nvrtc_LIBRARY`` NOTFOUND and the configure
    fails; the CUDA wheels torch depends on ship it (``site-packages/nvidia/*/lib``).
    """
    import glob

    site = os.path.dirname(os.path.dirname(torch.__file__))
    for pattern in (f"{root}/lib64/libnvrtc.so*", f"{root}/lib/libnvrtc.so*", f"{root}/targets/*/lib/libnvrtc.so*",
                    f"{site}/nvidia/*/lib/libnvrtc.so*", f"{site}/nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
        found = sorted(p for p in glob.glob(pattern) if "builtins" not in p and ".alt." not in p)
        if found:
            return found[0]
    return None


DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100, H100/H200 as machine code; 9.0 as PTX for newer cards


def cuda_architectures() -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") as CMake's CUDA_ARCHITECTURES ("80;90")."""
    # 9.0 also as PTX, which the driver compiles for devices newer than the SASS targets
    # (without it a newer card finds "no kernel image"; dispatch then falls back).
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    out = []
    for a in re.split(r"[;\s,]+", archs.strip()):
        if not a:
            continue
        num = a.replace("+PTX", "").replace(".", "")
        out.append(num if a.endswith("+PTX") else f"{num}-real")  # -real: SASS only, as torch's "8.0"
    return ";".join(out)


SANITIZERS = ("address", "undefined")


def sanitizers() -> str:
    """PYENS_SANITIZE checked: "" (none) or a comma list of SANITIZERS."""
    names = [n.strip() for n in os.environ.get("PYENS_SANITIZE", "").split(",") if n.strip()]
    bad = [n for n in names if n not in SANITIZERS]
    if bad:
        raise SystemExit(f"PYENS_SANITIZE: unknown sanitizer(s) {', '.join(bad)}; choose from {', '.join(SANITIZERS)}")
    return ",".join(names)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise SystemExit("pyens needs CMake >= 3.18 to build: `pip install cmake` or `apt-get install cmake`")
        with_cuda, note = cuda_decision()
        _log(note)
        sanitize = sanitizers()
        if sanitize:
            _log(f"C++ sources built with -fsanitize={sanitize} -O1 -g (PYENS_SANITIZE; not for installs)")
        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPYENS_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DPYENS_CUDA_NOTE={note}",
            f"-DPYENS_SANITIZE={sanitize}",  # always passed, so unsetting it clears a cached build's value
        ]
        if with_cuda:
            root = cuda_toolkit_root(shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"))
            _log(f"CUDA toolkit at {root}")
            args += [f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures()}",
                     f"-DCMAKE_CUDA_COMPILER={os.path.join(root, 'bin', 'nvcc')}",
                     f"-DCUDA_TOOLKIT_ROOT_DIR={root}", f"-DCUDAToolkit_ROOT={root}"]
            nvrtc = nvrtc_library(root)
            if nvrtc:
                args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        args += shlex.split(os.environ.get("PYENS_CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        # torch's CMake config ignores CMAKE_CUDA_ARCHITECTURES and compiles for
        # TORCH_CUDA_ARCH_LIST (or, unset, a dozen architectures): give it ours.
        env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS))
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_temp), *args], check=True, env=env)
        subprocess.run([cmake, "--build", str(build_temp), "--parallel", jobs], check=True)


# The compiled part is bound to this torch's ABI, so the wheel pins exactly this release
# (which also keeps pip from ever pulling a newer, CUDA-laden torch into a CPU machine).
TORCH_PIN = f"torch=={torch.__version__.split('+')[0]}"

setup(
    packages=find_packages(include=["pyens", "pyens.*"]) + ["pyens.kernels", "pyens.configs"],
    package_dir={"pyens.kernels": "kernels", "pyens.configs": "configs"},
    ext_modules=[CMakeExtension("pyens._C")],
    cmdclass={"build_ext": CMakeBuild},
    # torchattacks is deliberately absent: it declares torchvision, which has no CPU build here
    # and would drag in a CUDA torch. Install it with `pip install --no-deps torchattacks`.
    install_requires=[TORCH_PIN, "numpy", "tqdm", "matplotlib", "scikit-learn", "foolbox>=3.3", "pillow", "scipy"],
)
