"""Build of dpo_fast and its compiled extension dpo_fast._C.

Install (torch must already be installed; a build-isolated build would fetch another torch):

    pip install --no-build-isolation -e .

Environment:
  DPO_FAST_CPU_CAPABILITY  auto|avx512|avx2|default  vector ISA of the CPU kernels (default auto:
                           the build host's CPU). The same flags go to every C++ file.
  DPO_FAST_BUILD_CUDA      auto|0|1  CUDA kernels: auto = when torch has CUDA and nvcc is found,
                           0 = never, 1 = required (error if impossible).
  TORCH_CUDA_ARCH_LIST     CUDA archs (default "8.0;9.0").
  MAX_JOBS                 parallel compile jobs (default: from cores and available RAM).
"""

from __future__ import annotations

import glob
import os
import platform
import re
import sys

from setuptools import find_packages, setup

try:
    import torch  # noqa: F401
except ImportError as exc:  # an isolated build env, or torch not installed yet
    raise RuntimeError(
        "dpo_fast builds its extension against the torch that is already installed: install torch "
        "first (e.g. pip install torch==2.13.0), then pip install --no-build-isolation -e ."
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _log(msg: str) -> None:
    print(f"[dpo_fast setup] {msg}", file=sys.stderr)


def _version() -> str:
    with open(os.path.join(ROOT, "dpo_fast", "__init__.py"), encoding="utf-8") as f:
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    return m.group(1) if m else "0.0.0"


# ------------------------------------------------------------------------------------------------
# CPU capability

_CAP_FLAGS = {
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}


def _host_cpu_capability() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return "default"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if flags:
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
            return "avx512"
        if {"avx2", "fma", "f16c"} <= flags:
            return "avx2"
        return "default"
    # No /proc/cpuinfo: ask torch which capability its own kernels dispatch to here.
    try:
        import torch

        cap = torch.backends.cpu.get_cpu_capability().lower()
    except Exception:  # noqa: BLE001
        return "default"
    return cap if cap in ("avx512", "avx2") else "default"


def cpu_capability() -> str:
    req = os.environ.get("DPO_FAST_CPU_CAPABILITY", "auto").strip().lower() or "auto"
    if req not in ("auto", "avx512", "avx2", "default"):
        raise RuntimeError(
            f"DPO_FAST_CPU_CAPABILITY must be auto, avx512, avx2 or default, got {req!r}")
    return _host_cpu_capability() if req == "auto" else req


# ------------------------------------------------------------------------------------------------
# CUDA choice

def cuda_choice() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("DPO_FAST_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"DPO_FAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"the installed torch {torch.__version__} has no CUDA support")
    if CUDA_HOME is None:
        problems.append("no CUDA toolkit found (nvcc / CUDA_HOME)")
    if problems:
        if mode == "1":
            raise RuntimeError("DPO_FAST_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
                               + "; ".join(problems))
        _log("building without CUDA kernels: " + "; ".join(problems))
        return False
    return True


def _default_max_jobs(with_cuda: bool) -> int:
    cores = os.cpu_count() or 1
    avail_gb = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail_gb = int(line.split()[1]) / (1024 * 1024)
                    break
    except OSError:
        pass
    if avail_gb is None:
        return max(1, min(cores, 4))
    per_job_gb = 4.0 if with_cuda else 2.0  # torch-heavy translation units
    return max(1, min(cores, int(avail_gb // per_job_gb)))


# ------------------------------------------------------------------------------------------------
# Extension


def _ext_modules_and_cmdclass():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cap = cpu_capability()
    with_cuda = cuda_choice()
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs(with_cuda)))
    _log(f"CPU kernels: {cap}; CUDA kernels: {'yes' if with_cuda else 'no'}; "
         f"MAX_JOBS={os.environ['MAX_JOBS']}")

    sources = ["csrc/ops.cpp", "csrc/module.cpp"]
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std here: torch.utils.cpp_extension adds the standard its headers need (C++20 for
    # torch 2.13), for the host compiler and for nvcc.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-unknown-pragmas"] + _CAP_FLAGS[cap]
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    link_flags = ["-fopenmp", f"-Wl,-rpath,{torch_lib}"]
    define_macros = []

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _log(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        sources += ["csrc/cuda_glue.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("DPO_FAST_WITH_CUDA", "1"))
        ext = CUDAExtension(
            name="dpo_fast._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            name="dpo_fast._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _ext_modules_and_cmdclass()

# name, description and requires-python (>=3.10) are static metadata in pyproject.toml;
# the fields below are declared `dynamic` there.
setup(
    version=_version(),
    # the library, and beside it the tools (benchmark harness, paper reproduction, demo) it never imports
    packages=find_packages(include=["dpo_fast", "dpo_fast.*", "dpo_fast_tools", "dpo_fast_tools.*"]),
    package_data={"dpo_fast_tools": ["data_files/*"]},
    include_package_data=False,
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    install_requires=[
        "torch>=2.5",
        "numpy",
        "tqdm",
        "transformers>=4.45",
        "datasets>=2.19",
        "tokenizers",
        "safetensors",
        "pyarrow",
    ],
    extras_require={
        "triton": ["triton"],
        "bench": ["matplotlib", "pandas"],
        "test": ["pytest", "psutil", "gguf>=0.10.0"],  # psutil: the launcher-death test finds torchrun's workers; gguf: the GGUF tests
        # dpo_fast.integrations.trl (tested with trl 1.16.0). No torch here: trl needs none itself, and
        # accelerate's torch>=2.6 / peft's torch>=1.13 are met by the torch already installed, so pip
        # keeps it (checked with pip install --dry-run --no-index against torch 2.13).
        "trl": ["trl==1.16.0", "peft>=0.13"],
        "peft": ["peft>=0.21"],  # dpo-fast train --lora-*: tested with peft 0.21
        # --model FILE.gguf: transformers' GGUF reading and dequantization (tested with gguf 0.19.0)
        "gguf": ["gguf>=0.10.0"],
    },
    entry_points={"console_scripts": ["dpo-fast = dpo_fast.cli:main"]},
    zip_safe=False,
)
