// tardis fused FFN kernel for CPU: one call per FFN, no torch headers (compiled at first use by
// runtime/cpu/build.py, called through ctypes by runtime/cpu/kernel.py).
//
// One call computes, for T tokens (decode: T = 1):
//   y = Wf x + bf + sum_{bundle neurons j flagged for the token} delta_j(x) * out_col_j
// gated:  g = gate_j . x + bg_j,  u = up_j . x + bu_j,  delta_j = (act(g) - c_j) * u
// plain:  z = w1_j . x + b1_j,    delta_j = act(z) - a_j z - c_j
// Guarded neurons (bundles [0, k_guard)) are flagged when the guard's prediction of their
// pre-activation leaves their band; always-exact neurons (bundles [k_guard, k_bundles)) are flagged
// for every token. The layout of the buffers is written by runtime/pack.py; the meta fields are
// listed in META_LAYOUT, which pack.py checks against its own list when it loads this library.
//
// Threads: one OpenMP parallel region per call, on the libgomp torch itself loaded (build.py links
// that file), with torch.get_num_threads() threads. Each thread computes a slice of Wf's rows into
// a shared fp32 buffer, takes chunks of neurons from an atomic counter and accumulates their
// corrections into its own buffer; after one barrier the threads reduce disjoint output rows.
// All accumulation is fp32; weights are fp32 or bf16 (bf16 -> fp32 is a 16-bit shift).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TARDIS_AVX512 1
#include <immintrin.h>
#endif

namespace {

enum Meta : int {
  MAGIC, VERSION, KIND, ACT, DTYPE, D_IN, D_OUT, M, K_GUARD, K_ALWAYS, GUARD, GROUP, RANK, STRIDE,
  HAS_WF, OFF_BUNDLES, OFF_GSCALES, OFF_BF, OFF_BANDS, OFF_NEURON, OFF_P, N_WEIGHTS, N_GUARD,
  N_FLOATS, META_LEN
};
const char* META_LAYOUT =
    "MAGIC,VERSION,KIND,ACT,DTYPE,D_IN,D_OUT,M,K_GUARD,K_ALWAYS,GUARD,GROUP,RANK,STRIDE,HAS_WF,"
    "OFF_BUNDLES,OFF_GSCALES,OFF_BF,OFF_BANDS,OFF_NEURON,OFF_P,N_WEIGHTS,N_GUARD,N_FLOATS";
const int64_t MAGIC_VALUE = 0x7a4d5446;  // "FTMz"
const int64_t LAYOUT_VERSION = 1;
enum Kind { PLAIN = 0, GATED = 1 };
enum Act { RELU = 0, GELU = 1, GELU_TANH = 2, SILU = 3, QUICK_GELU = 4 };
enum Guard { G_NONE = 0, G_INT8 = 1, G_INT4 = 2, G_INT2 = 3, G_EXACT = 4, G_SVD = 5 };
const int NEURON_FLOATS = 4;  // bias (gate / w1), bias (up), slope, intercept
const int64_t CHUNK = 64;     // neurons per work item
const int64_t MAX_TOKENS = 64;  // token masks are 64-bit
#ifndef TARDIS_PREFETCH_BYTES
#define TARDIS_PREFETCH_BYTES 4096
#endif
#ifndef TARDIS_PREFETCH_AHEAD
#define TARDIS_PREFETCH_AHEAD 1
#endif
const int64_t PREFETCH_BYTES = TARDIS_PREFETCH_BYTES;  // at most this much of a bundle is prefetched
const int PREFETCH_AHEAD = TARDIS_PREFETCH_AHEAD;      // flagged bundles ahead of the one in use

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
inline __mmask16 tail_mask(int64_t left) { return static_cast<__mmask16>((1u << left) - 1u); }
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
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += static_cast<float>(q[i]) * x[i];
  return s;
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

// The guard's input for one token, as the sub-byte guards read it: x quantized to int8 per group
// (xq = round(x / sx), sx = max|x_g| / 127; also as floats, for partial groups and portable
// builds), and the exact sum of x per group (for the groups' minimums). runtime/guard.py
// computes the same numbers in torch; calibration measures the guard through them.
struct GuardInput {
  const int8_t* xq8;
  const float* xqf;
  const float* sx;
  const float* gsum;
};

void quantize_token(const float* x, int64_t n, int64_t group, int8_t* xq8, float* xqf, float* sx, float* gsum) {
  for (int64_t g = 0, start = 0; start < n; ++g, start += group) {
    const int64_t end = start + group < n ? start + group : n;
    float amax = 0.f, sum = 0.f;
    for (int64_t i = start; i < end; ++i) {
      amax = std::fmax(amax, std::fabs(x[i]));
      sum += x[i];
    }
    const float scale = amax > 0.f ? amax / 127.f : 1.f;
    for (int64_t i = start; i < end; ++i) {
      float q = std::nearbyint(x[i] / scale);  // round half to even, as torch.round
      q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);
      xq8[i] = static_cast<int8_t>(q);
      xqf[i] = q;
    }
    sx[g] = scale;
    gsum[g] = sum;
  }
}

