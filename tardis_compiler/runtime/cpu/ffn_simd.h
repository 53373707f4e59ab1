// Vector primitives of the fused FFN kernel (ffn_kernel.cpp): bf16 conversion, activations, and
// fp32-accumulating dots and axpys over fp32 / bf16 / int8 / sub-byte rows. AVX-512 (with VNNI
// where present) when compiled for it, else AVX2 + FMA (with AVX-VNNI where present: most laptops
// and AMD Zen 2/3 servers have no AVX-512), else portable loops; every function computes the same
// sums each way, up to float32 summation order.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TARDIS_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define TARDIS_AVX2 1
#include <immintrin.h>
#endif

namespace tardis {

enum Act { RELU = 0, GELU = 1, GELU_TANH = 2, SILU = 3, QUICK_GELU = 4 };

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }
inline float to_f32(int8_t v) { return static_cast<float>(v); }  // int8 bundle codes (scaled by the caller)
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = f32_to_bf16(v); }

inline float activation(int act, float z) {
  switch (act) {
    case RELU: return z > 0.f ? z : (z != z ? z : 0.f);
    case GELU: return 0.5f * z * (1.f + std::erf(z * 0.70710678118654752f));
    case GELU_TANH: {
      float inner = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.f + std::tanh(inner));
    }
    case SILU: return z / (1.f + std::exp(-z));
    default: return z / (1.f + std::exp(-1.702f * z));  // QUICK_GELU
  }
}

#ifdef TARDIS_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const uint16_t* p, __mmask16 k) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const int8_t* p, __mmask16 k) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p)));
}
inline __mmask16 tail_mask(int64_t left) { return static_cast<__mmask16>((1u << left) - 1u); }
#endif

#ifdef TARDIS_AVX2
// Eight elements as fp32 (AVX2 has no 16-bit masked loads: tails are scalar loops).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// sum_i w[i] x[i], fp32 accumulation.
template <class W>
inline float dot(const W* w, const float* x, int64_t n) {
#ifdef TARDIS_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(load16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
  }
  for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a0);
  if (i < n) {
    __mmask16 k = tail_mask(n - i);
    a1 = _mm512_fmadd_ps(load16(w + i, k), _mm512_maskz_loadu_ps(k, x + i), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(TARDIS_AVX2)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // four chains: FMA latency, not loads, would bound one
    a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += to_f32(w[i]) * x[i];
  return s;
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += to_f32(w[i]) * x[i];
  return s;
#endif
}

// Two rows against one x (a gated neuron's gate and up rows): x is loaded once.
template <class W>
inline void dot2(const W* w0, const W* w1, const float* x, int64_t n, float* s0, float* s1) {
#ifdef TARDIS_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 xv = _mm512_loadu_ps(x + i);
    a0 = _mm512_fmadd_ps(load16(w0 + i), xv, a0);
    a1 = _mm512_fmadd_ps(load16(w1 + i), xv, a1);
  }
  if (i < n) {
    __mmask16 k = tail_mask(n - i);
    __m512 xv = _mm512_maskz_loadu_ps(k, x + i);
    a0 = _mm512_fmadd_ps(load16(w0 + i, k), xv, a0);
    a1 = _mm512_fmadd_ps(load16(w1 + i, k), xv, a1);
  }
  *s0 = _mm512_reduce_add_ps(a0);
  *s1 = _mm512_reduce_add_ps(a1);
#elif defined(TARDIS_AVX2)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(load8(w0 + i), x0, a0);
    b0 = _mm256_fmadd_ps(load8(w1 + i), x0, b0);
    a1 = _mm256_fmadd_ps(load8(w0 + i + 8), x1, a1);
    b1 = _mm256_fmadd_ps(load8(w1 + i + 8), x1, b1);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    a0 = _mm256_fmadd_ps(load8(w0 + i), xv, a0);
    b0 = _mm256_fmadd_ps(load8(w1 + i), xv, b0);
  }
  float r0 = hsum8(_mm256_add_ps(a0, a1)), r1 = hsum8(_mm256_add_ps(b0, b1));
  for (; i < n; ++i) {
    r0 += to_f32(w0[i]) * x[i];
    r1 += to_f32(w1[i]) * x[i];
  }
  *s0 = r0;
  *s1 = r1;
