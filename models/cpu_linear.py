"""One row of activations times a weight matrix on CPU, y = x W^T for a single token: the
projections of batch-1 decode, which stream every weight once per step.

Inductor's code for one row (the reduction of compiler/passes.py) walks the weight rows one
after another, converting bfloat16 to float32 with separate multiplies and adds; on a
Xeon (AVX-512, AVX512-BF16) its SmolLM2 MLP piece streamed float32 weights at about 16 GB/s
and bfloat16 at about 10. This kernel takes four rows at a time, sums bfloat16 pairs with
one instruction, and asks for rows two groups ahead, into L2, before it needs them: about
23 GB/s in either dtype on that Xeon with 30 layers' weights cycling (F.linear: 18-25 in
float32, 7-11 in bfloat16), and 41-47 GB/s in float32, 40-43 in bfloat16 on the Zen 4
EPYC here. Batch-1 decode steps on the Xeon, in one process, alternating with the
reduction: 28-30 against 20-22 ms in bfloat16, 39-44 against 31-41 ms in float32, same
greedy tokens. On AVX2 each row of a group is read in address order, one after another,
eight columns a register with bfloat16 widened by a shift; on the Zen 3 EPYC here that
made bfloat16 batch-1 decode 1.27x as fast as the four rows side by side (see
`dot4_avx2`; compiler/config.py says where the kernel is the default).

`kiln::linear_row` is an ordinary torch op, so a compiled piece calls it between the
kernels Inductor fuses around it (RMSNorm before, SiLU·mul or rotary after). Its CPU
kernel is registered from C++, so that call does not enter Python. It runs F.linear where
the kernel does not apply: other dtypes or devices, or no compiler."""

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpu_build import NEW_TENSOR, load_library