// A sub-byte row: sum over groups of scale_g * sx_g * (codes_g . xq_g) + low_g * sum(x_g).
// scales: (scale, low) bf16 pairs per group.
template <int BITS>
inline float dot_subbyte(const uint8_t* q, const uint16_t* scales, const GuardInput& in, int64_t n, int64_t group) {
  const int64_t groups = (n + group - 1) / group;
  float low = 0.f;
#ifdef TARDIS_AVX512
  __m512 acc = _mm512_setzero_ps();
#else
  float acc = 0.f;
#endif
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t size = g + 1 < groups ? group : n - g * group;
    const float scale = bf16_to_f32(scales[2 * g]) * in.sx[g];
    low += bf16_to_f32(scales[2 * g + 1]) * in.gsum[g];
#ifdef TARDIS_VNNI
    if (size == 64) {  // 64 products per instruction: unsigned codes x signed int8 x
      const __m512i xv = _mm512_loadu_si512(in.xq8 + g * group);
      const __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), group64_codes<BITS>(q), xv);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(scale), acc);
      q += (size * BITS + 7) / 8;
      continue;
    }
#endif
#ifdef TARDIS_AVX512
    __m512 part = group_codes_fma<BITS>(q, in.xqf + g * group, size, _mm512_setzero_ps());
    acc = _mm512_fmadd_ps(_mm512_set1_ps(scale), part, acc);
#else
    acc += scale * group_codes_dot<BITS>(q, in.xqf + g * group, size);
#endif
    q += (size * BITS + 7) / 8;
  }
#ifdef TARDIS_AVX512
  return _mm512_reduce_add_ps(acc) + low;
#else
  return acc + low;
#endif
}

int64_t subbyte_row_bytes(int64_t n, int64_t group, int bits) {
  int64_t total = 0;
  for (int64_t start = 0; start < n; start += group) {
    const int64_t size = start + group <= n ? group : n - start;
    total += (size * bits + 7) / 8;
  }
  return total;
}

// Sizes every buffer must have for `meta`; 0 if consistent with the numels given, else an error code.
int check_meta(const int64_t* m, int64_t n_weights, int64_t n_guard, int64_t n_floats) {
  if (m[MAGIC] != MAGIC_VALUE) return -1;
  if (m[VERSION] != LAYOUT_VERSION) return -2;
  if (m[N_WEIGHTS] != n_weights || m[N_GUARD] != n_guard || m[N_FLOATS] != n_floats) return -3;
  const int64_t d = m[D_IN], n = m[D_OUT], kg = m[K_GUARD], ka = m[K_ALWAYS], kb = kg + ka;
  if (d <= 0 || n <= 0 || kg < 0 || ka < 0 || kb > m[M] || m[KIND] < 0 || m[KIND] > 1) return -4;
  if (m[ACT] < 0 || m[ACT] > QUICK_GELU || m[DTYPE] < 0 || m[DTYPE] > 1) return -4;
  const int64_t row = (m[KIND] == GATED ? 2 * d : d) + n;
  if (m[STRIDE] < row) return -5;
  if (m[HAS_WF] && m[OFF_BUNDLES] < n * d) return -5;
  if (m[OFF_BUNDLES] < 0 || m[OFF_BUNDLES] + kb * m[STRIDE] > n_weights) return -5;
  int64_t guard_bytes = 0, p_floats = 0;
  switch (m[GUARD]) {
    case G_NONE: case G_EXACT: break;
    case G_INT8: guard_bytes = kg * d; break;
    case G_INT4: case G_INT2:
      if (m[GROUP] <= 0) return -6;
      guard_bytes = kg * subbyte_row_bytes(d, m[GROUP], m[GUARD] == G_INT4 ? 4 : 2);
      break;
    case G_SVD:
      if (m[RANK] <= 0) return -6;
      guard_bytes = kg * m[RANK] * 4;
      p_floats = m[RANK] * d;
      break;
    default: return -6;
  }
  if (m[GUARD] == G_NONE && kg) return -6;
  const int64_t groups = (m[GROUP] > 0) ? (d + m[GROUP] - 1) / m[GROUP] : 0;
  int64_t scale_bytes = m[GUARD] == G_INT8 ? kg * 4 : (m[GUARD] == G_INT4 || m[GUARD] == G_INT2) ? kg * groups * 4 : 0;
  if (m[OFF_GSCALES] < guard_bytes || m[OFF_GSCALES] + scale_bytes > n_guard) return -6;
  if (m[OFF_BF] < 0 || m[OFF_BF] + n > n_floats) return -7;
  if (m[OFF_BANDS] < 0 || m[OFF_BANDS] + 2 * kg > n_floats) return -7;
  if (m[OFF_NEURON] < 0 || m[OFF_NEURON] + NEURON_FLOATS * kb > n_floats) return -7;
  if (m[OFF_P] < 0 || m[OFF_P] + p_floats > n_floats) return -7;
  return 0;
}