#else
  *s0 = dot(w0, x, n);
  *s1 = dot(w1, x, n);
#endif
}

// acc[i] += a * w[i]
template <class W>
inline void axpy(float* acc, float a, const W* w, int64_t n) {
#ifdef TARDIS_AVX512
  __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(av, load16(w + i), _mm512_loadu_ps(acc + i)));
  if (i < n) {
    __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(acc + i, k, _mm512_fmadd_ps(av, load16(w + i, k), _mm512_maskz_loadu_ps(k, acc + i)));
  }
#elif defined(TARDIS_AVX2)
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(av, load8(w + i), _mm256_loadu_ps(acc + i)));
    _mm256_storeu_ps(acc + i + 8, _mm256_fmadd_ps(av, load8(w + i + 8), _mm256_loadu_ps(acc + i + 8)));
  }
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(av, load8(w + i), _mm256_loadu_ps(acc + i)));
  for (; i < n; ++i) acc[i] += a * to_f32(w[i]);
#else
  for (int64_t i = 0; i < n; ++i) acc[i] += a * to_f32(w[i]);
#endif
}

// int8 row, symmetric per-row scale: scale * sum q[i] x[i].
inline float dot_int8(const int8_t* q, const float* x, int64_t n) {
#ifdef TARDIS_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512i v0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
    __m512i v1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i + 16)));
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), _mm512_loadu_ps(x + i + 16), a1);
  }
  for (; i < n; i += 16) {
    __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, q + i));
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_maskz_loadu_ps(k, x + i), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
  return dot(q, x, n);  // AVX2: load8(int8_t*); portable: the scalar loop
#endif
}

// Sub-byte codes of one group of `size` elements, `per_byte` codes (2: int4, 4: int2) per byte:
// byte b holds element b + k * part in bits [k * bits, (k + 1) * bits), part = ceil(size / per_byte),
// so unpacking is a shift and a mask. Returns sum code[i] * x[i].
#ifdef TARDIS_AVX512
template <int BITS>
inline __m512 group_codes_fma(const uint8_t* q, const float* x, int64_t size, __m512 acc) {
  constexpr int PER_BYTE = 8 / BITS;
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  const int64_t part = (size + PER_BYTE - 1) / PER_BYTE;
  for (int64_t b = 0; b < part; b += 16) {
    const int64_t left = part - b;
    __mmask16 kb = left >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(left);
    __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(kb, q + b));
    for (int k = 0; k < PER_BYTE; ++k) {
      const int64_t start = k * part + b;  // element of lane 0
      if (start >= size) break;
      const int64_t valid = size - start;
      __mmask16 kx = valid >= 16 ? kb : static_cast<__mmask16>(kb & tail_mask(valid));
      __m512 codes = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, k * BITS), mask));
      acc = _mm512_fmadd_ps(codes, _mm512_maskz_loadu_ps(kx, x + start), acc);
    }
  }
  return acc;
}
#endif

template <int BITS>
inline float group_codes_dot(const uint8_t* q, const float* x, int64_t size) {
  constexpr int PER_BYTE = 8 / BITS;
  const int64_t part = (size + PER_BYTE - 1) / PER_BYTE;
  float s = 0.f;
  for (int64_t b = 0; b < part; ++b)
    for (int k = 0; k < PER_BYTE; ++k) {
      const int64_t e = k * part + b;
      if (e < size) s += static_cast<float>((q[b] >> (k * BITS)) & ((1 << BITS) - 1)) * x[e];
    }
  return s;
}

