"""Build script: compiles the C++ (and, when possible, CUDA) extension ``supsup_fast._C``.

* ``pip install --no-build-isolation .`` (or ``-e .``) builds against the installed torch with ninja.
* CUDA sources (``csrc/cuda``) are added when the installed torch has CUDA and nvcc is found; they
  are compiled for ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``; torch's default otherwise), without
  ``--use_fast_math`` (subnormals and IEEE division as in the reference).
* ``SUPSUP_FAST_NO_EXT=1`` skips native code; a failed native build warns and installs the pure
  Python package (set ``SUPSUP_FAST_STRICT_BUILD=1`` to make it an error instead).
* ``SUPSUP_FAST_CXX_ARCH`` overrides the CPU target flag (default: ``-march=x86-64-v3`` on
  x86-64 CPUs with AVX2+FMA, nothing elsewhere; set it empty for a portable build).
"""

import glob
import os
import platform
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_EXT = os.environ.get("SUPSUP_FAST_NO_EXT", "") not in ("", "0")
STRICT = os.environ.get("SUPSUP_FAST_STRICT_BUILD", "") not in ("", "0")


def _warn(msg: str) -> None:
    print(f"\n*** supsup_fast: {msg}\n", file=sys.stderr)


def _cpu_arch_flags() -> list[str]:
    if "SUPSUP_FAST_CXX_ARCH" in os.environ:
        return os.environ["SUPSUP_FAST_CXX_ARCH"].split()
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
            if " avx2" in flags and " fma" in flags:
                return ["-march=x86-64-v3"]
        except OSError:
            pass
    return []


def _extensions():
    if NO_EXT:
        _warn("SUPSUP_FAST_NO_EXT is set: building without the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as e:  # isolated build env without torch
        _warn(f"torch is not importable at build time ({e}); building without the compiled extension. "
              "Use `pip install --no-build-isolation .` after installing torch.")
        return [], {}

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # ATen headers from torch 2.14 on require C++20; older ones build with C++17
    std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14) else "-std=c++17"
    cxx = ["-O3", "-fopenmp", std, *_cpu_arch_flags()]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    with_cuda = torch.version.cuda is not None and ce.CUDA_HOME is not None and not os.environ.get("SUPSUP_FAST_NO_CUDA")
    if with_cuda:
        cu = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        define_macros.append(("SUPSUP_WITH_CUDA", "1"))
        # pip-installed CUDA wheels ship headers (cusparse.h, ...) that a bare toolkit may lack
        site = os.path.dirname(os.path.dirname(torch.__file__))
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
        ext = ce.CUDAExtension(
            "supsup_fast._C", sources + cu, define_macros=define_macros,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", std, "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        if torch.version.cuda is not None:
            _warn("torch has CUDA but nvcc/CUDA_HOME was not found: building the CPU kernels only")
        ext = ce.CppExtension(
            "supsup_fast._C", sources, define_macros=define_macros,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )

    class BuildExt(ce.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as e:
                if STRICT:
                    raise
                _warn(f"building the compiled extension failed ({e}); installing the pure-PyTorch package. "
                      "Set SUPSUP_FAST_STRICT_BUILD=1 to see the error as a failure.")

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    # the Triton kernels stay in the top-level kernels/ folder and are installed as supsup_fast.kernels
    packages=[*find_packages(include=["supsup_fast", "supsup_fast.*"]), "supsup_fast.kernels"],
    package_dir={"supsup_fast": "supsup_fast", "supsup_fast.kernels": "kernels"},
    package_data={"supsup_fast.backends": ["dispatch_tables/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