// Row j of a low-bit guard decoded: `scaled` = scale * code per element and, for the sub-byte
// guards, `lows` = each group's minimum. The prediction is scaled . x (int8) or
// scaled . (sx * xq) + lows . gsum (sub-byte): the numbers dot_int8 / dot_subbyte compute.
void decode_row(const uint8_t* guard, const int64_t* m, int64_t j, float* scaled, float* lows) {
  const int64_t d = m[D_IN], group = m[GROUP];
  if (m[GUARD] == G_INT8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(guard) + j * d;
    const float scale = reinterpret_cast<const float*>(guard + m[OFF_GSCALES])[j];
    for (int64_t i = 0; i < d; ++i) scaled[i] = scale * static_cast<float>(q[i]);
    return;
  }
  const int bits = m[GUARD] == G_INT4 ? 4 : 2, per_byte = 8 / bits, mask = (1 << bits) - 1;
  const int64_t groups = (d + group - 1) / group;
  const uint8_t* q = guard + j * subbyte_row_bytes(d, group, bits);
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(guard + m[OFF_GSCALES]) + j * groups * 2;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t size = g + 1 < groups ? group : d - g * group, part = (size + per_byte - 1) / per_byte;
    const float scale = bf16_to_f32(scales[2 * g]);
    lows[g] = bf16_to_f32(scales[2 * g + 1]);
    float* o = scaled + g * group;
    for (int k = 0; k < per_byte; ++k) {
      const int64_t start = k * part, end = start + part < size ? start + part : size;
      const int shift = k * bits;
      for (int64_t e = start; e < end; ++e)  // vectorizes: a shift, a mask, a convert, a multiply
        o[e] = scale * static_cast<float>((q[e - start] >> shift) & mask);
    }
    q += part;
  }
}

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
#endif
  for (; t < tokens; ++t) out[t * out_stride] = dot(row, x + t * n, n);
}

template <class W>
inline void prefetch_bundle(const W* bundle, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(bundle);
  for (int64_t off = 0; off < bytes && off < PREFETCH_BYTES; off += 64) __builtin_prefetch(p + off);
}

