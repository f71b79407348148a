"""Builds llama.cpp's own programs (llama-bench, llama-batched-bench, llama-server) from the
llama.cpp sources inside the llama-cpp-python source distribution: the only download is that
sdist, from the package registry. The build is cached under
``~/.cache/servelm/llamacpp/<version>``.

    python benchmarks/llamacpp_build.py [--version 0.3.36]   # prints the bin directory

The CPU features come from /proc/cpuinfo rather than -march=native: on a VM that lists AMX but
does not grant its tile state, ggml's native build runs AMX instructions and dies on SIGILL
(seen on the 2-core CPU machine), so AMX is left off and every other feature set explicitly.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile

TARGETS = ("llama-bench", "llama-batched-bench", "llama-server")
# /proc/cpuinfo flag -> ggml CMake option
_FEATURES = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
             "bmi2": "GGML_BMI2", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
             "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16",
             "avx_vnni": "GGML_AVX_VNNI"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cmake_flags() -> list[str]:
    flags = _cpu_flags()
    out = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
           "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF",
           "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    out += [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in _FEATURES.items()]
    return out


def ensure_llamacpp(version: str = "0.3.36", cache: str | None = None) -> str:
    """The directory holding llama.cpp's programs, built first if not yet cached."""
    cache = cache or os.path.join(os.path.expanduser("~/.cache/servelm/llamacpp"), version)
    bin_dir = os.path.join(cache, "build", "bin")
    if all(os.path.exists(os.path.join(bin_dir, t)) for t in TARGETS):
        return bin_dir
    os.makedirs(cache, exist_ok=True)
    sdists = glob.glob(os.path.join(cache, "llama_cpp_python-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"llama-cpp-python=={version}", "-d", cache], check=True)
        sdists = glob.glob(os.path.join(cache, "llama_cpp_python-*.tar.gz"))
    src = os.path.join(cache, "src")
    if not os.path.isdir(src):
        with tarfile.open(sdists[0]) as t:
            t.extractall(src, filter="data")
    root = glob.glob(os.path.join(src, "llama_cpp_python-*", "vendor", "llama.cpp"))[0]
    build = os.path.join(cache, "build")
    gen = ["-G", "Ninja"] if _which("ninja") else []
    subprocess.run(["cmake", "-S", root, "-B", build, *gen, *cmake_flags()], check=True)
    subprocess.run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2), "--target",
                    *TARGETS], check=True)
    return bin_dir


def _which(name: str) -> bool:
    from shutil import which
    return which(name) is not None


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="0.3.36")
    print(ensure_llamacpp(ap.parse_args().version))