SOURCE = r"""
#include <algorithm>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>

// Asks for the 64 bytes at column i of the four rows that start at `next` (those of a later
// group, or past the matrix's end: a prefetch never faults): the hardware prefetcher stops
// at every 4 KiB page, and without this the bfloat16 rows streamed at half the speed on a
// Xeon. Into L2, not L1: on the Zen 4 EPYC here, 30 layers' weights streamed at 41-47 GB/s
// in float32 and 40-43 in bfloat16 with L2 as the target, against 29-30 and 24 with L1 (a
// C++ loop over SmolLM2's matrices).
template <typename T>
static inline void fetch_ahead(const T* next, int64_t k, int64_t i) {
  for (int r = 0; r < 4; ++r)
    _mm_prefetch(reinterpret_cast<const char*>(next + r * k + i), _MM_HINT_T1);
}
#endif

#if defined(__AVX512F__)
static inline void sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* s) {
  s[0] = _mm512_reduce_add_ps(a0);
  s[1] = _mm512_reduce_add_ps(a1);
  s[2] = _mm512_reduce_add_ps(a2);
  s[3] = _mm512_reduce_add_ps(a3);
}
#elif defined(KILN_AVX2)
// Four rows' dot products with xs (x in float) on AVX2: one row after another, each read in
// address order, 32 columns a step in four sums, asking for the line 1 KiB ahead. On the
// Zen 3 EPYC here, walking the four rows side by side instead (16 columns a step, the rows
// two groups on fetched into L2) streamed bfloat16 weights at about 15 GB/s on two cores
// against 17 this way (a C++ loop over SmolLM2's matrices), and bfloat16 batch-1 decode of
// SmolLM2 ran at 53.6 tokens/s against 68.1 this way (medians of 8 alternating rounds of
// 200 tokens in one process, faster in every round).
template <typename T>
static inline float dot1_avx2(const float* xs, const T* w, int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < k; i += 32) {
    for (size_t b = 0; b < 32 * sizeof(T); b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + i) + b + 1024, _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + i), load8(w + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + i + 8), load8(w + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + i + 16), load8(w + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + i + 24), load8(w + i + 24), a3);
  }
  return sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

template <typename T>
static inline bool dot4_avx2(const float* xs, const T* w, int64_t k, float* s) {
  if (k % 32 != 0) return false;
  for (int r = 0; r < 4; ++r) s[r] = dot1_avx2(xs, w + r * k, k);
  return true;
}
#endif

// Four rows' dot products with x, written out for AVX-512 (and AVX2): GCC's own vectorised
// loop below streamed float32 weights at 11 GB/s on the Xeon (with the rows fetched a group
// at a time), this at 23; false where this CPU or k does not allow it. `next`: the four rows
// two groups on; xs: x in float.
static inline bool dot4_by_hand(const float* x, const float* xs, const float* w, int64_t k,
                                float* s, const float* next) {
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
#elif defined(KILN_AVX2)
  return dot4_avx2(xs, w, k, s);
#else
  return false;
#endif
}

// bfloat16: pairs of products summed in float32 by one instruction (AVX512-BF16); on AVX2
// without AVX-512, the rows widened to float by `dot4_avx2`.
static inline bool dot4_by_hand(const uint16_t* x, const float* xs, const uint16_t* w,
                                int64_t k, float* s, const uint16_t* next) {
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
#elif !defined(__AVX512F__) && defined(KILN_AVX2)
  return dot4_avx2(xs, w, k, s);
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
      // Two groups on. Past the last group that is the next matrix's start, where kiln
      // lays the weights out one after another (models/huge_pages.py): bfloat16 batch-1
      // decode of SmolLM2 on the Zen 4 EPYC, four pairs of processes, 92.6 tok/s on average
      // against 88.5 stopping at the end (faster in three pairs).
      const T* next = w0 + 8 * k;
      if (!dot4_by_hand(x, xs, w0, k, s, next)) {
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

// The op's CPU kernel, registered with torch's dispatcher through its stable C interface
// (built for torch 2.11 on): Inductor's code calls it without entering Python, 6 us a call
// here against 16 for a Python kernel calling this through ctypes, 121 calls a SmolLM2 step.
#define TORCH_TARGET_VERSION (((0ULL + 2) << 56) | ((0ULL + 11) << 48))
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

using c10::ScalarType;
using torch::stable::Tensor;
""" + NEW_TENSOR + r"""

// x [..., K] holding one row, weight [N, K] -> [..., N]; what the kernel does not take
// (other dtypes, more rows, a strided weight) runs F.linear's own matmul.
static Tensor linear_row_cpu(Tensor x, Tensor weight) {
  const ScalarType dtype = x.scalar_type();
  if ((dtype != ScalarType::Float && dtype != ScalarType::BFloat16) ||
      weight.scalar_type() != dtype || weight.dim() != 2 || !weight.is_contiguous() ||
      x.dim() == 0 || x.numel() != weight.size(1)) {
    return torch::stable::matmul(x, torch::stable::transpose(weight, 0, 1));
  }
  if (!x.is_contiguous()) x = torch::stable::contiguous(x);
  const int64_t n = weight.size(0), k = weight.size(1);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = n;
  Tensor y = new_contiguous(x, sizes);
  const int threads = static_cast<int>(torch::stable::get_num_threads());
  if (dtype == ScalarType::Float) {
    linear_row(static_cast<const float*>(x.data_ptr()),
               static_cast<const float*>(weight.data_ptr()), static_cast<float*>(y.data_ptr()),
               n, k, threads);
  } else {
    linear_row(static_cast<const uint16_t*>(x.data_ptr()),
               static_cast<const uint16_t*>(weight.data_ptr()),
               static_cast<uint16_t*>(y.data_ptr()), n, k, threads);
  }
  return y;
}

STABLE_TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("linear_row", TORCH_BOX(&linear_row_cpu)); }

// A recorded call of the op (models/cpu_linear.py, `bind_recorded_row`) made again on the
// recorded tensors, the result written in place: no dispatcher, no new tensor.
struct RowCall { const void* x; const void* w; void* y; int64_t n, k, threads, is_float; };
extern "C" int linear_row_recorded(const RowCall* c) {
  if (c->is_float) {
    linear_row(static_cast<const float*>(c->x), static_cast<const float*>(c->w),
               static_cast<float*>(c->y), c->n, c->k, static_cast<int>(c->threads));
  } else {
    linear_row(static_cast<const uint16_t*>(c->x), static_cast<const uint16_t*>(c->w),
               static_cast<uint16_t*>(c->y), c->n, c->k, static_cast<int>(c->threads));
  }
  return 0;
}
"""

