"""Builds csrc/decode.c at first use and loads it (ctypes): the C compiler is the only
requirement, no torch headers, so a build takes about a second. The shared object is cached
under ``$SERVELM_CACHE_DIR`` (default ``~/.cache/servelm``), keyed by the source, the compiler
and the flags; a machine without a compiler gets None (and the PyTorch path) with one notice.

The struct classes here mirror the C ones field for field (``sl_mat``, ``sl_lora``,
``sl_proj``, ``sl_layer``, ``sl_model``)."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "decode.c")

# sl_mat.type values (ggml type ids for the block formats), and its scale_dtype values
SL_F32, SL_BF16, SL_Q4_0, SL_Q4_1, SL_Q8_0 = 0, 1, 2, 3, 8
SCALE_DTYPES = {"float16": 0, "bfloat16": 1, "float32": 2}

_P = ctypes.c_void_p


class SlMat(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
                ("out_off", ctypes.c_int32), ("group", ctypes.c_int32),
                ("scale_dtype", ctypes.c_int32), ("row_bytes", ctypes.c_int64), ("data", _P),
                ("d", _P), ("m", _P)]


class SlLora(ctypes.Structure):
    _fields_ = [("a", _P), ("b", _P), ("rank", ctypes.c_int32), ("nparts", ctypes.c_int32),
                ("bf16", ctypes.c_int32), ("pad", ctypes.c_int32), ("off", ctypes.c_int32 * 4)]


class SlProj(ctypes.Structure):
    _fields_ = [("nparts", ctypes.c_int32), ("n", ctypes.c_int32), ("part", SlMat * 3),
                ("bias", _P), ("lora", SlLora)]


class SlLayer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("ffn_norm", _P), ("q_norm", _P), ("k_norm", _P),
                ("qkv", SlProj), ("o", SlProj), ("gate_up", SlProj), ("down", SlProj),
                ("k_cache", _P), ("v_cache", _P)]


class SlModel(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int32), ("n_heads", ctypes.c_int32),
                ("n_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32),
                ("inter", ctypes.c_int32), ("n_layers", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("block_size", ctypes.c_int32),
                ("kv_bf16", ctypes.c_int32), ("max_ctx", ctypes.c_int32),
                ("max_rows", ctypes.c_int32), ("lora_rank", ctypes.c_int32),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("cos_sin", _P), ("final_norm", _P), ("head", SlProj),
                ("layers", ctypes.POINTER(SlLayer))]


def _flags() -> list[str]:
    arch = ["-mcpu=native"] if platform.machine() in ("aarch64", "arm64") else ["-march=native"]
    return ["-O3", *arch, "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=fast"]


def _cache_dir() -> str:
    base = os.environ.get("SERVELM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "servelm")
    return os.path.join(base, "cpu_kernels")


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str) -> str:
    with open(SOURCE, "rb") as f:
        src = f.read()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(src + version.encode() + " ".join(_flags()).encode()
                         + platform.node().encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    path = os.path.join(out_dir, f"decode-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    src_copy = tmp[:-3] + ".c"  # compiled from the bytes hashed, whatever the file is now
    with open(src_copy, "wb") as f:
        f.write(src)
    try:  # built beside, renamed into place: concurrent builders never load half a file
        r = subprocess.run([cc, *_flags(), src_copy, "-o", tmp, "-lm"], capture_output=True,
                           text=True)
        if r.returncode:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-800:]}")
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, src_copy):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return path


@functools.lru_cache(maxsize=1)
def load() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (no C compiler, or the build failed: logged once)."""
    import torch  # noqa: F401  (its libgomp first: the kernels share torch's OpenMP runtime)
    cc = _compiler()
    if cc is None:
        logger.warning("CPU fast path off: no C compiler (cc/gcc/clang) found; decode runs the "
                       "PyTorch path (slower). Install gcc to enable it.")
        return None
    try:
        lib = ctypes.CDLL(_build(cc))
    except (RuntimeError, OSError) as e:
        logger.warning("CPU fast path off: building its kernels failed (%s); decode runs the "
                       "PyTorch path (slower).", e)
        return None
    i32, i64, f32 = ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.sl_scratch_floats.argtypes = [ctypes.POINTER(SlModel), i32]
    lib.sl_scratch_floats.restype = i64
    lib.sl_decode.argtypes = [ctypes.POINTER(SlModel), i32, _P, _P, _P, _P, i32, _P, _P, _P, _P,
                              i32, _P, _P]
    lib.sl_decode.restype = i32
    lib.sl_linear.argtypes = [ctypes.POINTER(SlProj), i32, _P, _P, _P, i32]
    lib.sl_linear.restype = i32
    lib.sl_dequantize.argtypes = [ctypes.POINTER(SlMat), _P, i32, i32]
    lib.sl_dequantize.restype = i32
    lib.sl_linear_scratch.argtypes = [i32, i32]
    lib.sl_linear_scratch.restype = i64
    lib.sl_attention.argtypes = [_P, _P, _P, _P, i32, _P, i32, _P, i32, i32, i32, i32, i32, f32,
                                 _P, i32, i32]
    lib.sl_attention.restype = i32
    lib.sl_silu_mul.argtypes = [_P, _P, i64, i64, i32]
    lib.sl_silu_mul.restype = i32
    lib.sl_rms_norm.argtypes = [_P, _P, _P, _P, _P, i64, i32, f32, i32]
    lib.sl_rms_norm.restype = i32
    lib.sl_rope.argtypes = [_P, _P, i64, i64, _P, _P, _P, _P, i64, i32, i32, i32, i32]
    lib.sl_rope.restype = i32
    level = simd_level()
    if level == "portable":
        logger.warning("CPU fast path: this CPU has neither AVX-512 nor AVX2 with FMA; its "
                       "kernels run as portable C (auto-vectorised, slower)")
    elif level == "avx2":
        logger.info("CPU fast path: this CPU has no AVX-512; its kernels run on AVX2 + FMA "
                    "(8-lane vectors)")
    return lib


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


@functools.lru_cache(maxsize=1)  # the CPU does not change under a process; read per matmul
def simd_level() -> str:
    """The vector width csrc/decode.c's kernels take on this CPU (it is built -march=native):
    "avx512" (16 fp32 lanes), "avx2" (8 lanes, with FMA) or "portable" (plain C)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "portable"
    flags = _cpu_flags()
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "portable"


def has_avx512() -> bool:
    return simd_level() == "avx512"