// Per-call scratch of the calling thread, grown on demand (no allocation in steady state).
float* scratch(size_t floats) {
  static thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

int8_t* scratch_int8(size_t bytes) {
  static thread_local std::vector<int8_t> buffer;
  if (buffer.size() < bytes + 1) buffer.resize(bytes + 1);
  return buffer.data();
}

// A decoded guard row's predictions for `tokens` tokens: scaled . x_t (+ lows . gsum_t for the
// sub-byte guards, whose x is the dequantized int8 x), written to out[t * out_stride].
void predict_tokens(const float* scaled, const float* lows, const float* x, const float* gsum, int64_t tokens,
                    int64_t d, int64_t groups, float* out, int64_t out_stride) {
  dot_tokens(scaled, x, tokens, d, out, out_stride);
  for (int64_t t = 0; t < tokens && groups; ++t) {
    float low = 0.f;
    for (int64_t g = 0; g < groups; ++g) low += lows[g] * gsum[t * groups + g];
    out[t * out_stride] += low;
  }
}

template <class W>
int run(const W* x, W* y, const W* weights, const uint8_t* guard, const float* floats, const int64_t* m,
        int64_t tokens, int threads, int64_t* counters) {
  const int64_t d = m[D_IN], n = m[D_OUT], kg = m[K_GUARD], kb = kg + m[K_ALWAYS];
  const int64_t stride = m[STRIDE], group = m[GROUP], rank = m[RANK];
  const int kind = static_cast<int>(m[KIND]), act = static_cast<int>(m[ACT]), enc = static_cast<int>(m[GUARD]);
  const int64_t groups = group > 0 ? (d + group - 1) / group : 0;
  const int64_t guard_row = enc == G_INT8 ? d : (enc == G_INT4 || enc == G_INT2) ? subbyte_row_bytes(d, group, enc == G_INT4 ? 4 : 2) : 0;
  const W* wf = m[HAS_WF] ? weights : nullptr;
  const W* bundles = weights + m[OFF_BUNDLES];
  const float* bf = floats + m[OFF_BF];
  const float* bands = floats + m[OFF_BANDS];
  const float* neuron = floats + m[OFF_NEURON];
  const int64_t out_offset = kind == GATED ? 2 * d : d;
  const int64_t bundle_bytes = (out_offset + n) * static_cast<int64_t>(sizeof(W));

  // Scratch: x in fp32; for sub-byte guards x quantized per group (as floats, dequantized, and
  // their scales and sums); the svd projection; Wf's output; per-thread corrections and a decoded
  // guard row (with its group minimums) per thread.
  const bool subbyte = enc == G_INT4 || enc == G_INT2;
  const int64_t t_dim = enc == G_SVD ? rank : 0, q_dim = subbyte ? d : 0, g_dim = subbyte ? groups : 0;
  float* buf = scratch(tokens * (d + 2 * q_dim + 2 * g_dim + t_dim + n) +
                       static_cast<size_t>(threads) * (tokens * n + d + groups));
  float* xs = buf;
  float* xqf = xs + tokens * d;
  float* xdeq = xqf + tokens * q_dim;
  float* sx = xdeq + tokens * q_dim;
  float* gsum = sx + tokens * g_dim;
  float* proj = gsum + tokens * g_dim;
  float* yacc = proj + tokens * t_dim;
  float* local = yacc + tokens * n;
  float* rows_scratch = local + static_cast<int64_t>(threads) * tokens * n;
  int8_t* xq8 = scratch_int8(tokens * q_dim);
  for (int64_t i = 0; i < tokens * d; ++i) xs[i] = to_f32(x[i]);
  for (int64_t t = 0; t < tokens && subbyte; ++t) {
    quantize_token(xs + t * d, d, group, xq8 + t * d, xqf + t * d, sx + t * groups, gsum + t * groups);
    for (int64_t i = 0; i < d; ++i) xdeq[t * d + i] = xqf[t * d + i] * sx[t * groups + i / group];
  }
  for (int64_t t = 0; t < tokens && enc == G_SVD; ++t)
    for (int64_t r = 0; r < rank; ++r) proj[t * rank + r] = dot(floats + m[OFF_P] + r * d, xs + t * d, d);

  std::atomic<int64_t> next_chunk(0), flagged_pairs(0), corrected(0);
  int team = 1;
  const uint64_t all_tokens = tokens == 64 ? ~0ull : ((1ull << tokens) - 1ull);

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    if (tid == 0) team = nth;
    float* acc = local + static_cast<int64_t>(tid) * tokens * n;
    std::memset(acc, 0, sizeof(float) * tokens * n);
    for (int64_t r = tid * n / nth; r < (tid + 1) * n / nth; ++r)
      for (int64_t t = 0; t < tokens; ++t)
        yacc[t * n + r] = (wf ? dot(wf + r * d, xs + t * d, d) : 0.f) + bf[r];

    int64_t my_flagged = 0, my_corrected = 0;
    int64_t hit[CHUNK];
    uint64_t hit_mask[CHUNK];
    float zt[MAX_TOKENS];
    float* row = rows_scratch + static_cast<int64_t>(tid) * (d + groups);
    float* lows = row + d;
    for (;;) {
      const int64_t c0 = next_chunk.fetch_add(CHUNK, std::memory_order_relaxed);
      if (c0 >= kb) break;
      const int64_t c1 = c0 + CHUNK < kb ? c0 + CHUNK : kb;
      int hits = 0;
      // Guard pass: a sequential scan of the guard stream.
      for (int64_t j = c0; j < c1; ++j) {
        uint64_t mask = all_tokens;
        if (j < kg && tokens > 1 && (enc == G_INT8 || subbyte)) {
          decode_row(guard, m, j, row, lows);  // decoded once, then dotted with every token
          predict_tokens(row, lows, subbyte ? xdeq : xs, gsum, tokens, d, subbyte ? groups : 0, zt, 1);
          mask = 0;
          for (int64_t t = 0; t < tokens; ++t)
            if (zt[t] < bands[2 * j] || zt[t] > bands[2 * j + 1] || zt[t] != zt[t]) mask |= 1ull << t;
        } else if (j < kg) {
          mask = 0;
          for (int64_t t = 0; t < tokens; ++t) {
            const float* xt = xs + t * d;
            float z;
            switch (enc) {
              case G_INT8:
                z = dot_int8(reinterpret_cast<const int8_t*>(guard) + j * d, xt, d) *
                    reinterpret_cast<const float*>(guard + m[OFF_GSCALES])[j];
                break;
              case G_INT4:
              case G_INT2: {
                const GuardInput in{xq8 + t * d, xqf + t * d, sx + t * groups, gsum + t * groups};
                const uint8_t* q = guard + j * guard_row;
                const uint16_t* sc = reinterpret_cast<const uint16_t*>(guard + m[OFF_GSCALES]) + j * groups * 2;
                z = enc == G_INT4 ? dot_subbyte<4>(q, sc, in, d, group) : dot_subbyte<2>(q, sc, in, d, group);
                break;
              }
              case G_SVD:
                z = dot(reinterpret_cast<const float*>(guard) + j * rank, proj + t * rank, rank);
                break;
              default:  // G_EXACT: the bundle's own first row
                z = dot(bundles + j * stride, xt, d);
            }
            if (z < bands[2 * j] || z > bands[2 * j + 1] || z != z) mask |= 1ull << t;
          }
        }
        if (mask) {
          hit[hits] = j;
          hit_mask[hits++] = mask;
        }
      }
      // Exact pass: the flagged bundles, read in place.
      for (int h = 0; h < hits; ++h) {
        const int64_t j = hit[h];
        // Prefetch a later flagged bundle (PREFETCH_AHEAD on), so its lines arrive while this one is used.
        if (h == 0)
          for (int a = 1; a < PREFETCH_AHEAD && a < hits; ++a) prefetch_bundle(bundles + hit[a] * stride, bundle_bytes);
        if (h + PREFETCH_AHEAD < hits) prefetch_bundle(bundles + hit[h + PREFETCH_AHEAD] * stride, bundle_bytes);
        const W* b = bundles + j * stride;
        const float* nf = neuron + j * NEURON_FLOATS;
        ++my_corrected;
        for (int64_t t = 0; t < tokens; ++t) {
          if (!((hit_mask[h] >> t) & 1ull)) continue;
          ++my_flagged;
          const float* xt = xs + t * d;
          float delta;
          if (kind == GATED) {
            float g, u;
            dot2(b, b + d, xt, d, &g, &u);
            delta = (activation(act, g + nf[0]) - nf[3]) * (u + nf[1]);
          } else {
            const float z = dot(b, xt, d) + nf[0];
            delta = activation(act, z) - nf[2] * z - nf[3];
          }
          axpy(acc + t * n, delta, b + out_offset, n);
        }
      }
    }
    if (counters) {
      flagged_pairs.fetch_add(my_flagged, std::memory_order_relaxed);
      corrected.fetch_add(my_corrected, std::memory_order_relaxed);
    }
#pragma omp barrier
    for (int64_t r = tid * n / nth; r < (tid + 1) * n / nth; ++r)
      for (int64_t t = 0; t < tokens; ++t) {
        float s = yacc[t * n + r];
        for (int k = 0; k < nth; ++k) s += local[(static_cast<int64_t>(k) * tokens + t) * n + r];
        store(y + t * n + r, s);
      }
  }
  if (counters) {
    counters[0] += flagged_pairs.load();
    counters[1] += corrected.load();
    counters[2] = team;
  }
  return 0;
}

}  // namespace