_LIB = torch.library.Library("kiln", "FRAGMENT")
_LIB.define("linear_row(Tensor x, Tensor weight) -> Tensor")
# Until the kernel is loaded, and on other devices: F.linear.
_LIB.impl("linear_row", F.linear, "CompositeExplicitAutograd")

_library: list[ctypes.CDLL] = []  # the loaded kernel: one per process, it cannot be unloaded


def load_linear_kernel(build_dir: Path) -> bool:
    """Build (once, into `build_dir`) and load the CPU kernel behind `kiln::linear_row`;
    False (with a warning) when it cannot be, and the op runs F.linear."""
    if not _library:
        library = load_library("linear_row", SOURCE, build_dir, "F.linear", torch_op=True)
        if library is None:
            return False
        library.linear_row_recorded.restype = ctypes.c_int
        library.linear_row_recorded.argtypes = [ctypes.c_void_p]
        _library.append(library)
    return True


class _RowCall(ctypes.Structure):  # the C struct RowCall
    _fields_ = [("x", ctypes.c_void_p), ("w", ctypes.c_void_p), ("y", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("threads", ctypes.c_int64),
                ("is_float", ctypes.c_int64)]


class RecordedRow:
    """A recorded call of `kiln::linear_row` made again by its kernel, which writes the
    recorded result itself (see `bind_recorded_row`)."""

    def __init__(self, args: tuple, result: torch.Tensor, call: _RowCall):
        self.args, self.result = args, result  # what the pointers in `call` name
        self.call = call
        self.run, self.pointer = _library[0].linear_row_recorded, ctypes.byref(call)

    def __call__(self) -> None:
        self.run(self.pointer)

    def c_call(self) -> tuple[int, list[int]]:
        """The kernel's C function and its argument, for a C loop of recorded steps
        (graphs/chain.py)."""
        return ctypes.cast(self.run, ctypes.c_void_p).value, [ctypes.addressof(self.call)]


def bind_recorded_row(op, args: tuple, kwargs: dict, result) -> RecordedRow | None:
    """A recorded call of `kiln::linear_row` (compiler/inductor.py's Replay) made again
    without the dispatcher and without a new result tensor to copy, so that a one-token
    step's layers run from one C loop (graphs/chain.py); None for other ops, and where the
    kernel would not take these tensors as they are."""
    if not _library or op is not torch.ops.kiln.linear_row.default or kwargs or \
            len(args) != 2 or not isinstance(result, torch.Tensor):
        return None
    x, weight = args
    dtype = x.dtype
    if dtype not in (torch.float32, torch.bfloat16) or weight.dtype != dtype or \
            weight.dim() != 2 or not weight.is_contiguous() or not x.is_contiguous() or \
            x.numel() != weight.shape[1] or result.dtype != dtype or \
            not result.is_contiguous() or result.numel() != weight.shape[0] or \
            x.device.type != "cpu":
        return None
    return RecordedRow(args, result, _RowCall(
        x.data_ptr(), weight.data_ptr(), result.data_ptr(), weight.shape[0], weight.shape[1],
        torch.get_num_threads(), dtype == torch.float32))


@torch.library.register_fake("kiln::linear_row")
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