#if defined(TARDIS_AVX512) && defined(__AVX512VNNI__)
#define TARDIS_VNNI 1
// The 64 codes of a full group (64 elements), unpacked to bytes in element order.
template <int BITS>
inline __m512i group64_codes(const uint8_t* q) {
  if (BITS == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i crumb = _mm_set1_epi8(0x03);
  __m512i out = _mm512_castsi128_si512(_mm_and_si128(v, crumb));
  out = _mm512_inserti32x4(out, _mm_and_si128(_mm_srli_epi16(v, 2), crumb), 1);
  out = _mm512_inserti32x4(out, _mm_and_si128(_mm_srli_epi16(v, 4), crumb), 2);
  return _mm512_inserti32x4(out, _mm_and_si128(_mm_srli_epi16(v, 6), crumb), 3);
}
#endif

#ifdef TARDIS_AVX2
// The 64 codes of a full group in element order, as two vectors of 32 bytes (elements 0-31, 32-63).
template <int BITS>
inline void group64_codes_avx2(const uint8_t* q, __m256i* lo, __m256i* hi) {
  if (BITS == 4) {  // byte b: element b (low nibble), element 32 + b (high nibble)
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    *lo = _mm256_and_si256(v, nibble);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    return;
  }
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));  // byte b: elements b + 16k
  const __m128i crumb = _mm_set1_epi8(0x03);
  *lo = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 2), crumb), _mm_and_si128(v, crumb));
  *hi = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 6), crumb), _mm_and_si128(_mm_srli_epi16(v, 4), crumb));
}

// Eight int32 sums of four products each: unsigned codes (< 16) times signed int8 x. Without
// AVX-VNNI, maddubs then madd: its int16 pair sums (at most 2 * 15 * 127) cannot saturate.
inline __m256i dot_u8s8(__m256i codes, __m256i x) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), codes, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1));
#endif
}
#endif

// out[t] = row . x_t for `tokens` tokens of x (tokens, n): four tokens share each load of the row.
void dot_tokens(const float* row, const float* x, int64_t tokens, int64_t n, float* out, int64_t out_stride) {
  int64_t t = 0;
#ifdef TARDIS_AVX512
  for (; t + 4 <= tokens; t += 4) {
    const float* x0 = x + t * n;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
      __m512 w = _mm512_maskz_loadu_ps(k, row + i);
      a0 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(k, x0 + i), a0);
      a1 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(k, x0 + n + i), a1);
      a2 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(k, x0 + 2 * n + i), a2);
      a3 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(k, x0 + 3 * n + i), a3);
    }
    out[t * out_stride] = _mm512_reduce_add_ps(a0);
    out[(t + 1) * out_stride] = _mm512_reduce_add_ps(a1);
    out[(t + 2) * out_stride] = _mm512_reduce_add_ps(a2);
    out[(t + 3) * out_stride] = _mm512_reduce_add_ps(a3);
  }
#elif defined(TARDIS_AVX2)
  for (; t + 4 <= tokens; t += 4) {
    const float* x0 = x + t * n;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 w = _mm256_loadu_ps(row + i);
      a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x0 + i), a0);
      a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x0 + n + i), a1);
      a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x0 + 2 * n + i), a2);
      a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x0 + 3 * n + i), a3);
    }
    float s[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
    for (; i < n; ++i)
      for (int k = 0; k < 4; ++k) s[k] += row[i] * x0[k * n + i];
    for (int k = 0; k < 4; ++k) out[(t + k) * out_stride] = s[k];
  }
#endif
  for (; t < tokens; ++t) out[t * out_stride] = dot(row, x + t * n, n);
}

// dst[i] = scale * w[i] as fp32: a bundle row widened once, then read by every token.
template <class W>
inline void widen(const W* w, float scale, int64_t n, float* dst) {
  int64_t i = 0;
#ifdef TARDIS_AVX512
  const __m512 sv = _mm512_set1_ps(scale);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_mul_ps(sv, load16(w + i)));
  if (i < n) {
    __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, k, _mm512_mul_ps(sv, load16(w + i, k)));
  }
  return;
#elif defined(TARDIS_AVX2)
  const __m256 sv = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_mul_ps(sv, load8(w + i)));
#endif
  for (; i < n; ++i) dst[i] = scale * to_f32(w[i]);
}

