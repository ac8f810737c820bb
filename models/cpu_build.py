"""Building kiln's own C++ kernels for CPU (models/cpu_attention.py, models/cpu_linear.py):
each source is compiled once with g++ (Inductor's compiler on CPU) into a library kept in
a build directory, keyed by its source, flags and this CPU, and loaded with ctypes: either
plain functions called through ctypes (no torch headers to compile: about a second), or a
torch op's kernel registered with the dispatcher through torch's stable C interface as the
library loads (its small headers: about 3 s)."""

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger("kiln")

# Each kernel takes float32 or bfloat16, one entry point per dtype: `<name>_f32`, `<name>_bf16`.
_SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}
KERNEL_DTYPES = tuple(_SUFFIXES)

# Loads and stores of float and bfloat16 (the upper 16 bits of a float, held as uint16_t)
# for kernels that take either; their sums are always taken in float.
NUMBERS = r"""
#include <cstdint>
#include <cstring>

static inline float to_float(float x) { return x; }
static inline float to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
static inline void store(float* p, float x) { *p = x; }
static inline void store(uint16_t* p, float x) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  *p = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#if defined(__AVX2__) && defined(__FMA__)
#define KILN_AVX2 1  // the kernels' AVX2 paths apply
#include <immintrin.h>

// Eight values as floats, for the kernels' AVX2 paths.
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif
"""

# For kernels registered through torch's stable C interface, after its headers: a new
# contiguous tensor from the op kernel's own allocation. `torch::stable::new_empty` and
# `contiguous` call the dispatcher by the op's name, which cost `kiln::linear_row` about
# 2 us of its 4 a call here (121 calls a SmolLM2 decode step).
NEW_TENSOR = r"""
#include <vector>
static torch::stable::Tensor new_contiguous(const torch::stable::Tensor& like,
                                            const std::vector<int64_t>& sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= sizes[i];
  }
  int32_t dtype, device_type, device_index;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(like.get(), &dtype));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(like.get(), &device_index));
  AtenTensorHandle out;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), dtype, device_type,
      device_index, &out));
  return torch::stable::Tensor(out);
}
"""

COMPILER = "g++"
# fast-math lets the compiler vectorise dot products, sums and exponentials (2x here); the
# kernels never produce or compare infinities, so finite-math is safe too.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _cpu_signature() -> str:
    """What -march=native compiles for: a library built on another CPU must not load here."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _torch_flags() -> tuple[list[str], list[str]]:
    """Flags to compile against torch's headers, and to link its library (after the
    source: the linker drops libraries nothing before them needs)."""
    root = Path(torch.__file__).parent
    return [f"-I{root / 'include'}"], [f"-L{root / 'lib'}", "-ltorch_cpu",
                                       f"-Wl,-rpath,{root / 'lib'}"]


def _build(name: str, source: str, build_dir: Path, torch_op: bool) -> Path:
    compile_flags, link_flags = _torch_flags() if torch_op else ([], [])
    key = hashlib.sha256("|".join([source, COMPILER, *FLAGS, *compile_flags, *link_flags,
                                   torch.__version__, _cpu_signature()])
                         .encode()).hexdigest()[:24]
    library = build_dir / f"{name}-{key}.so"
    if library.exists():
        return library
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
        path = Path(tmp) / f"{name}.cpp"
        path.write_text(source)
        built = Path(tmp) / library.name
        subprocess.run([COMPILER, *FLAGS, *compile_flags, str(path), "-o", str(built),
                        *link_flags], check=True, capture_output=True, text=True)
        os.replace(built, library)  # atomic: a concurrent build leaves one whole library
    return library


def load_library(name: str, source: str, build_dir: Path, fallback: str,
                 torch_op: bool = False) -> ctypes.CDLL | None:
    """The library built from `source` (NUMBERS prepended) into `build_dir` if it is not
    there yet (`torch_op`: with torch's headers and library); None, with a warning naming
    `fallback`, when it cannot be built or loaded."""
    try:
        return ctypes.CDLL(str(_build(name, NUMBERS + source, build_dir, torch_op)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("CPU %s kernel unavailable (%s); using %s", name.replace("_", " "),
                       detail.strip().splitlines()[-1] if detail.strip() else e, fallback)
        return None


def entry_points(library: ctypes.CDLL, name: str, restype, argtypes: list) -> dict:
    """dtype -> the library's `<name>_<dtype>` function, typed for ctypes."""
    functions = {}
    for dtype, suffix in _SUFFIXES.items():
        fn = getattr(library, f"{name}_{suffix}")
        fn.restype, fn.argtypes = restype, argtypes
        functions[dtype] = fn
    return functions
