"""The build: CUDA sources compile with nvcc (no GPU needed), and the wheel works on its own."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))


def nvcc_command(source: Path, out: Path, arch: str) -> list[str]:
    """nvcc against the installed torch's headers (a CPU wheel ships the CUDA headers too)."""
    tdir = Path(torch.__file__).parent
    return [shutil.which("nvcc"), "-std=c++20", "-O1", "-c", str(source), "-o", str(out), f"-arch={arch}",
            f"-I{tdir / 'include'}", f"-I{tdir / 'include/torch/csrc/api/include'}", f"-I{ROOT / 'csrc'}",
            f"-I{sysconfig.get_paths()['include']}", "-D_GLIBCXX_USE_CXX11_ABI=1", "-Xcompiler", "-fPIC",
            "--expt-relaxed-constexpr", "-Werror", "all-warnings"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: CUDA sources not compiled here")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_sources_compile_with_nvcc(source, tmp_path):
    """CI has nvcc but no GPU: compiling (not running) catches CUDA errors before a GPU sees them."""
    proc = subprocess.run(nvcc_command(source, tmp_path / "k.o", "sm_90"), capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stderr[-4000:]}"
    assert (tmp_path / "k.o").stat().st_size > 0


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/*.cu missing: the CUDA backend has no kernels"


def test_build_info_reports_the_cuda_decision():
    from pyens.ops import build_info

    info = build_info()
    assert info, "pyens._C is not importable"
    assert isinstance(info["cuda"], bool)
    if not info["cuda"]:
        assert info["cuda_note"].startswith("CUDA skipped: "), info


def _host_package_dirs() -> list[str]:
    """The directories this interpreter imports torch, numpy and their dependencies from."""
    import site

    import numpy
    import torch

    dirs = [Path(m.__file__).resolve().parents[1] for m in (torch, numpy)]
    dirs += [Path(d) for d in site.getsitepackages()] + [Path(site.getusersitepackages())]
    return list(dict.fromkeys(str(d) for d in dirs if d.is_dir()))


def _see_host_packages(py: Path) -> None:
    """Let the venv of ``py`` import the host's torch (heavy, pinned) through a ``.pth`` file.

    Not ``venv --system-site-packages``: made from inside a venv, that exposes the *base*
    interpreter's site-packages, which has no torch. A ``.pth`` file naming the directories
    this interpreter loads torch from works alike from a venv, a system Python and conda. Its
    entries come after the venv's own site-packages, so pyens is still the wheel's.
    """
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "_pyens_test_host_packages.pth").write_text("\n".join(_host_package_dirs()) + "\n")


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    """Build the wheel, install it (no deps) in a new venv, import it there and run an op."""
    dist = tmp_path / "dist"
    env = dict(os.environ, MAX_JOBS="2")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist),
                    str(ROOT)], check=True, env=env)
    wheel = next(dist.glob("pyens-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "pyens/kernels/lp_step.py" in names, "Triton kernels must ship as pyens.kernels"
    assert any(n.startswith("pyens/_C") and n.endswith(".so") for n in names), "the wheel lacks pyens._C"
    assert not any(n.startswith("kernels/") for n in names), "no top-level 'kernels' package"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    _see_host_packages(py)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    script = (
        "import pyens, torch, pathlib, sys\n"
        f"assert pathlib.Path(pyens.__file__).is_relative_to({str(venv)!r}), pyens.__file__\n"
        "from pyens.ops import lp_step, use_backend\n"
        "x = torch.rand(4, 3, 10); g = torch.randn_like(x)\n"
        "with use_backend('cpu'):\n"
        "    d = lp_step(torch.zeros_like(x), g, x, norm=('l1','l2','linf'), eps=(1.,.5,.1), alpha=(.5,.2,.05), members=3)\n"
        "assert d[:, 0].abs().sum(-1).max() <= 1 + 1e-6\n"
        "print('ok', pyens.ops.backends()['lp_step']['cpu']['selected'])\n"
    )
    proc = subprocess.run([str(py), "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok cpu"
    cli = subprocess.run([str(venv / "bin" / "pyens"), "info"], cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 0 and "lp_step" in cli.stdout, cli.stderr