// One int4 weight row of n elements (runtime/layout.py int4_row_bytes) dequantized to fp32:
// groups of 32 codes, two per byte (the first half of a group in the low nibbles, the second in
// the high ones), the codes padded to 4 bytes, then a bf16 (scale, minimum) pair per group:
// dst[i] = scale_g * code_i + min_g. `codes_bytes` is where the pairs start.
const int64_t INT4_GROUP = 32;  // runtime/layout.py WEIGHT_GROUP
inline void dequant_int4_row(const uint8_t* row, int64_t n, int64_t codes_bytes, float* dst) {
  const uint8_t* q = row;
  const uint8_t* pairs = row + codes_bytes;
  for (int64_t start = 0, g = 0; start < n; start += INT4_GROUP, ++g) {
    uint16_t pair[2];
    std::memcpy(pair, pairs + 4 * g, 4);  // unaligned-safe
    const float scale = bf16_to_f32(pair[0]), low = bf16_to_f32(pair[1]);
    const int64_t size = n - start < INT4_GROUP ? n - start : INT4_GROUP, part = (size + 1) / 2;
    float* o = dst + start;
#if defined(TARDIS_AVX512)
    if (size == INT4_GROUP) {  // 16 bytes: 16 low nibbles, then 16 high ones
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      const __m512 sv = _mm512_set1_ps(scale), lv = _mm512_set1_ps(low);
      const __m512i nibble = _mm512_set1_epi32(15);
      _mm512_storeu_ps(o, _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(_mm512_and_si512(bytes, nibble)), lv));
      _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), lv));
      q += 16;
      continue;
    }
#elif defined(TARDIS_AVX2)
    if (size == INT4_GROUP) {
      const __m256 sv = _mm256_set1_ps(scale), lv = _mm256_set1_ps(low);
      const __m256i nibble = _mm256_set1_epi32(15);
      for (int h = 0; h < 2; ++h) {  // 8 bytes at a time: their low nibbles, then their high ones
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * h)));
        _mm256_storeu_ps(o + 8 * h, _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(_mm256_and_si256(bytes, nibble)), lv));
        _mm256_storeu_ps(o + 16 + 8 * h, _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)), lv));
      }
      q += 16;
      continue;
    }
#endif
    for (int64_t e = 0; e < part; ++e) o[e] = std::fma(scale, static_cast<float>(q[e] & 15), low);
    for (int64_t e = part; e < size; ++e) o[e] = std::fma(scale, static_cast<float>(q[e - part] >> 4), low);
    q += part;
  }
}

// acc[i] += sum_k a[k] * w[k * stride + i] for k < count (<= 8): several fp32 rows into one
// accumulator row, which is then read and written once instead of once per row.
inline void axpy_rows(float* acc, const float* a, int count, const float* w, int64_t stride, int64_t n) {
  int64_t i = 0;
#ifdef TARDIS_AVX512
  for (; i + 64 <= n; i += 64) {  // four independent chains: FMA latency, not throughput, bounds one
    __m512 v0 = _mm512_loadu_ps(acc + i), v1 = _mm512_loadu_ps(acc + i + 16);
    __m512 v2 = _mm512_loadu_ps(acc + i + 32), v3 = _mm512_loadu_ps(acc + i + 48);
    for (int k = 0; k < count; ++k) {
      const __m512 ak = _mm512_set1_ps(a[k]);
      const float* wk = w + k * stride + i;
      v0 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(wk), v0);
      v1 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(wk + 16), v1);
      v2 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(wk + 32), v2);
      v3 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(wk + 48), v3);
    }
    _mm512_storeu_ps(acc + i, v0);
    _mm512_storeu_ps(acc + i + 16, v1);
    _mm512_storeu_ps(acc + i + 32, v2);
    _mm512_storeu_ps(acc + i + 48, v3);
  }
  for (; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    __m512 v = _mm512_maskz_loadu_ps(m, acc + i);
    for (int k = 0; k < count; ++k)
      v = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), _mm512_maskz_loadu_ps(m, w + k * stride + i), v);
    _mm512_mask_storeu_ps(acc + i, m, v);
  }
  return;
#elif defined(TARDIS_AVX2)
  for (; i + 32 <= n; i += 32) {
    __m256 v0 = _mm256_loadu_ps(acc + i), v1 = _mm256_loadu_ps(acc + i + 8);
    __m256 v2 = _mm256_loadu_ps(acc + i + 16), v3 = _mm256_loadu_ps(acc + i + 24);
    for (int k = 0; k < count; ++k) {
      const __m256 ak = _mm256_set1_ps(a[k]);
      const float* wk = w + k * stride + i;
      v0 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(wk), v0);
      v1 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(wk + 8), v1);
      v2 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(wk + 16), v2);
      v3 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(wk + 24), v3);
    }
    _mm256_storeu_ps(acc + i, v0);
    _mm256_storeu_ps(acc + i + 8, v1);
    _mm256_storeu_ps(acc + i + 16, v2);
    _mm256_storeu_ps(acc + i + 24, v3);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(acc + i);
    for (int k = 0; k < count; ++k) v = _mm256_fmadd_ps(_mm256_set1_ps(a[k]), _mm256_loadu_ps(w + k * stride + i), v);
    _mm256_storeu_ps(acc + i, v);
  }