extern "C" {

// The meta fields, in order: pack.py refuses a library whose list differs from its own.
const char* tardis_meta_layout() { return META_LAYOUT; }

int64_t tardis_layout_version() { return LAYOUT_VERSION; }

int tardis_simd_width() {
#ifdef TARDIS_AVX512
  return 16;
#else
  return 1;
#endif
}

// 0 if `meta` describes buffers of these sizes consistently, else a negative error code.
int tardis_check_meta(const int64_t* meta, int64_t n_weights, int64_t n_guard, int64_t n_floats) {
  return check_meta(meta, n_weights, n_guard, n_floats);
}

// y (tokens, d_out) = the FFN of x (tokens, d_in), both contiguous in the pack's dtype.
// counters (nullable): [flagged (token, neuron) pairs, neurons corrected] are added to, and
// counters[2] is set to the number of threads the call ran on.
// Returns 0, or a negative error code (nothing is written then).
int tardis_ffn(const void* x, void* y, const void* weights, const uint8_t* guard, const float* floats,
               const int64_t* meta, int64_t tokens, int64_t d_in, int64_t n_weights, int64_t n_guard,
               int64_t n_floats, int threads, int64_t* counters) {
  const int status = check_meta(meta, n_weights, n_guard, n_floats);
  if (status) return status;
  if (d_in != meta[D_IN]) return -8;
  if (tokens < 1 || tokens > MAX_TOKENS) return -9;
  if (threads < 1) threads = 1;
  if (meta[DTYPE] == 0)
    return run(static_cast<const float*>(x), static_cast<float*>(y), static_cast<const float*>(weights), guard,
               floats, meta, tokens, threads, counters);
  return run(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), static_cast<const uint16_t*>(weights),
             guard, floats, meta, tokens, threads, counters);
}

