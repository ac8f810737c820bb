"""Attention over the paged KV cache on CPU, as one C++ loop that reads each cached key and
value where it lies.

The torch path first gathers every sequence's blocks into a contiguous copy, then runs
SDPA on it; for 64 sequences of 192 tokens that copy and SDPA's one-query flash loop took
5-7 ms per layer here, 40 % of a decode step. This kernel walks the block table instead:
for each query row it scores every query head against the keys, takes the softmax and sums
the values, reading each cached key and value once (1.0 ms for the same batch on the AVX2
EPYC of earlier notes). On AVX-512 the scores and value sums are written out by hand: on
a Xeon, 64 sequences of 192 tokens in bfloat16 took 1.1-1.3 ms a layer instead of
1.4-1.7 with GCC's loops (0.6 instead of 0.76 with the cache hot); in a 64-sequence
generation, 13 % more tokens/s in bfloat16 and 10 % in float32. On AVX2 they are written
out for eight floats a register: on the Zen 3 EPYC here, float32 per layer (median of 20
calls, two processes each), 16 prompts of 128 tokens took 6.8 ms instead of 9.6-10.6 with
GCC's loops, one 2048-token prompt 97-101 instead of 111-125, 64 sequences of 192 tokens
0.67-0.81 instead of 0.91-0.98.

A decode row, its sequence's only one in the step, finds its keys and values in memory,
not in the caches: on AVX2 it walks them once, 16 positions at a time, each chunk's rows
first loaded in address order (`attend_in_one_pass`). In a 64-prompt generation on the Zen
3 EPYC here (128 tokens each), the kernel's share of the decode steps' CPU samples fell
from 19.6-22.0 % to 14.7-15.1 % (perf, two processes each, alternating), while oneDNN's
unchanged products rose from 61.8-62.3 % to 65.2-67.9 %.

A prefill chunk's tokens are rows like decodes, each over its sequence up to its own
position, with no padding, mask or gather; per layer on the Zen 4 EPYC here (one process,
alternating, caches flushed between calls) a 2048-token step of 16 prompts took 3.5 ms
against the torch path's 7.6 in bfloat16 (5.3 against 7.9 in float32), one 2048-token
prompt 44 against 77 ms (73 against 81), one 32-token prompt 0.11 against 0.41 ms.

The same call first writes the step's new keys and values into their slots and zero-fills
the padded rows: with every weight streaming through the caches between layers, each
separate torch call (index_copy_, slices, cat) costs 10-20 us here.

The library also registers the CPU kernel of the attention op, `kiln::paged_attention`,
through torch's stable C interface. The runtime hands it each step's metadata once
(`DecodeKernel.begin_step`), so a compiled decoder layer calls the attention like any
other op, without entering Python, and a layer compiles as one piece instead of two split
at the attention: a SmolLM2 decode step then makes 30 compiled calls instead of 60 pieces
and 30 Python attention calls.

It is built on first use (models/cpu_build.py). Without a working compiler the torch path
runs instead."""

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch

from . import attention  # noqa: F401  defines kiln::paged_attention, whose CPU kernel this builds
from .cpu_build import (
    KERNEL_DTYPES,
    NEW_TENSOR,
    entry_points,
    load_library,
)