#endif
  for (; i < n; ++i) {
    float v = acc[i];
    for (int k = 0; k < count; ++k) v += a[k] * w[k * stride + i];
    acc[i] = v;
  }
}

// axpy_rows for `tokens` accumulator rows at once (acc + t * n, coefficients a + t * a_stride):
// each row of w is read once for all of them. AVX-512: 8 tokens x 32 columns in 16 registers, so a
// row's two loads feed 16 FMAs; same sums in the same order as axpy_rows per token.
inline void axpy_rows_tokens(float* acc, const float* a, int64_t a_stride, int64_t tokens, int count, const float* w,
                             int64_t stride, int64_t n) {
  int64_t t = 0;
#ifdef TARDIS_AVX512
  const int64_t wide = n / 32 * 32;
  for (; t + 8 <= tokens; t += 8) {
    for (int64_t i = 0; i < wide; i += 32) {
      __m512 v0[8], v1[8];
      for (int q = 0; q < 8; ++q) {
        v0[q] = _mm512_loadu_ps(acc + (t + q) * n + i);
        v1[q] = _mm512_loadu_ps(acc + (t + q) * n + i + 16);
      }
      for (int k = 0; k < count; ++k) {
        const __m512 w0 = _mm512_loadu_ps(w + k * stride + i), w1 = _mm512_loadu_ps(w + k * stride + i + 16);
        for (int q = 0; q < 8; ++q) {
          const __m512 aq = _mm512_set1_ps(a[(t + q) * a_stride + k]);
          v0[q] = _mm512_fmadd_ps(aq, w0, v0[q]);
          v1[q] = _mm512_fmadd_ps(aq, w1, v1[q]);
        }
      }
      for (int q = 0; q < 8; ++q) {
        _mm512_storeu_ps(acc + (t + q) * n + i, v0[q]);
        _mm512_storeu_ps(acc + (t + q) * n + i + 16, v1[q]);
      }
    }
    if (wide < n)
      for (int q = 0; q < 8; ++q)
        axpy_rows(acc + (t + q) * n + wide, a + (t + q) * a_stride, count, w + wide, stride, n - wide);
  }
#endif
  for (; t < tokens; ++t) axpy_rows(acc + t * n, a + t * a_stride, count, w, stride, n);
}

#ifdef TARDIS_AVX512
// r0 . x_k and r1 . x_k for the TB tokens of x0 (TB, n): 2 * TB accumulators, two rows, one x.
template <int TB>
inline void dot2_block(const float* r0, const float* r1, const float* x0, int64_t n, float* out0, float* out1) {
  __m512 a[TB], b[TB];
  for (int k = 0; k < TB; ++k) a[k] = b[k] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    const __m512 w0 = _mm512_maskz_loadu_ps(m, r0 + i), w1 = _mm512_maskz_loadu_ps(m, r1 + i);
    for (int k = 0; k < TB; ++k) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x0 + k * n + i);
      a[k] = _mm512_fmadd_ps(w0, xv, a[k]);
      b[k] = _mm512_fmadd_ps(w1, xv, b[k]);
    }
  }
  for (int k = 0; k < TB; ++k) {
    out0[k] = _mm512_reduce_add_ps(a[k]);
    out1[k] = _mm512_reduce_add_ps(b[k]);
  }
}
#endif