// The low-bit guard's predictions for many tokens (the batched path's flags, with the fused
// kernel's arithmetic): out (tokens, k_guard) fp32, bias excluded. Each thread decodes a row once
// into fp32 and dots it with every token. Returns 0, or a negative error code.
int tardis_guard_predict(const void* x, float* out, const uint8_t* guard, const int64_t* meta, int64_t tokens,
                         int64_t d_in, int64_t n_weights, int64_t n_guard, int64_t n_floats, int threads) {
  const int status = check_meta(meta, n_weights, n_guard, n_floats);
  if (status) return status;
  if (d_in != meta[D_IN]) return -8;
  if (meta[GUARD] != G_INT8 && meta[GUARD] != G_INT4 && meta[GUARD] != G_INT2) return -6;
  const int64_t rows = meta[K_GUARD], d = d_in, group = meta[GROUP];
  const bool subbyte = meta[GUARD] != G_INT8;
  const int64_t groups = subbyte ? (d + group - 1) / group : 0;
  std::vector<float> xs(tokens * d), xqf(tokens * d), sx(tokens * groups + 1), gsum(tokens * groups + 1);
  std::vector<int8_t> xq8(tokens * d);
  for (int64_t i = 0; i < tokens * d; ++i)
    xs[i] = meta[DTYPE] == 0 ? static_cast<const float*>(x)[i] : bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
  for (int64_t t = 0; t < tokens && subbyte; ++t) {  // the dequantized int8 x the sub-byte guards read
    quantize_token(xs.data() + t * d, d, group, xq8.data() + t * d, xqf.data() + t * d, sx.data() + t * groups,
                   gsum.data() + t * groups);
    for (int64_t i = 0; i < d; ++i) xs[t * d + i] = xqf[t * d + i] * sx[t * groups + i / group];
  }
#pragma omp parallel num_threads(threads < 1 ? 1 : threads)
  {
    std::vector<float> row(d), lows(groups + 1);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < rows; ++j) {
      decode_row(guard, meta, j, row.data(), lows.data());
      predict_tokens(row.data(), lows.data(), xs.data(), gsum.data(), tokens, d, groups, out + j, rows);
    }
  }
  return 0;
}

}  // extern "C"
