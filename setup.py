"""Build script: compiles the C++ (and, when possible, CUDA) extension ``supsup_fast._C``.

* ``pip install --no-build-isolation .`` (or ``-e .``) builds against the installed torch with ninja.
* CUDA sources (``csrc/cuda``) are added when the installed torch has CUDA, nvcc is found and there is
  a target: a visible GPU (compiled for it) or ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``, to build on a
  machine without one). A CUDA torch on a machine with neither builds the CPU kernels only: torch's
  fallback would compile every architecture it knows, which takes far longer than the CPU build.
  No ``--use_fast_math`` (subnormals and IEEE division as in the reference).
* ``SUPSUP_FAST_NO_EXT=1`` skips native code; a failed native build warns and installs the pure
  Python package (set ``SUPSUP_FAST_STRICT_BUILD=1`` to make it an error instead).
* The build never takes its CPU target from the build machine, so a wheel runs on any CPU of its
  architecture. On x86-64 the kernels are compiled twice: ``supsup_fast._C`` for the baseline
  (x86-64, SSE2) and ``supsup_fast._C_avx2`` for x86-64-v3 (AVX2, FMA, F16C, BMI1/2, LZCNT,
  MOVBE: Haswell / Excavator and later); ``supsup_fast.backends._ext`` loads the second only where
  the CPU has every one of those. The AVX-512 masked GEMM is chosen at run time inside either.
  ``SUPSUP_FAST_CPU_VARIANTS=baseline`` builds the baseline module alone (half the compile time).
* ``SUPSUP_FAST_CXX_ARCH`` builds one module ``_C`` with these target flags instead (e.g.
  ``-march=native`` for a build that will only run on this machine).
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


#: x86-64 CPU variants: extension module name -> extra target flags (the run-time loader picks one)
X86_VARIANTS = {"_C": [], "_C_avx2": ["-march=x86-64-v3"]}


def _cpu_variants() -> dict[str, list[str]]:
    """The extension modules to build and each one's CPU target flags; none comes from the build machine."""
    if "SUPSUP_FAST_CXX_ARCH" in os.environ:
        return {"_C": os.environ["SUPSUP_FAST_CXX_ARCH"].split()}
    if platform.machine() not in ("x86_64", "AMD64"):
        return {"_C": []}
    wanted = os.environ.get("SUPSUP_FAST_CPU_VARIANTS", "").split(",")
    if wanted == ["baseline"]:
        return {"_C": []}
    return dict(X86_VARIANTS)


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
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    with_cuda = False
    if torch.version.cuda is not None and not os.environ.get("SUPSUP_FAST_NO_CUDA"):
        if ce.CUDA_HOME is None:
            _warn("torch has CUDA but nvcc/CUDA_HOME was not found: building the CPU kernels only")
        elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            _warn("torch has CUDA and nvcc is found, but no GPU is visible and TORCH_CUDA_ARCH_LIST is not set: "
                  "building the CPU kernels only (set TORCH_CUDA_ARCH_LIST, e.g. 9.0, to compile the CUDA "
                  "kernels for a GPU elsewhere)")
        else:
            with_cuda = True
    cu = []
    if with_cuda:
        cu = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        define_macros.append(("SUPSUP_WITH_CUDA", "1"))
        # pip-installed CUDA wheels ship headers (cusparse.h, ...) that a bare toolkit may lack
        site = os.path.dirname(os.path.dirname(torch.__file__))
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    exts = []
    for name, arch in _cpu_variants().items():
        cxx = ["-O3", "-fopenmp", std, *arch]
        if with_cuda:
            exts.append(ce.CUDAExtension(
                f"supsup_fast.{name}", sources + cu, define_macros=define_macros,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", std, "-lineinfo"]},
                extra_link_args=["-fopenmp"],
            ))
        else:
            exts.append(ce.CppExtension(
                f"supsup_fast.{name}", sources, define_macros=define_macros,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
            ))

    class BuildExt(ce.BuildExtension):
        def build_extension(self, ext):
            # the variants compile the same sources with other flags: each into its own object folder
            shared = self.build_temp
            self.build_temp = os.path.join(shared, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = shared

        def run(self):
            try:
                super().run()
            except Exception as e:
                if STRICT:
                    raise
                _warn(f"building the compiled extension failed ({e}); installing the pure-PyTorch package. "
                      "Set SUPSUP_FAST_STRICT_BUILD=1 to see the error as a failure.")

    return exts, {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    # the Triton kernels stay in the top-level kernels/ folder and are installed as supsup_fast.kernels
    packages=[*find_packages(include=["supsup_fast", "supsup_fast.*"]), "supsup_fast.kernels"],
    package_dir={"supsup_fast": "supsup_fast", "supsup_fast.kernels": "kernels"},
    package_data={"supsup_fast": ["py.typed"], "supsup_fast.backends": ["dispatch_tables/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