// out0[t] = r0 . x_t and out1[t] = r1 . x_t for `tokens` tokens of x (tokens, n): a gated neuron's
// gate and up rows (fp32) against a block of tokens, eight (AVX2: four) sharing each load of the rows.
void dot2_tokens(const float* r0, const float* r1, const float* x, int64_t tokens, int64_t n, float* out0,
                 float* out1) {
  int64_t t = 0;
#ifdef TARDIS_AVX512
  for (; t + 8 <= tokens; t += 8) dot2_block<8>(r0, r1, x + t * n, n, out0 + t, out1 + t);  // 19 of 32 registers
  for (; t + 4 <= tokens; t += 4) dot2_block<4>(r0, r1, x + t * n, n, out0 + t, out1 + t);
#elif defined(TARDIS_AVX2)
  for (; t + 4 <= tokens; t += 4) {
    const float* x0 = x + t * n;
    __m256 a[4], b[4];
    for (int k = 0; k < 4; ++k) a[k] = b[k] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 w0 = _mm256_loadu_ps(r0 + i), w1 = _mm256_loadu_ps(r1 + i);
      for (int k = 0; k < 4; ++k) {
        const __m256 xv = _mm256_loadu_ps(x0 + k * n + i);
        a[k] = _mm256_fmadd_ps(w0, xv, a[k]);
        b[k] = _mm256_fmadd_ps(w1, xv, b[k]);
      }
    }
    for (int k = 0; k < 4; ++k) {
      float s0 = hsum8(a[k]), s1 = hsum8(b[k]);
      for (int64_t j = i; j < n; ++j) {
        s0 += r0[j] * x0[k * n + j];
        s1 += r1[j] * x0[k * n + j];
      }
      out0[t + k] = s0;
      out1[t + k] = s1;
    }
  }
#endif
  for (; t < tokens; ++t) dot2(r0, r1, x + t * n, n, out0 + t, out1 + t);
}

#if defined(TARDIS_AVX512) && defined(__AVX512BF16__)
#define TARDIS_BF16_DOT 1
// bf16 dots for calls of many tokens in a bf16 model (exact_all, Wf): x is bf16 already and a row
// is bf16 or int8 codes (exact in bf16), so vdpbf16ps multiplies 32 pairs per instruction, twice
// an fp32 FMA's, with fp32 sums: the product of two bf16 is exact in fp32, so only the summation
// order (and denormals, flushed) differs from the fp32 path.

// dst[i] = codes[i] as bf16 (exact: |code| <= 127 has 7 significant bits).
inline void widen_bf16(const int8_t* q, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, q + i)));
    _mm256_mask_storeu_epi16(dst + i, k, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
}

// out_r[k] = row_r . x_k for the TB tokens of x0 (TB, n), NR (1 or 2) bf16 rows sharing each load of x.
template <int TB, int NR>
inline void dot_bf16_block(const uint16_t* r0, const uint16_t* r1, const uint16_t* x0, int64_t n, float* out0,
                           float* out1) {
  __m512 a[NR][TB];
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < TB; ++k) a[r][k] = _mm512_setzero_ps();
  const uint16_t* rows[2] = {r0, r1};
  for (int64_t i = 0; i < n; i += 32) {
    const __mmask32 m = n - i >= 32 ? ~0u : static_cast<__mmask32>((1u << (n - i)) - 1u);
    __m512i w[NR];
    for (int r = 0; r < NR; ++r) w[r] = _mm512_maskz_loadu_epi16(m, rows[r] + i);
    for (int k = 0; k < TB; ++k) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, x0 + k * n + i));
      for (int r = 0; r < NR; ++r) a[r][k] = _mm512_dpbf16_ps(a[r][k], reinterpret_cast<__m512bh>(w[r]), xv);
    }
  }
  float* outs[2] = {out0, out1};
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < TB; ++k) outs[r][k] = _mm512_reduce_add_ps(a[r][k]);
}

// out0[t] = r0 . x_t (and out1[t] = r1 . x_t when NR is 2) for `tokens` bf16 tokens of x (tokens, n).
template <int NR>
void dot_bf16_tokens(const uint16_t* r0, const uint16_t* r1, const uint16_t* x, int64_t tokens, int64_t n,
                     float* out0, float* out1) {
  int64_t t = 0;
  for (; t + 8 <= tokens; t += 8) dot_bf16_block<8, NR>(r0, r1, x + t * n, n, out0 + t, out1 + t);
  for (; t + 4 <= tokens; t += 4) dot_bf16_block<4, NR>(r0, r1, x + t * n, n, out0 + t, out1 + t);
  for (; t < tokens; ++t) dot_bf16_block<1, NR>(r0, r1, x + t * n, n, out0 + t, out1 + t);
}
#endif

}  // namespace tardis