SOURCE = r"""
#include <cmath>
#include <cstdlib>
#include <type_traits>

// Asks for the cached row (`bytes` long) at `row` ahead of its use: consecutive positions
// lie in blocks scattered over the cache, where the hardware prefetcher loses the stream.
// Into L2 rather than L1 (locality 2): on the Zen 4 EPYC here, a 64-sequence bfloat16
// generation spent 2.6 s in this kernel instead of 3.1.
static inline void fetch_row(const void* row, size_t bytes) {
  for (size_t b = 0; b < bytes; b += 64)
    __builtin_prefetch(static_cast<const char*>(row) + b, 0, 2);
}

// Where the float rows of positions [i0, i0 + m) lie, m = min(W, n - i0), into `rows`:
// float32 keys where they are cached, bfloat16 ones converted into `converted` (W rows of
// scratch). The next W positions' rows are fetched meanwhile. Returns m.
template <int W, typename T>
static inline int key_rows(const T* k_cache, const int64_t* where, int64_t i0, int64_t n,
                           int64_t slot, float* converted, const float** rows) {
  const int m = n - i0 < W ? static_cast<int>(n - i0) : W;
  for (int64_t i = i0 + W; i < n && i < i0 + 2 * W; ++i)
    fetch_row(k_cache + where[i], sizeof(T) * slot);
  for (int p = 0; p < m; ++p) {
    const T* k = k_cache + where[i0 + p];
    if constexpr (std::is_same_v<T, float>) {
      rows[p] = k;
    } else {
      float* row = converted + p * slot;
      for (int64_t j = 0; j < slot; ++j) row[j] = to_float(k[j]);
      rows[p] = row;
    }
  }
  return m;
}

#if defined(__AVX512F__)
#include <immintrin.h>

// The kDim values of one head's row as float registers.
template <int kDim>
static inline void load_row(const float* p, __m512* r) {
  for (int j = 0; j < kDim / 16; ++j) r[j] = _mm512_loadu_ps(p + 16 * j);
}
template <int kDim>
static inline void load_row(const uint16_t* p, __m512* r) {
  for (int j = 0; j < kDim / 16; ++j) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * j));
    r[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
}

// Lane j of the result: the sum of v[j]'s lanes (a transpose folded into the additions).
static inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)
    a[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                         _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j)
    b[j] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int j = 0; j < 2; ++j)
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

// The same for AVX2 without AVX-512 (the Zen 3 EPYC here), eight floats a register: lane j
// of the result is the sum of v[j]'s lanes.
#if defined(KILN_AVX2) && !defined(__AVX512F__)
#define KILN_ATTEND_AVX2 1
static inline __m256 sums8(const __m256* v) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}
#endif

// Scaled scores of every query head against positions' keys (rows at `where`), written
// out for AVX-512: sixteen positions' dot products summed together by `sum16` instead of
// one horizontal sum each, which GCC's loop spent most of its time on. bfloat16 keys are
// multiplied where they lie by AVX512-BF16's pairwise dot product (the query, converted
// from bfloat16, converts back exactly; products are exact, sums float32); without it they
// are converted once into `converted` (16 rows of float scratch) instead of once per query
// head. 64 sequences of 192 positions, caches hot: 0.28 ms instead of 0.37 here. False
// where this CPU or kDim does not allow it.
template <int kDim, typename T>
static inline bool scores_by_hand(const float* q, const T* k_cache, const int64_t* where,
                                  int64_t n, int64_t num_kv_heads, int64_t group, float scale,
                                  float* scores, float* converted) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, uint16_t> && kDim > 0 && kDim % 32 == 0) {
    constexpr int P = kDim / 32;
    const int64_t slot = num_kv_heads * kDim;
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
      const int m = n - i0 < 16 ? static_cast<int>(n - i0) : 16;
      for (int64_t i = i0 + 16; i < n && i < i0 + 32; ++i)
        fetch_row(k_cache + where[i], sizeof(T) * slot);
      for (int64_t r = 0; r < num_kv_heads * group; ++r) {
        const int64_t head = (r / group) * kDim;
        __m512bh qb[P];
        for (int j = 0; j < P; ++j)
          qb[j] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + r * kDim + 32 * j + 16),
                                      _mm512_loadu_ps(q + r * kDim + 32 * j));
        __m512 acc[16];
        for (int p = 0; p < 16; ++p) {
          acc[p] = _mm512_setzero_ps();
          if (p >= m) continue;
          const T* k = k_cache + where[i0 + p] + head;
          for (int j = 0; j < P; ++j)
            acc[p] = _mm512_dpbf16_ps(acc[p], qb[j],
                                      (__m512bh)_mm512_loadu_si512(k + 32 * j));
        }
        _mm512_mask_storeu_ps(scores + r * n + i0, static_cast<__mmask16>((1u << m) - 1),
                              _mm512_mul_ps(sum16(acc), scale_v));
      }
    }
    return true;
  }
#endif
#if defined(__AVX512F__)
  if constexpr (kDim > 0 && kDim % 16 == 0) {
    constexpr int R = kDim / 16;
    const int64_t slot = num_kv_heads * kDim;
    const __m512 scale_v = _mm512_set1_ps(scale);
    const float* rows[16];
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
      const int m = key_rows<16>(k_cache, where, i0, n, slot, converted, rows);
      for (int64_t r = 0; r < num_kv_heads * group; ++r) {
        const int64_t head = (r / group) * kDim;
        __m512 qr[R], acc[16];
        load_row<kDim>(q + r * kDim, qr);
        for (int p = 0; p < 16; ++p) {
          acc[p] = _mm512_setzero_ps();
          if (p >= m) continue;
          for (int j = 0; j < R; ++j)
            acc[p] = _mm512_fmadd_ps(qr[j], _mm512_loadu_ps(rows[p] + head + 16 * j), acc[p]);
        }
        _mm512_mask_storeu_ps(scores + r * n + i0, static_cast<__mmask16>((1u << m) - 1),
                              _mm512_mul_ps(sum16(acc), scale_v));
      }
    }
    return true;
  }
#endif
#if defined(KILN_ATTEND_AVX2)
  if constexpr (kDim > 0 && kDim % 8 == 0) {
    constexpr int R = kDim / 8;
    const int64_t slot = num_kv_heads * kDim;
    const __m256 scale_v = _mm256_set1_ps(scale);
    const float* rows[8];
    for (int64_t i0 = 0; i0 < n; i0 += 8) {
      const int m = key_rows<8>(k_cache, where, i0, n, slot, converted, rows);
      for (int p = m; p < 8; ++p) rows[p] = rows[0];  // lanes past n: summed, not stored
      for (int64_t r = 0; r < num_kv_heads * group; ++r) {
        const float* k_head[8];
        for (int p = 0; p < 8; ++p) k_head[p] = rows[p] + (r / group) * kDim;
        __m256 acc[8];
        for (int p = 0; p < 8; ++p) acc[p] = _mm256_setzero_ps();
        for (int j = 0; j < R; ++j) {
          const __m256 qj = _mm256_loadu_ps(q + r * kDim + 8 * j);
          for (int p = 0; p < 8; ++p)
            acc[p] = _mm256_fmadd_ps(qj, _mm256_loadu_ps(k_head[p] + 8 * j), acc[p]);
        }
        const __m256 scaled = _mm256_mul_ps(sums8(acc), scale_v);
        if (m == 8) {
          _mm256_storeu_ps(scores + r * n + i0, scaled);
        } else {
          alignas(32) float lanes[8];
          _mm256_store_ps(lanes, scaled);
          for (int p = 0; p < m; ++p) scores[r * n + i0 + p] = lanes[p];
        }
      }
    }
    return true;
  }
#endif
  return false;
}

// out [rows, kDim] = the weights in `scores` times the values (rows at `where`), written out
// for AVX-512: up to four query heads of one key/value head at a time, their sums held in
// registers while every position's value row is read once for them. `accumulate`: out +=
// (a chunk's values added to the sums so far, `attend_in_one_pass`).
template <int kDim, typename T>
static inline bool values_by_hand(const float* scores, const T* v_cache, const int64_t* where,
                                  int64_t n, int64_t num_kv_heads, int64_t group, float* out,
                                  bool accumulate = false) {
#if defined(__AVX512F__)
  if constexpr (kDim > 0 && kDim % 16 == 0) {
    constexpr int R = kDim / 16;
    constexpr int G = kDim <= 64 ? 4 : 2;  // query heads at a time: G * R sum registers
    const int64_t slot = num_kv_heads * kDim;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const T* v = v_cache + h * kDim;
      for (int64_t g0 = 0; g0 < group; g0 += G) {
        const int c = group - g0 < G ? static_cast<int>(group - g0) : G;
        const float* weights = scores + (h * group + g0) * n;
        float* sums = out + (h * group + g0) * kDim;
        __m512 acc[G][R];
        for (int u = 0; u < G; ++u)
          for (int j = 0; j < R; ++j)
            acc[u][j] = accumulate && u < c ? _mm512_loadu_ps(sums + u * kDim + 16 * j)
                                            : _mm512_setzero_ps();
        for (int64_t i = 0; i < n; ++i) {
          // The whole row, every head's values, on the first head's pass: the later passes
          // find it in L2. 64 sequences of 192 positions with the cache cold: 0.56-0.59 ms
          // instead of 0.63-0.72 in bfloat16 (with the scores above), 1.09 against 1.21 in
          // float32.
          if (h == 0 && i + 16 < n) fetch_row(v_cache + where[i + 16], sizeof(T) * slot);
          __m512 vr[R];
          load_row<kDim>(v + where[i], vr);
          for (int u = 0; u < G; ++u) {
            if (u >= c) break;
            const __m512 p = _mm512_set1_ps(weights[u * n + i]);
            for (int j = 0; j < R; ++j) acc[u][j] = _mm512_fmadd_ps(p, vr[j], acc[u][j]);
          }
        }
        for (int u = 0; u < c; ++u)
          for (int j = 0; j < R; ++j) _mm512_storeu_ps(sums + u * kDim + 16 * j, acc[u][j]);
      }
    }
    return true;
  }
#endif
#if defined(KILN_ATTEND_AVX2)
  // AVX2 has 16 registers: three query heads' sums over 32 of the kDim values (12), their
  // three weights and one value register; each 32-value slice is one pass over positions.
  if constexpr (kDim > 0 && kDim % 32 == 0) {
    constexpr int G = 3;
    const int64_t slot = num_kv_heads * kDim;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const T* v = v_cache + h * kDim;
      for (int64_t g0 = 0; g0 < group; g0 += G) {
        const int c = group - g0 < G ? static_cast<int>(group - g0) : G;
        const float* weights = scores + (h * group + g0) * n;
        float* sums = out + (h * group + g0) * kDim;
        for (int d0 = 0; d0 < kDim; d0 += 32) {
          __m256 acc[G][4];
          for (int u = 0; u < G; ++u)
            for (int j = 0; j < 4; ++j)
              acc[u][j] = accumulate && u < c ? _mm256_loadu_ps(sums + u * kDim + d0 + 8 * j)
                                              : _mm256_setzero_ps();
          for (int64_t i = 0; i < n; ++i) {
            if (h == 0 && g0 == 0 && d0 == 0 && i + 16 < n)
              fetch_row(v_cache + where[i + 16], sizeof(T) * slot);
            __m256 p[G];
            for (int u = 0; u < G; ++u) p[u] = _mm256_set1_ps(u < c ? weights[u * n + i] : 0.f);
            const T* vr = v + where[i] + d0;
            for (int j = 0; j < 4; ++j) {
              const __m256 vj = load8(vr + 8 * j);
              for (int u = 0; u < G; ++u) acc[u][j] = _mm256_fmadd_ps(p[u], vj, acc[u][j]);
            }
          }
          for (int u = 0; u < c; ++u)
            for (int j = 0; j < 4; ++j) _mm256_storeu_ps(sums + u * kDim + d0 + 8 * j, acc[u][j]);
        }
      }
    }
    return true;
  }
#endif
  return false;
}

#if defined(KILN_ATTEND_AVX2)
// Loads every cache line of a position's key and value rows (what it adds up is unused):
// real loads in address order, which the hardware prefetcher follows, where software
// prefetches issued for the same rows did not make the kernel any faster here.
template <typename T>
static inline void touch_rows(const T* k, const T* v, int64_t slot, __m256* sinks) {
  constexpr int64_t kLine = 64 / sizeof(T);
  int64_t j = 0;
  for (; j + kLine < slot; j += 2 * kLine) {  // four independent sums: no chain of adds
    sinks[0] = _mm256_add_ps(sinks[0], load8(k + j));
    sinks[1] = _mm256_add_ps(sinks[1], load8(v + j));
    sinks[2] = _mm256_add_ps(sinks[2], load8(k + j + kLine));
    sinks[3] = _mm256_add_ps(sinks[3], load8(v + j + kLine));
  }
  if (j < slot) {
    sinks[0] = _mm256_add_ps(sinks[0], load8(k + j));
    sinks[1] = _mm256_add_ps(sinks[1], load8(v + j));
  }
}
#endif

// Every head of one sequence over its positions in one pass on AVX2, kChunk positions at a
// time: the chunk's key and value rows are first loaded into the caches in address order,
// then scored, and their values summed in with the softmax's running maximum and sum (a
// query head's sums are rescaled when its maximum grows). The two-pass walk (all scores,
// then all values) stalled on rows it had asked for too late: on the Zen 3 EPYC here, 64
// sequences of 192 positions with the layer's cache cold took 1.06-1.22 ms a layer instead
// of 1.29-1.41 (four runs of 15 rounds over 30 layers' caches, alternating in one process;
// reading the same rows and nothing else took 0.72-0.80), 128 positions 0.75 instead of
// 0.92. Same contract as `attend` from `where` on, for a whole row (no `stats`); `scores`:
// rows * (kChunk + 2) floats of scratch. False where kDim does not allow it.
constexpr int kChunk = 16;
template <int kDim, typename T>
static inline bool attend_in_one_pass(const float* q, const T* k_cache, const T* v_cache,
                                      const int64_t* where, int64_t n, int64_t num_kv_heads,
                                      int64_t group, float scale, float* scores,
                                      float* converted, float* out) {
#if defined(KILN_ATTEND_AVX2)
  if constexpr (kDim > 0 && kDim % 32 == 0) {
    const int64_t slot = num_kv_heads * kDim;
    const int64_t rows = num_kv_heads * group;
    float* top = scores + rows * kChunk;
    float* total = top + rows;
    for (int64_t j = 0; j < rows * kDim; ++j) out[j] = 0.f;
    for (int64_t r = 0; r < rows; ++r) top[r] = -1e30f, total[r] = 0.f;
    __m256 sinks[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int m = n - i0 < kChunk ? static_cast<int>(n - i0) : kChunk;
      for (int p = 0; p < m; ++p)
        touch_rows(k_cache + where[i0 + p], v_cache + where[i0 + p], slot, sinks);
      scores_by_hand<kDim>(q, k_cache, where + i0, m, num_kv_heads, group, scale, scores,
                           converted);
      for (int64_t r = 0; r < rows; ++r) {
        float* s = scores + r * m;
        float t = top[r];
        for (int p = 0; p < m; ++p) t = s[p] > t ? s[p] : t;
        const float rescale = std::exp(top[r] - t);
        float sum = 0.f;
        for (int p = 0; p < m; ++p) {
          s[p] = std::exp(s[p] - t);
          sum += s[p];
        }
        total[r] = total[r] * rescale + sum;
        top[r] = t;
        if (rescale != 1.f) {
          for (int64_t d = 0; d < kDim; ++d) out[r * kDim + d] *= rescale;
        }
      }
      values_by_hand<kDim>(scores, v_cache, where + i0, m, num_kv_heads, group, out, true);
    }
    volatile float keep = _mm256_cvtss_f32(  // keeps the touching loads
        _mm256_add_ps(_mm256_add_ps(sinks[0], sinks[1]), _mm256_add_ps(sinks[2], sinks[3])));
    (void)keep;
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = 1.f / total[r];
      for (int64_t d = 0; d < kDim; ++d) out[r * kDim + d] *= inv;
    }
    return true;
  }
#endif
  return false;
}

// Every head of one sequence (each key/value head shared by `group` query heads) over
// positions [start, start + n), n >= 1. kDim > 0 fixes the head size at compile time
// (unrolled, vectorised loops); 0 takes it from `dim`. `where`, `converted`: scratch for
// n offsets and 16 float rows. With `stats`, the output is left unnormalised and each
// query head's largest score and sum of exponentials go to stats[2r], stats[2r+1] (one
// part of a sequence split over positions, merged by `merge_parts`). `cold` (never with
// `stats`): the cached rows are likely in memory, not in the caches (`attend_in_one_pass`).
template <int kDim, typename T>
static void attend(const float* q, const T* k_cache, const T* v_cache,
                   const int64_t* table, int64_t start, int64_t n, int64_t block_size,
                   int64_t num_kv_heads, int64_t group, int64_t dim, float scale,
                   float* scores, int64_t* where, float* converted, float* out,
                   float* stats, bool cold) {
  const int64_t d_len = kDim > 0 ? kDim : dim;
  const int64_t slot = num_kv_heads * d_len;  // elements per cached token
  const int64_t rows = num_kv_heads * group;  // query heads
  // Where each position's cached row starts, walking the block table once.
  for (int64_t i = 0, b = start / block_size, o = start % block_size; i < n; ++i) {
    where[i] = (table[b] * block_size + o) * slot;
    if (++o == block_size) o = 0, ++b;
  }
  if (cold && attend_in_one_pass<kDim>(q, k_cache, v_cache, where, n, num_kv_heads, group,
                                       scale, scores, converted, out))
    return;
  if (!scores_by_hand<kDim>(q, k_cache, where, n, num_kv_heads, group, scale, scores,
                           converted)) {
    for (int64_t i = 0; i < n; ++i) {  // every head of a position together: one row read
      const T* k = k_cache + where[i];
      for (int64_t r = 0; r < rows; ++r) {
        const float* qr = q + r * d_len;
        const T* kr = k + (r / group) * d_len;
        float dot = 0.f;
        for (int64_t d = 0; d < d_len; ++d) dot += qr[d] * to_float(kr[d]);
        scores[r * n + i] = dot * scale;
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* sc = scores + r * n;
    float top = sc[0];
    for (int64_t i = 1; i < n; ++i) top = sc[i] > top ? sc[i] : top;
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      sc[i] = std::exp(sc[i] - top);
      sum += sc[i];
    }
    if (stats != nullptr) {
      stats[2 * r] = top;
      stats[2 * r + 1] = sum;
      continue;
    }
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < n; ++i) sc[i] *= inv;
  }
  if (values_by_hand<kDim>(scores, v_cache, where, n, num_kv_heads, group, out)) return;
  for (int64_t j = 0; j < rows * d_len; ++j) out[j] = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const T* v = v_cache + where[i];
    for (int64_t r = 0; r < rows; ++r) {
      const float p = scores[r * n + i];
      const T* vr = v + (r / group) * d_len;
      float* a = out + r * d_len;
      for (int64_t d = 0; d < d_len; ++d) a[d] += p * to_float(vr[d]);
    }
  }
}

// Combines the `parts` unnormalised outputs of query head r of one sequence (each part
// [Hq, D], its stats as `attend` writes them; a part with no positions has a sum of 0 and
// a largest score below any real one, and is skipped) into out.
template <typename T>
static void merge_parts(const float* partial, const float* stats, int64_t parts, int64_t r,
                        int64_t num_heads, int64_t dim, float* acc, T* out) {
  float top = stats[r * 2];
  for (int64_t p = 1; p < parts; ++p) {
    const float m = stats[(p * num_heads + r) * 2];
    top = m > top ? m : top;
  }
  for (int64_t d = 0; d < dim; ++d) acc[d] = 0.f;
  float total = 0.f;
  for (int64_t p = 0; p < parts; ++p) {
    const float* st = stats + (p * num_heads + r) * 2;
    if (st[1] == 0.f) continue;
    const float w = std::exp(st[0] - top);
    total += w * st[1];
    const float* part = partial + (p * num_heads + r) * dim;
    for (int64_t d = 0; d < dim; ++d) acc[d] += w * part[d];
  }
  const float inv = 1.f / total;
  T* o = out + r * dim;
  for (int64_t d = 0; d < dim; ++d) store(o + d, acc[d] * inv);
}

// S tokens, each a row: first writes their new keys and values (rows of k_new and v_new,
// each [Hkv, D] contiguous) into their cache `slots`, all of them before any query attends,
// so a slot shared by several rows (the sink slot of padding) never races with a read.
// Then attends: q rows [S, Hq, D] (heads contiguous, rows q_stride apart), row s over the
// first seq_lens[s] (>= 1) positions of its sequence, whose blocks are row table_rows[s]
// of block_tables [*, width]; caches [num_blocks, block_size, Hkv, D]; out [num_rows, Hq,
// D] contiguous, rows from S on zeroed. A prefill chunk's tokens are rows like a decode's,
// each seeing its sequence up to its own position. Query head h attends with key/value head
// h / (Hq / Hkv). window > 0 keeps the last `window` positions only. Returns 1 if scratch
// memory could not be allocated.
template <typename T>
static int decode_attention(
    const T* q, int64_t q_stride, const T* k_new, int64_t k_stride,
    const T* v_new, int64_t v_stride, const int64_t* slots, T* k_cache, T* v_cache,
    const int64_t* block_tables, const int64_t* table_rows, int64_t width,
    const int64_t* seq_lens, T* out, int64_t num_seqs, int64_t num_rows,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    float scale, int64_t window, int num_threads) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t slot_size = num_kv_heads * head_dim;
  for (int64_t t = 0; t < num_seqs; ++t) {
    const size_t bytes = sizeof(T) * slot_size;
    std::memcpy(k_cache + slots[t] * slot_size, k_new + t * k_stride, bytes);
    std::memcpy(v_cache + slots[t] * slot_size, v_new + t * v_stride, bytes);
  }
  std::memset(out + num_seqs * num_heads * head_dim, 0,
              sizeof(T) * (num_rows - num_seqs) * num_heads * head_dim);
  // A work item is a row with all its heads. With fewer rows than threads (batch-1
  // decode), each row's sequence is split instead into one part per thread over its positions,
  // whose partial outputs are then merged: every thread reads an equal share of the cache
  // (splitting by heads would give one thread 2 of SmolLM2's 3 key/value heads).
  const int64_t parts = num_seqs > 0 && num_seqs < num_threads ? num_threads : 1;
  const int64_t head_floats = num_heads * head_dim;
  float* partial = nullptr;
  float* stats = nullptr;
  if (parts > 1) {
    partial = static_cast<float*>(std::malloc(sizeof(float) * num_seqs * parts * head_floats));
    stats = static_cast<float*>(std::malloc(sizeof(float) * num_seqs * parts * num_heads * 2));
    if (partial == nullptr || stats == nullptr) {
      std::free(partial);
      std::free(stats);
      return 1;
    }
  }
  constexpr bool is_float = std::is_same_v<T, float>;
  int failed = 0;
#pragma omp parallel num_threads(num_threads)
  {
    const size_t max_len = width * block_size;
    // Scores of every position, or of a chunk and two sums a head (`attend_in_one_pass`).
    const size_t score_len = max_len > kChunk + 2 ? max_len : kChunk + 2;
    // Per thread: positions' row offsets, then 16 converted key rows, scores, one item's
    // query (bfloat16 only) and output in float.
    const size_t key_floats = 16 * num_kv_heads * head_dim;
    int64_t* where = static_cast<int64_t*>(std::malloc(
        sizeof(int64_t) * max_len +
        sizeof(float) * (key_floats + num_heads * score_len + 2 * head_floats)));
    float* converted = reinterpret_cast<float*>(where + max_len);
    float* scores = converted + key_floats;
    if (where == nullptr) {
#pragma omp atomic write
      failed = 1;
    }
    float* q_float = scores + num_heads * score_len;
    float* acc = q_float + head_floats;
    // Items one at a time: a prefill chunk's rows see ever more positions.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_seqs * parts; ++item) {
      const int64_t s = item / parts, p = item % parts;
      const int64_t len = seq_lens[s];
      const int64_t first = window > 0 && len > window ? len - window : 0;
      const int64_t start = first + (len - first) * p / parts;
      const int64_t n = first + (len - first) * (p + 1) / parts - start;
      float* item_stats = parts > 1 ? stats + item * num_heads * 2 : nullptr;
      if (where == nullptr) continue;
      if (n == 0) {  // a part of a context shorter than the thread count
        for (int64_t r = 0; r < num_heads; ++r) {
          item_stats[2 * r] = -1e30f;
          item_stats[2 * r + 1] = 0.f;
        }
        continue;
      }
      const float* q_row;
      float* dest;
      if constexpr (is_float) {
        q_row = q + s * q_stride;
        dest = parts > 1 ? partial + item * head_floats : out + s * head_floats;
      } else {
        for (int64_t j = 0; j < head_floats; ++j) q_float[j] = to_float(q[s * q_stride + j]);
        q_row = q_float;
        dest = parts > 1 ? partial + item * head_floats : acc;
      }
      // A decode's row is its sequence's only one in the step, and finds its cached rows in
      // memory; a prefill chunk's rows share theirs, which the first one brought in (with
      // the one-pass walk, 16 prompts of 128 tokens took 9.7 ms a layer instead of 5.6). A
      // row split over the threads (batch-1 decode) reads few rows a part: 17 us a layer
      // with the two-pass walk, 19 with the one-pass one (one run).
      const bool cold = parts == 1 && (s == 0 || table_rows[s - 1] != table_rows[s]) &&
                        (s + 1 == num_seqs || table_rows[s + 1] != table_rows[s]);
      auto run = [&](auto kernel) {
        kernel(q_row, k_cache, v_cache, block_tables + table_rows[s] * width, start, n,
               block_size, num_kv_heads, group, head_dim, scale, scores, where, converted,
               dest, item_stats, cold);
      };
      switch (head_dim) {
        case 64: run(attend<64, T>); break;
        case 128: run(attend<128, T>); break;
        default: run(attend<0, T>);
      }
      if constexpr (!is_float) {
        if (parts == 1) {
          for (int64_t j = 0; j < head_floats; ++j) store(out + s * head_floats + j, acc[j]);
        }
      }
    }
    if (parts > 1) {
#pragma omp for schedule(static)
      for (int64_t item = 0; item < num_seqs * num_heads; ++item) {
        const int64_t s = item / num_heads, r = item % num_heads;
        merge_parts(partial + s * parts * head_floats, stats + s * parts * num_heads * 2, parts,
                    r, num_heads, head_dim, acc, out + s * head_floats);
      }
    }
    std::free(where);
  }
  std::free(partial);
  std::free(stats);
  return failed;
}

#define KILN_DECODE_ATTENTION(name, T)                                                      \
  extern "C" int name(const T* q, int64_t q_stride, const T* k_new, int64_t k_stride,       \
                      const T* v_new, int64_t v_stride, const int64_t* slots,               \
                      T* k_cache, T* v_cache,                                               \
                      const int64_t* block_tables, const int64_t* table_rows,               \
                      int64_t width, const int64_t* seq_lens, T* out, int64_t num_seqs,     \
                      int64_t num_rows, int64_t num_heads, int64_t num_kv_heads,            \
                      int64_t head_dim, int64_t block_size, float scale, int64_t window,    \
                      int num_threads) {                                                    \
    return decode_attention<T>(q, q_stride, k_new, k_stride, v_new, v_stride, slots,        \
                               k_cache, v_cache, block_tables, table_rows,                  \
                               width, seq_lens, out, num_seqs, num_rows, num_heads,         \
                               num_kv_heads, head_dim, block_size, scale, window,           \
                               num_threads);                                                \
  }
KILN_DECODE_ATTENTION(kiln_decode_attention_f32, float)
KILN_DECODE_ATTENTION(kiln_decode_attention_bf16, uint16_t)

// The metadata of the step running, given once per step by the runtime
// (`kiln_attention_step`) and withdrawn after it; num_rows 0: no step, or one this op's CPU
// kernel leaves to the torch path (no kernel for its dtype). Each of the step's tokens is
// a row, as `decode_attention` takes them.
struct Step {
  const int64_t* slots;
  const int64_t* block_tables;
  int64_t width;
  const int64_t* table_rows;
  const int64_t* lens;
  int64_t num_rows;
};
static Step step = {nullptr, nullptr, 0, nullptr, nullptr, 0};

extern "C" void kiln_attention_step(const int64_t* slots, const int64_t* block_tables,
                                    int64_t width, const int64_t* table_rows,
                                    const int64_t* lens, int64_t num_rows) {
  step = {slots, block_tables, width, table_rows, lens, num_rows};
}

// `kiln::paged_attention`'s CPU kernel, registered with torch's dispatcher through its
// stable C interface (built for torch 2.11 on), so that a compiled layer calls the attention
// without entering Python; a call outside a step goes to the torch path,
// `kiln::paged_attention_torch`, through the dispatcher.
#define TORCH_TARGET_VERSION (((0ULL + 2) << 56) | ((0ULL + 11) << 48))
#include <array>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

using c10::ScalarType;
using torch::stable::Tensor;
""" + NEW_TENSOR + r"""

// [T, H, D] with each row's heads contiguous: the layout the kernel reads.
static bool rows_of_heads(const Tensor& x, ScalarType dtype) {
  return x.scalar_type() == dtype && x.dim() == 3 && x.stride(2) == 1 &&
         x.stride(1) == x.size(2);
}

// One call of the op on the step's metadata: the tensors' pointers, strides and sizes. The
// op's kernel fills one per call; a recorded call (`bind_recorded`) keeps its own.
struct AttendCall {
  const void* q; int64_t q_stride; const void* k; int64_t k_stride;
  const void* v; int64_t v_stride; void* kv_cache; int64_t cache_stride; void* out;
  int64_t rows; int64_t num_heads; int64_t num_kv_heads; int64_t head_dim;
  int64_t block_size; float scale; int64_t window; int64_t is_float;
};

template <typename T>
static int attend_call(const AttendCall* a) {
  T* k_cache = static_cast<T*>(a->kv_cache);
  return decode_attention<T>(
      static_cast<const T*>(a->q), a->q_stride, static_cast<const T*>(a->k), a->k_stride,
      static_cast<const T*>(a->v), a->v_stride, step.slots, k_cache, k_cache + a->cache_stride,
      step.block_tables, step.table_rows, step.width, step.lens, static_cast<T*>(a->out),
      step.num_rows, a->rows, a->num_heads, a->num_kv_heads, a->head_dim, a->block_size,
      a->scale, a->window, static_cast<int>(torch::stable::get_num_threads()));
}

static int attend_call(const AttendCall* a) {
  return a->is_float ? attend_call<float>(a) : attend_call<uint16_t>(a);
}

static Tensor paged_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor kv_cache, double scale,
                                  int64_t sliding_window) {
  const ScalarType dtype = kv_cache.scalar_type();
  // Anything else (shapes that do not fit the cache, too few rows for the step) goes to
  // the torch path, which reports it.
  const bool takes = step.num_rows > 0 &&
                     (dtype == ScalarType::Float || dtype == ScalarType::BFloat16) &&
                     kv_cache.dim() == 5 && kv_cache.is_contiguous() &&
                     rows_of_heads(q, dtype) && rows_of_heads(k, dtype) &&
                     rows_of_heads(v, dtype) && q.size(0) >= step.num_rows &&
                     k.size(0) >= step.num_rows && v.size(0) >= step.num_rows &&
                     q.size(2) == kv_cache.size(4) && k.size(2) == kv_cache.size(4) &&
                     v.size(2) == kv_cache.size(4) && k.size(1) == kv_cache.size(3) &&
                     v.size(1) == kv_cache.size(3) && q.size(1) % kv_cache.size(3) == 0;
  if (!takes) {
    std::array<StableIValue, 6> stack{
        torch::stable::detail::from(q), torch::stable::detail::from(k),
        torch::stable::detail::from(v), torch::stable::detail::from(kv_cache),
        torch::stable::detail::from(scale), torch::stable::detail::from(sliding_window)};
    STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(
        "kiln::paged_attention_torch", "", stack.data(), TORCH_ABI_VERSION));
    return torch::stable::detail::to<Tensor>(stack[0]);
  }
  Tensor out = new_contiguous(q, {q.size(0), q.size(1), q.size(2)});
  const AttendCall call = {
      q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
      kv_cache.data_ptr(), kv_cache.stride(0), out.data_ptr(), q.size(0), q.size(1),
      kv_cache.size(3), q.size(2), kv_cache.size(2), static_cast<float>(scale),
      sliding_window, dtype == ScalarType::Float};
  const int failed = attend_call(&call);
  STD_TORCH_CHECK(!failed, "decode attention could not allocate its scratch memory");
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("paged_attention", TORCH_BOX(&paged_attention_cpu));
}

// A recorded call of the op (`bind_recorded`), on the same tensors every time: checked
// once when recorded, so only the step's rows are checked here. Returns 2 where the op's
// kernel would not take the call (no step, or more rows in it than q has).
extern "C" int kiln_attend_recorded(const AttendCall* a) {
  if (step.num_rows <= 0 || a->rows < step.num_rows) return 2;
  return attend_call(a);
}
"""

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] laid out as the kernel reads it: each row's heads contiguous, rows
    `x.stride(0)` apart (the projections' outputs usually are already)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


class DecodeKernel:
    """The built library: `kiln::paged_attention`'s CPU kernel, which it registers as it
    loads, and the kernel itself for calls outside compiled code (`__call__`)."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library  # kept: the registered op kernel lives in it
        self.functions = entry_points(
            library, "kiln_decode_attention", ctypes.c_int,
            [_PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR,
             _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _I64, ctypes.c_int])
        self.attend_recorded = library.kiln_attend_recorded
        self.attend_recorded.restype = ctypes.c_int
        self.attend_recorded.argtypes = [_PTR]
        self.set_step = library.kiln_attention_step
        self.set_step.restype = None
        self.set_step.argtypes = [_PTR, _PTR, _I64, _PTR, _PTR, _I64]

    def begin_step(self, meta) -> None:
        """Give the op's CPU kernel the metadata of the step (models/attention.py's
        AttentionMetadata; its int64 tensors are contiguous and outlive the step): it then
        attends every layer of the step without entering Python."""
        num_tokens = meta.slot_mapping.shape[0]
        if num_tokens == 0 or meta.slot_mapping.device.type != "cpu":
            return
        self.set_step(meta.slot_mapping.data_ptr(), meta.block_tables.data_ptr(),
                      meta.block_tables.shape[1], meta.token_to_seq.data_ptr(),
                      meta.token_lens.data_ptr(), num_tokens)

    def end_step(self) -> None:
        self.set_step(None, None, 0, None, None, 0)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, table_rows: torch.Tensor,
                 lens: torch.Tensor, scale: float, sliding_window: int) -> torch.Tensor:
        """Write the T = len(slot_mapping) new rows of k/v [T', Hkv, D] to their slots,
        then attend with the first T rows of q [T', Hq, D]: row t over the first lens[t]
        positions of the sequence whose blocks are row table_rows[t] of block_tables
        -> [T', Hq, D], rows from T on zero. kv_cache [2, num_blocks, block_size,
        Hkv, D] contiguous, float32 or bfloat16 like q/k/v (cpu_build.KERNEL_DTYPES);
        slot_mapping, block_tables, table_rows, lens contiguous int64.

        A step runs one of these per layer with the weights streaming through the caches in
        between, so every torch call here costs 10-20 us: hence pointers and strides
        rather than slices and copies."""
        q, k, v = _rows(q), _rows(k), _rows(v)
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        num_tokens = slot_mapping.shape[0]
        out = q.new_empty((q.shape[0], q.shape[1], head_dim))
        k_cache = kv_cache.data_ptr()
        fn = self.functions[kv_cache.dtype]
        failed = fn(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(),
                    v.stride(0), slot_mapping.data_ptr(), k_cache,
                    k_cache + kv_cache.stride(0) * kv_cache.element_size(),
                    block_tables.data_ptr(), table_rows.data_ptr(), block_tables.shape[1],
                    lens.data_ptr(), out.data_ptr(), num_tokens, q.shape[0], q.shape[1],
                    num_kv_heads, head_dim, block_size, scale, sliding_window,
                    torch.get_num_threads())
        if failed:
            raise MemoryError("decode attention could not allocate its scratch memory")
        return out


class _AttendCall(ctypes.Structure):  # the C struct AttendCall
    _fields_ = [(name, _PTR if name in ("q", "k", "v", "kv_cache", "out") else _I64)
                for name in ("q", "q_stride", "k", "k_stride", "v", "v_stride", "kv_cache",
                             "cache_stride", "out", "rows", "num_heads", "num_kv_heads",
                             "head_dim", "block_size")] + \
        [("scale", ctypes.c_float), ("window", _I64), ("is_float", _I64)]


def _takes(q, k, v, kv_cache, out) -> bool:
    """Whether the op's CPU kernel attends these tensors itself (its `takes`, less the
    step's rows), writing `out`, the result recorded, in place."""
    dtype = kv_cache.dtype
    return dtype in KERNEL_DTYPES and kv_cache.dim() == 5 and kv_cache.is_contiguous() and \
        all(x.dtype == dtype and x.dim() == 3 and x.stride(2) == 1 and
            x.stride(1) == x.shape[2] and x.shape[2] == kv_cache.shape[4] for x in (q, k, v)) \
        and k.shape[1] == v.shape[1] == kv_cache.shape[3] and \
        q.shape[1] % kv_cache.shape[3] == 0 and min(k.shape[0], v.shape[0]) >= q.shape[0] \
        and out.dtype == dtype and out.shape == q.shape and out.is_contiguous()


class RecordedAttend:
    """A recorded call of `kiln::paged_attention` made again by the op's kernel, which writes
    the recorded result itself (see `bind_recorded`)."""

    def __init__(self, op, args: tuple, result: torch.Tensor, call: _AttendCall):
        self.op, self.args, self.result = op, args, result
        self.call = call  # what the pointers in it name: held by `args` and `result`
        self.attend, self.pointer = _kernel[0].attend_recorded, ctypes.byref(call)

    def __call__(self) -> None:
        failed = self.attend(self.pointer)
        if failed == 2:  # not in a step the kernel takes: the dispatcher, as recorded
            self.result.copy_(self.op(*self.args))
        elif failed:
            raise MemoryError("decode attention could not allocate its scratch memory")

    def c_call(self) -> tuple[int, list[int]]:
        """The kernel's C function and its argument, for a C loop of recorded steps
        (graphs/chain.py): a call that returns nonzero is made again as `self()`."""
        return ctypes.cast(self.attend, ctypes.c_void_p).value, [ctypes.addressof(self.call)]


def bind_recorded(op, args: tuple, kwargs: dict, result) -> Callable[[], None] | None:
    """A recorded call of `kiln::paged_attention` (compiler/inductor.py's Replay) made again
    without the dispatcher: the kernel writes the recorded result itself, instead of a new
    tensor copied into it. A replayed SmolLM2 decode layer spent about 30 us calling the op
    and 20 more copying its result, with the weights streaming through the caches in
    between. None for other ops, and where the op's kernel would not take these tensors."""
    if not _kernel or op is not torch.ops.kiln.paged_attention.default or kwargs or \
            len(args) != 6 or not isinstance(result, torch.Tensor):
        return None
    q, k, v, kv_cache, scale, window = args
    if not _takes(q, k, v, kv_cache, result):
        return None
    return RecordedAttend(op, args, result, _AttendCall(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        kv_cache.data_ptr(), kv_cache.stride(0), result.data_ptr(), q.shape[0], q.shape[1],
        kv_cache.shape[3], q.shape[2], kv_cache.shape[2], scale, window,
        kv_cache.dtype == torch.float32))


_kernel: list[DecodeKernel] = []  # one per process: a loaded library cannot be unloaded


def load_decode_kernel(build_dir: Path) -> DecodeKernel | None:
    """The decode attention kernel, built into `build_dir` if it is not there yet; None
    (with a warning) when it cannot be built or loaded."""
    if not _kernel:
        library = load_library("decode_attention", SOURCE, build_dir, "the torch path",
                               torch_op=True)
        if library is None:
            return None
        _kernel.append(DecodeKernel(library))
    return _kernel[0]


def attends_in_compiled_code(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a compiled layer of a model on `device` in `dtype` should call
    `kiln::paged_attention` itself instead of splitting there (compiler/backend.py): on CPU,
    once the op's kernel is registered in this process, for the dtypes it attends (for
    others it would only call the torch path back, through the dispatcher, every layer)."""
    return device.type == "cpu" and dtype in KERNEL_DTYPES and bool(_kernel)
