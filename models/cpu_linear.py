"""One row of activations times a weight matrix on CPU, y = x W^T for a single token: the
projections of batch-1 decode, which stream every weight once per step.

Inductor's code for one row (the reduction of compiler/passes.py) walks the weight rows one
after another, converting bfloat16 to float32 with separate multiplies and adds; on this
machine's Xeon (AVX-512, AVX512-BF16) its SmolLM2 MLP piece streamed float32 weights at
about 16 GB/s and bfloat16 at about 10. This kernel takes four rows at a time, sums
bfloat16 pairs with one instruction, and asks for rows two groups ahead before it needs
them: about 23 GB/s in either dtype with 30 layers' weights cycling (F.linear: 18-25 in
float32, 7-11 in bfloat16). Batch-1 decode steps in one process, alternating with the
reduction: 28-30 against 20-22 ms in bfloat16, 39-44 against 31-41 ms in float32, same
greedy tokens.

`kiln::linear_row` is an ordinary torch op, so a compiled piece calls it between the
kernels Inductor fuses around it (RMSNorm before, SiLU·mul or rotary after). It runs
F.linear where the kernel does not apply: other dtypes or devices, or no compiler."""

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpu_build import entry_points, load_library

SOURCE = r"""
#include <algorithm>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>

// Asks for the 64 bytes at column i of the four rows that start at `next` (those of a later
// group), if any: the hardware prefetcher stops at every 4 KiB page, and without this the
// bfloat16 rows streamed at half the speed here.
template <typename T>
static inline void fetch_ahead(const T* next, int64_t k, int64_t i) {
  if (next == nullptr) return;
  for (int r = 0; r < 4; ++r)
    _mm_prefetch(reinterpret_cast<const char*>(next + r * k + i), _MM_HINT_T0);
}

static inline void sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* s) {
  s[0] = _mm512_reduce_add_ps(a0);
  s[1] = _mm512_reduce_add_ps(a1);
  s[2] = _mm512_reduce_add_ps(a2);
  s[3] = _mm512_reduce_add_ps(a3);
}
#endif

// Four rows' dot products with x, written out for AVX-512: GCC's own vectorised loop below
// streamed float32 weights at 11 GB/s here (with the rows fetched a group at a time), this
// at 23; false where this CPU or k does not allow it. `next`: the four rows two groups on,
// or null.
static inline bool dot4_by_hand(const float* x, const float* w, int64_t k, float* s,
                                const float* next) {
#if defined(__AVX512F__)
  if (k % 16 != 0) return false;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < k; i += 16) {
    fetch_ahead(next, k, i);
    const __m512 xv = _mm512_loadu_ps(x + i);
    a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + i), a0);
    a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + k + i), a1);
    a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 2 * k + i), a2);
    a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 3 * k + i), a3);
  }
  sum4(a0, a1, a2, a3, s);
  return true;
#else
  return false;
#endif
}

// bfloat16: pairs of products summed in float32 by one instruction (AVX512-BF16).
static inline bool dot4_by_hand(const uint16_t* x, const uint16_t* w, int64_t k, float* s,
                                const uint16_t* next) {
#if defined(__AVX512BF16__)
  if (k % 32 != 0) return false;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  auto load = [](const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); };
  for (int64_t i = 0; i < k; i += 32) {
    fetch_ahead(next, k, i);
    const __m512bh xv = load(x + i);
    a0 = _mm512_dpbf16_ps(a0, xv, load(w + i));
    a1 = _mm512_dpbf16_ps(a1, xv, load(w + k + i));
    a2 = _mm512_dpbf16_ps(a2, xv, load(w + 2 * k + i));
    a3 = _mm512_dpbf16_ps(a3, xv, load(w + 3 * k + i));
  }
  sum4(a0, a1, a2, a3, s);
  return true;
#else
  return false;
#endif
}

// y[r] = sum_i x[i] w[r, i] for r < n: w [n, k] row-major.
template <typename T>
static void linear_row(const T* x, const T* w, T* y, int64_t n, int64_t k, int num_threads) {
  std::vector<float> xf(k);
  for (int64_t i = 0; i < k; ++i) xf[i] = to_float(x[i]);
  const float* xs = xf.data();
  const int64_t groups = (n + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = 4 * g;
    if (r0 + 4 <= n) {
      const T* w0 = w + r0 * k;
      float s[4] = {0.f, 0.f, 0.f, 0.f};
      const T* next = r0 + 12 <= n ? w0 + 8 * k : nullptr;  // two groups on
      if (!dot4_by_hand(x, w0, k, s, next)) {
        const T* w1 = w0 + k;
        const T* w2 = w1 + k;
        const T* w3 = w2 + k;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t i = 0; i < k; ++i) {
          const float xi = xs[i];
          s0 += xi * to_float(w0[i]);
          s1 += xi * to_float(w1[i]);
          s2 += xi * to_float(w2[i]);
          s3 += xi * to_float(w3[i]);
        }
        s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
      }
      for (int r = 0; r < 4; ++r) store(y + r0 + r, s[r]);
    } else {
      for (int64_t r = r0; r < n; ++r) {
        const T* wr = w + r * k;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < k; ++i) s += xs[i] * to_float(wr[i]);
        store(y + r, s);
      }
    }
  }
}

extern "C" void kiln_linear_row_f32(const float* x, const float* w, float* y, int64_t n,
                                    int64_t k, int num_threads) {
  linear_row(x, w, y, n, k, num_threads);
}
extern "C" void kiln_linear_row_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y,
                                     int64_t n, int64_t k, int num_threads) {
  linear_row(x, w, y, n, k, num_threads);
}
"""

_functions: dict[torch.dtype, ctypes._CFuncPtr] = {}  # filled by `load_linear_kernel`

_LIB = torch.library.Library("kiln", "FRAGMENT")
_LIB.define("linear_row(Tensor x, Tensor weight) -> Tensor")


def load_linear_kernel(build_dir: Path) -> bool:
    """Build (once, into `build_dir`) and load the kernel behind `kiln::linear_row` on CPU;
    False (with a warning) when it cannot be, and the op runs F.linear."""
    if _functions:
        return True
    library = load_library("linear_row", SOURCE, build_dir, "F.linear")
    if library is None:
        return False
    _functions.update(entry_points(library, "kiln_linear_row", None,
                                   [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int]))
    return True


def _linear_row(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] -> [..., N]."""
    fn = _functions.get(x.dtype)
    if fn is None or weight.dtype != x.dtype or x.numel() != weight.shape[1] or \
            not weight.is_contiguous():
        return F.linear(x, weight)
    x = x.contiguous()
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), weight.shape[0], weight.shape[1],
       torch.get_num_threads())
    return out


_LIB.impl("linear_row", _linear_row, "CPU")
_LIB.impl("linear_row", F.linear, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::linear_row")
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
