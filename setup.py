"""Build hessfast's compiled kernels (no torch at build time; see csrc/).

* ``hessfast._kernels_cpu``: always; C++17 + OpenMP, sources ``csrc/cpu_module.cpp`` + ``csrc/cpu/*.cpp``.
* ``hessfast._kernels_cuda``: whenever ``nvcc`` is found; ``csrc/cuda/*.cu`` compiled by nvcc with
  static cudart, linked with the pybind11 front ``csrc/cuda_module.cpp``.  It imports on machines
  without a GPU and reports why it cannot run.

Environment variables:
  HESSFAST_FORCE_CUDA=1|0   force the CUDA module on (a failure is then an error) or off
  HESSFAST_CUDA_ARCHS       e.g. "80;90" or "90+PTX" (default "80;90+PTX": sm_80, sm_90 and PTX)
  CUDA_HOME / CUDA_PATH     CUDA toolkit (default: the nvcc on PATH, then /usr/local/cuda)
"""
import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    value = os.environ.get(name, "").strip().lower()
    return {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False}.get(value)


def _find_cuda():
    """(nvcc, CUDA home holding include/cuda_runtime_api.h) or (None, None)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc may be a wrapper or symlink outside the toolkit
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if (os.path.exists(os.path.join(home, "bin", "nvcc"))
                and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h"))):
            return os.path.join(home, "bin", "nvcc"), home
    return None, None


def _gencode_flags(spec):
    flags = []
    for item in spec.replace(",", ";").split(";"):
        item = item.strip().replace(".", "")
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item[:-4] if ptx else item
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


class BuildExt(build_ext):
    """Compiles the .cu sources of the CUDA extension with nvcc before the usual C++ build.

    An optional extension that fails to build is dropped (with a warning) so that the rest of the
    package installs; with HESSFAST_FORCE_CUDA=1 the failure is an error.
    """

    def build_extensions(self):
        self._skipped = []
        super().build_extensions()
        self.extensions = [e for e in self.extensions if e not in self._skipped]

    def build_extension(self, ext):
        if not getattr(ext, "cuda_sources", None):
            return super().build_extension(ext)
        forced = _env_flag("HESSFAST_FORCE_CUDA")
        try:
            nvcc = ext.nvcc
            flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Icsrc", *_gencode_flags(ext.archs)]
            os.makedirs(self.build_temp, exist_ok=True)
            objects = []
            for src in ext.cuda_sources:
                obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
                print(f"[hessfast] nvcc {src}", flush=True)
                subprocess.check_call([nvcc, *flags, "-c", src, "-o", obj], cwd=ROOT)
                objects.append(obj)
            ext.extra_objects = objects
            super().build_extension(ext)
        except Exception as exc:  # the CUDA module is optional unless forced
            if forced:
                raise
            self._skipped.append(ext)
            print(f"[hessfast] WARNING: skipping the CUDA module ({exc}); "
                  "set HESSFAST_FORCE_CUDA=1 to make this an error", file=sys.stderr)


def extensions():
    exts = [Pybind11Extension(
        "hessfast._kernels_cpu",
        _rel(["csrc/cpu_module.cpp", *glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp"))]),
        include_dirs=["csrc"], cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])]
    forced = _env_flag("HESSFAST_FORCE_CUDA")
    nvcc, cuda_home = _find_cuda() if forced is not False else (None, None)
    if forced and nvcc is None:
        raise RuntimeError("HESSFAST_FORCE_CUDA=1 but no CUDA toolkit (nvcc + headers) was found; set CUDA_HOME")
    if nvcc:
        lib_dirs = [d for d in (os.path.join(cuda_home, "lib64"),
                                os.path.join(cuda_home, "targets", "x86_64-linux", "lib"))
                    if os.path.isdir(d)]
        ext = Pybind11Extension(
            "hessfast._kernels_cuda", ["csrc/cuda_module.cpp"],
            include_dirs=["csrc", os.path.join(cuda_home, "include")], cxx_std=17,
            extra_compile_args=["-O2"], library_dirs=lib_dirs,
            libraries=["cudart_static", "rt", "pthread", "dl"])
        ext.cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")))
        ext.nvcc = nvcc
        ext.archs = os.environ.get("HESSFAST_CUDA_ARCHS", "80;90+PTX")
        ext.define_macros.append(("HESSFAST_CUDA_ARCHS", f'"{ext.archs}"'))
        exts.append(ext)
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
