// tardis fused FFN kernel for CPU: one call per FFN, no torch headers (compiled at first use by
// runtime/cpu/build.py, called through ctypes by runtime/cpu/kernel.py).
//
// One call computes, for T tokens (decode: T = 1):
//   y = Wf x + bf + sum_{bundle neurons j flagged for the token} delta_j(x) * out_col_j
// gated:  g = gate_j . x + bg_j,  u = up_j . x + bu_j,  delta_j = (act(g) - c_j) * u
// plain:  z = w1_j . x + b1_j,    delta_j = act(z) - a_j z - c_j
// Guarded neurons (bundles [0, k_guard)) are flagged when the guard's prediction of their
// pre-activation leaves their band; always-exact neurons (bundles [k_guard, k_bundles)) are flagged
// for every token. With int8 bundles (meta BUNDLES 1), the guarded neurons' bundles are int8 codes
// in the guard buffer, scaled per row and column; the always-exact ones stay in the weights buffer.
// With int8 weights (BUNDLES 2: a quantized pack) every bundle is int8, and so is Wf (a scale per
// row), after the bundles in the guard buffer; codes are widened to fp32 as they are read, so the
// result is the dense FFN of the dequantized weights up to fp32 rounding. With int4 weights
// (BUNDLES 3) the same, every row int4 in groups of 32 with its bf16 (scale, minimum) pairs
// (dequant_int4_row): a bundle or a row of Wf is dequantized into the thread's scratch, then read
// as fp32.
// The layout of the buffers is written by runtime/pack.py; the meta fields are
// listed in META_LAYOUT, which pack.py checks against its own list when it loads this library.
//
// Threads: one OpenMP parallel region per call, on the libgomp torch itself loaded (build.py links
// that file), with torch.get_num_threads() threads. Each thread computes a slice of Wf's rows into
// a shared fp32 buffer, takes every nth chunk of neurons (a fixed split: deterministic sums) and
// accumulates their corrections into its own buffer; after one barrier the threads reduce disjoint
// output rows.
// All accumulation is fp32; weights are fp32 or bf16 (bf16 -> fp32 is a 16-bit shift). The vector
// primitives (dots, axpys, unpacking) are in ffn_simd.h.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "ffn_simd.h"

namespace {

using namespace tardis;

enum Meta : int {
  MAGIC, VERSION, KIND, ACT, DTYPE, D_IN, D_OUT, M, K_GUARD, K_ALWAYS, GUARD, GROUP, RANK, STRIDE,
  HAS_WF, OFF_BUNDLES, OFF_GSCALES, OFF_BF, OFF_BANDS, OFF_NEURON, OFF_P, N_WEIGHTS, N_GUARD,
  N_FLOATS, BUNDLES, QSTRIDE, OFF_QBUNDLES, OFF_QSCALES, META_LEN
};
const char* META_LAYOUT =
    "MAGIC,VERSION,KIND,ACT,DTYPE,D_IN,D_OUT,M,K_GUARD,K_ALWAYS,GUARD,GROUP,RANK,STRIDE,HAS_WF,"
    "OFF_BUNDLES,OFF_GSCALES,OFF_BF,OFF_BANDS,OFF_NEURON,OFF_P,N_WEIGHTS,N_GUARD,N_FLOATS,"
    "BUNDLES,QSTRIDE,OFF_QBUNDLES,OFF_QSCALES";
const int64_t MAGIC_VALUE = 0x7a4d5446;  // "FTMz"
const int64_t LAYOUT_VERSION = 2;
// How the bundles and Wf are stored: all dense; the guarded bundles int8; everything int8; everything int4.
enum Bundles { B_DENSE = 0, B_INT8 = 1, B_INT8_ALL = 2, B_INT4_ALL = 3 };
const int QSCALES = 3;                    // int8 bundle scales: first row, up row, output column
enum Kind { PLAIN = 0, GATED = 1 };
enum Guard { G_NONE = 0, G_INT8 = 1, G_INT4 = 2, G_INT2 = 3, G_EXACT = 4, G_SVD = 5 };
const int NEURON_FLOATS = 4;  // bias (gate / w1), bias (up), slope, intercept
const int64_t CHUNK = 64;     // neurons per work item
const int64_t MAX_TOKENS = 64;  // token masks are 64-bit
const int64_t WF_TOKENS = 4;    // calls of this many tokens or more read Wf row by row (wf_row_tokens)
template <class W>
constexpr bool DTYPE_IS_BF16 = sizeof(W) == 2;  // W is float or uint16_t (bf16)
const int64_t MAX_DIM = 1 << 20;  // largest d_in, d_out, m, group (runtime/layout.py MAX_DIM)
// Element types of the buffers the entry points are given (runtime/cpu/kernel.py BUFFER_TYPES):
// each call says what every buffer holds, and a call whose types differ from the pack's is refused.
enum BufferType { T_F32 = 0, T_BF16 = 1, T_F16 = 2, T_F64 = 3, T_U8 = 4, T_I8 = 5, T_I32 = 6, T_I64 = 7 };
const char* BUFFER_TYPES = "float32,bfloat16,float16,float64,uint8,int8,int32,int64";
#ifndef TARDIS_PREFETCH_BYTES
#define TARDIS_PREFETCH_BYTES 4096
#endif
#ifndef TARDIS_PREFETCH_AHEAD
#define TARDIS_PREFETCH_AHEAD 1
#endif
const int64_t PREFETCH_BYTES = TARDIS_PREFETCH_BYTES;  // at most this much of a bundle is prefetched
const int PREFETCH_AHEAD = TARDIS_PREFETCH_AHEAD;      // flagged bundles ahead of the one in use

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

// Groups whose scales are prepared in one vector step (below).
#if defined(TARDIS_AVX2)
const int64_t SCALE_BLOCK = 8;
#else
const int64_t SCALE_BLOCK = 16;
#endif

// `count` (<= SCALE_BLOCK) groups' (scale, low) bf16 pairs against the token's per-group x scales
// and sums: writes scale_g * sx_g to `out` and returns sum_g low_g * gsum_g. One vector step, not a
// dozen scalar instructions per group: at batch 1 those dominated the guard.
inline float group_scales(const uint16_t* scales, const float* sx, const float* gsum, int64_t count, float* out) {
#if defined(TARDIS_AVX512)
  const __mmask16 k = tail_mask(count);  // each 32-bit lane: scale (low half), low (high half)
  const __m512i pairs = _mm512_maskz_loadu_epi32(k, scales);
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  const __m512 lows = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  _mm512_storeu_ps(out, _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(k, sx)));
  return _mm512_reduce_add_ps(_mm512_mul_ps(lows, _mm512_maskz_loadu_ps(k, gsum)));
#elif defined(TARDIS_AVX2)
  const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i pairs = _mm256_maskload_epi32(reinterpret_cast<const int*>(scales), k);
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
  const __m256 lows = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  _mm256_storeu_ps(out, _mm256_mul_ps(scale, _mm256_maskload_ps(sx, k)));
  return hsum8(_mm256_mul_ps(lows, _mm256_maskload_ps(gsum, k)));
#else
  float low = 0.f;
  for (int64_t g = 0; g < count; ++g) {
    out[g] = bf16_to_f32(scales[2 * g]) * sx[g];
    low += bf16_to_f32(scales[2 * g + 1]) * gsum[g];
  }
  return low;
#endif
}

// A sub-byte row: sum over groups of scale_g * sx_g * (codes_g . xq_g) + low_g * sum(x_g).
// scales: (scale, low) bf16 pairs per group.
template <int BITS>
inline float dot_subbyte(const uint8_t* q, const uint16_t* scales, const GuardInput& in, int64_t n, int64_t group) {
  const int64_t groups = (n + group - 1) / group;
  float low = 0.f, acc_scalar = 0.f;  // acc_scalar: groups the vector paths leave to scalar loops
  float block_scales[SCALE_BLOCK];
#if defined(TARDIS_AVX512)
  __m512 acc = _mm512_setzero_ps();
#elif defined(TARDIS_AVX2)
  __m256 acc = _mm256_setzero_ps();
#endif
  for (int64_t g0 = 0; g0 < groups; g0 += SCALE_BLOCK) {
    const int64_t count = groups - g0 < SCALE_BLOCK ? groups - g0 : SCALE_BLOCK;
    low += group_scales(scales + 2 * g0, in.sx + g0, in.gsum + g0, count, block_scales);
    for (int64_t g = g0; g < g0 + count; ++g) {
      const int64_t size = g + 1 < groups ? group : n - g * group;
      const float scale = block_scales[g - g0];
#ifdef TARDIS_VNNI
      if (size == 64) {  // 64 products per instruction: unsigned codes x signed int8 x
        const __m512i xv = _mm512_loadu_si512(in.xq8 + g * group);
        const __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), group64_codes<BITS>(q), xv);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(scale), acc);
        q += (size * BITS + 7) / 8;
        continue;
      }
#endif
#ifdef TARDIS_AVX2
      if (size == 64) {  // 32 products per instruction pair (one with AVX-VNNI)
        __m256i lo, hi;
        group64_codes_avx2<BITS>(q, &lo, &hi);
        const __m256i* xv = reinterpret_cast<const __m256i*>(in.xq8 + g * group);
        const __m256i dots = _mm256_add_epi32(dot_u8s8(lo, _mm256_loadu_si256(xv)), dot_u8s8(hi, _mm256_loadu_si256(xv + 1)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(scale), acc);
        q += (size * BITS + 7) / 8;
        continue;
      }
#endif
#ifdef TARDIS_AVX512
      __m512 part = group_codes_fma<BITS>(q, in.xqf + g * group, size, _mm512_setzero_ps());
      acc = _mm512_fmadd_ps(_mm512_set1_ps(scale), part, acc);
#else
      acc_scalar += scale * group_codes_dot<BITS>(q, in.xqf + g * group, size);
#endif
      q += (size * BITS + 7) / 8;
    }
  }
#if defined(TARDIS_AVX512)
  return _mm512_reduce_add_ps(acc) + acc_scalar + low;
#elif defined(TARDIS_AVX2)
  return hsum8(acc) + acc_scalar + low;
#else
  return acc_scalar + low;
#endif
}

int64_t subbyte_row_bytes(int64_t n, int64_t group, int bits) {
  // Closed form of the per-group sum (runtime/layout.py guard_codes_bytes computes the same).
  return (n / group) * ((group * bits + 7) / 8) + ((n % group) * bits + 7) / 8;
}

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// An int4 weight row's codes and all its bytes (runtime/layout.py int4_codes_bytes / int4_row_bytes).
int64_t int4_codes_bytes(int64_t n) { return round_up(subbyte_row_bytes(n, INT4_GROUP, 4), 4); }
int64_t int4_row_bytes(int64_t n) { return int4_codes_bytes(n) + 4 * ((n + INT4_GROUP - 1) / INT4_GROUP); }

// The meta fields a pack of these shapes and codes has: runtime/layout.py Layout.meta(), recomputed
// here so that no field the kernel indexes with can disagree with the rest. 0 if `m` is exactly
// that and its buffers hold n_weights / n_guard / n_floats elements, else a negative error code.
// Every dimension is bounded first (MAX_DIM), so no product below overflows int64.
int check_meta(const int64_t* m, int64_t n_weights, int64_t n_guard, int64_t n_floats) {
  if (m[MAGIC] != MAGIC_VALUE) return -1;
  if (m[VERSION] != LAYOUT_VERSION) return -2;
  const int64_t d = m[D_IN], n = m[D_OUT], kg = m[K_GUARD], ka = m[K_ALWAYS], group = m[GROUP], rank = m[RANK];
  if (d < 1 || d > MAX_DIM || n < 1 || n > MAX_DIM || m[M] < 1 || m[M] > MAX_DIM) return -4;
  if (kg < 0 || ka < 0 || kg > m[M] || ka > m[M] - kg) return -4;
  if (group < 1 || group > MAX_DIM) return -4;
  if (m[KIND] != PLAIN && m[KIND] != GATED) return -4;
  if (m[ACT] < RELU || m[ACT] > QUICK_GELU || m[DTYPE] < 0 || m[DTYPE] > 1) return -4;
  if (m[HAS_WF] != 0 && m[HAS_WF] != 1) return -4;
  if (m[BUNDLES] < B_DENSE || m[BUNDLES] > B_INT4_ALL) return -10;
  const int64_t enc = m[GUARD];
  if (enc < G_NONE || enc > G_SVD) return -6;
  if ((enc == G_NONE) != (kg == 0)) return -6;
  if (enc == G_SVD ? (rank < 1 || rank > MAX_DIM) : rank != 0) return -6;
  const bool int4 = m[BUNDLES] == B_INT4_ALL, quant_all = int4 || m[BUNDLES] == B_INT8_ALL;
  const bool int8_guarded = m[BUNDLES] == B_INT8, int8_all = m[BUNDLES] == B_INT8_ALL;
  if (int8_guarded && (enc == G_NONE || enc == G_EXACT)) return -10;  // "exact" reads the bundles' rows

  const int64_t elem = m[DTYPE] == 0 ? 4 : 2, kb = kg + ka, inputs = m[KIND] == GATED ? 2 : 1;
  const int64_t row = inputs * d + n;
  const int64_t stride = round_up(row, 64 / elem);
  const int64_t qwf = quant_all && m[HAS_WF] ? n * (int4 ? int4_row_bytes(d) : d) : 0;  // quantized Wf
  const int64_t off_bundles = round_up(m[HAS_WF] && !quant_all ? n * d : 0, 64 / elem);
  const int64_t k_int8 = quant_all ? kb : int8_guarded ? kg : 0, k_dense = kb - k_int8;
  const int64_t q_bytes = int4 ? inputs * int4_row_bytes(d) + int4_row_bytes(n) : row;  // one quantized bundle
  const int64_t q_scales = int4 ? 0 : QSCALES;  // float scales per quantized bundle
  const int64_t code_bytes = enc == G_INT8 ? d
                             : (enc == G_INT4 || enc == G_INT2) ? subbyte_row_bytes(d, group, enc == G_INT4 ? 4 : 2)
                             : enc == G_SVD ? 4 * rank : 0;
  const int64_t scale_bytes = enc == G_INT8 ? 4 : (enc == G_INT4 || enc == G_INT2) ? 4 * ((d + group - 1) / group) : 0;
  const int64_t off_gscales = round_up(kg * code_bytes, 16), end_gscales = off_gscales + kg * scale_bytes;
  const int64_t qstride = k_int8 ? round_up(q_bytes, 64) : 0;
  const int64_t off_qbundles = k_int8 || qwf ? round_up(end_gscales, 64) : end_gscales;
  const int64_t off_neuron = n + 2 * kg, off_p = off_neuron + NEURON_FLOATS * kb;
  const int64_t off_qscales = off_p + (enc == G_SVD ? rank * d : 0);
  const int64_t want[][2] = {
      {STRIDE, stride}, {OFF_BUNDLES, off_bundles}, {OFF_GSCALES, off_gscales}, {OFF_BF, 0}, {OFF_BANDS, n},
      {OFF_NEURON, off_neuron}, {OFF_P, off_p}, {N_WEIGHTS, off_bundles + k_dense * stride},
      {N_GUARD, off_qbundles + k_int8 * qstride + qwf}, {N_FLOATS, off_qscales + q_scales * k_int8 + (qwf && !int4 ? n : 0) + (int8_all ? n : 0)},
      {QSTRIDE, qstride}, {OFF_QBUNDLES, off_qbundles}, {OFF_QSCALES, off_qscales}};
  for (const auto& field : want)
    if (m[field[0]] != field[1]) return -5;
  if (m[N_WEIGHTS] != n_weights || m[N_GUARD] != n_guard || m[N_FLOATS] != n_floats) return -3;
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

// Always inlined: GCC judges a function that only prefetches to have no effect and deletes the
// calls (it did: no prefetch instruction was emitted until this was inlined by force).
__attribute__((always_inline)) inline void prefetch_bundle(const void* bundle, int64_t bytes) {
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

// What one call reads, resolved from the meta once.
template <class W>
struct Call {
  const int64_t* m;
  int64_t tokens, d, n, kg, kb, stride, group, groups, rank, guard_row, out_offset, bundle_bytes;
  int kind, act, enc;
  bool subbyte;
  bool int4;                       // int4 weights: every quantized row is int4 (dequant_int4_row)
  int64_t q_bytes;                 // bytes of one quantized bundle (prefetch)
  int64_t row4_d, row4_n, codes4_d, codes4_n;  // int4 rows of d and n elements: all bytes, code bytes
  const W* wf;             // dense Wf, or null
  const int8_t* qwf;       // quantized Wf (int8 or int4 weights), or null
  const float* wf_scales;  // its per-row scales
  const float* out_scales; // int8 weights: the output columns' per-channel scales (else null)
  const W* bundles;        // dense bundles: all of them, the always-exact ones (int8 bundles), or none
  const int8_t* qbundles;  // int8 bundles [0, dense_from), or null
  const float* qscales;    // their (first, up, out) scales
  int64_t qstride, dense_from;  // dense bundle of neuron j: bundles + (j - dense_from) * stride
  const uint8_t* guard;
  const float *bf, *bands, *neuron, *p;
  // Per-call inputs (see run): x in fp32; for sub-byte guards x quantized per group (as int8 and
  // floats, dequantized, with its scales and sums); the svd projection.
  const float *xs, *xqf, *xdeq, *sx, *gsum, *proj;
  const int8_t* xq8;
  const uint16_t* x16;  // x itself when the model is bf16 (the bf16 dots read it), else null
};

// The token mask of guarded neuron j (bit t set: flagged for token t). `row`, `lows`, `zt` are
// the thread's scratch for a decoded guard row and its predictions.
template <class W>
uint64_t flag_tokens(const Call<W>& c, int64_t j, float* row, float* lows, float* zt) {
  const int64_t d = c.d, t_count = c.tokens;
  if (t_count > 1 && (c.enc == G_INT8 || c.subbyte)) {  // decode once, then dot with every token
    decode_row(c.guard, c.m, j, row, lows);
    predict_tokens(row, lows, c.subbyte ? c.xdeq : c.xs, c.gsum, t_count, d, c.subbyte ? c.groups : 0, zt, 1);
  } else if (c.enc == G_EXACT && j < c.dense_from) {  // a quantized pack's own first row, widened once
    if (c.int4)
      dequant_int4_row(reinterpret_cast<const uint8_t*>(c.qbundles + j * c.qstride), d, c.codes4_d, row);
    else
      widen(c.qbundles + j * c.qstride, c.qscales[j * QSCALES], d, row);
    dot_tokens(row, c.xs, t_count, d, zt, 1);
  } else {
    for (int64_t t = 0; t < t_count; ++t) {
      const float* xt = c.xs + t * d;
      switch (c.enc) {
        case G_INT8:
          zt[t] = dot_int8(reinterpret_cast<const int8_t*>(c.guard) + j * d, xt, d) *
                  reinterpret_cast<const float*>(c.guard + c.m[OFF_GSCALES])[j];
          break;
        case G_INT4:
        case G_INT2: {
          const GuardInput in{c.xq8 + t * d, c.xqf + t * d, c.sx + t * c.groups, c.gsum + t * c.groups};
          const uint8_t* q = c.guard + j * c.guard_row;
          const uint16_t* sc = reinterpret_cast<const uint16_t*>(c.guard + c.m[OFF_GSCALES]) + j * c.groups * 2;
          zt[t] = c.enc == G_INT4 ? dot_subbyte<4>(q, sc, in, d, c.group) : dot_subbyte<2>(q, sc, in, d, c.group);
          break;
        }
        case G_SVD:
          zt[t] = dot(reinterpret_cast<const float*>(c.guard) + j * c.rank, c.proj + t * c.rank, c.rank);
          break;
        default:  // G_EXACT: the bundle's own first row (dense here: quantized ones take the branch above)
          zt[t] = dot(c.bundles + j * c.stride, xt, d);
      }
    }
  }
  // Bitwise, not short-circuit: whether a neuron is flagged is data, so branches would mispredict.
  const float lo = c.bands[2 * j], hi = c.bands[2 * j + 1];
  uint64_t mask = 0;
  for (int64_t t = 0; t < t_count; ++t)
    mask |= static_cast<uint64_t>((zt[t] < lo) | (zt[t] > hi) | (zt[t] != zt[t])) << t;
  return mask;
}

// The exact path of one bundle `b` (elements of type B: the model's dtype, or int8 codes with
// the row / column scales `s`) for the tokens in `mask`: acc[t] += delta(x_t) * out_col.
// Returns the number of (token, neuron) pairs corrected.
template <class W, class B>
int64_t correct_bundle(const Call<W>& c, const B* b, const float* nf, const float* s, uint64_t mask, float* acc) {
  int64_t pairs = 0;
  for (int64_t t = 0; t < c.tokens; ++t) {
    if (!((mask >> t) & 1ull)) continue;
    ++pairs;
    const float* xt = c.xs + t * c.d;
    float delta;
    if (c.kind == GATED) {
      float g, u;
      dot2(b, b + c.d, xt, c.d, &g, &u);  // the gate and up rows share one pass over x
      delta = (activation(c.act, s[0] * g + nf[0]) - nf[3]) * (s[1] * u + nf[1]);
    } else {
      const float z = s[0] * dot(b, xt, c.d) + nf[0];
      delta = activation(c.act, z) - nf[2] * z - nf[3];
    }
    axpy(acc + t * c.n, s[2] * delta, b + c.out_offset, c.n);
  }
  return pairs;
}


const float UNIT_SCALES[QSCALES] = {1.f, 1.f, 1.f};

// Bundles per block of the exact_all path: their output columns are added to a token's
// accumulator row in one pass (axpy_rows).
const int EXACT_BLOCK = 8;
const int64_t TOKEN_BLOCK = 8;  // tokens whose x one pass over a block's rows reads (8 * d floats)

// One bundle's rows widened to fp32 (scales applied) into `first`, `up` (d each) and `out` (n).
template <class W, class B>
void widen_bundle(const Call<W>& c, const B* b, const float* s, float* first, float* up, float* out) {
  widen(b, s[0], c.d, first);
  if (c.kind == GATED) widen(b + c.d, s[1], c.d, up);
  widen(b + c.out_offset, s[2], c.n, out);
}

// One int4 bundle (its first, up and output rows back to back, each with its group scales)
// dequantized into `first`, `up` (d each) and `out` (n).
template <class W>
void dequant_int4_bundle(const Call<W>& c, const uint8_t* b, float* first, float* up, float* out) {
  dequant_int4_row(b, c.d, c.codes4_d, first);
  if (c.kind == GATED) dequant_int4_row(b + c.row4_d, c.d, c.codes4_d, up);
  dequant_int4_row(b + (c.kind == GATED ? 2 : 1) * c.row4_d, c.n, c.codes4_n, out);
}

// Quantized bundle j (j < dense_from) widened to fp32: int8 codes times their scales, or int4 rows.
template <class W>
void widen_quantized(const Call<W>& c, int64_t j, float* first, float* up, float* out) {
  if (c.int4)
    dequant_int4_bundle(c, reinterpret_cast<const uint8_t*>(c.qbundles + j * c.qstride), first, up, out);
  else
    widen_bundle(c, c.qbundles + j * c.qstride, c.qscales + j * QSCALES, first, up, out);
}

// delta of bundle j for `tb` tokens from its raw first / up dots (z, u) and their row scales:
// delta[t * EXACT_BLOCK] = the exact activation minus the folded line (plain) or constant (gated).
template <class W>
inline void block_deltas(const Call<W>& c, int64_t j, const float* z, const float* u, float sf, float su,
                         int64_t tb, float* delta) {
  const float* nf = c.neuron + j * NEURON_FLOATS;
  for (int64_t t = 0; t < tb; ++t) {
    const float zt = sf * z[t] + nf[0];
    delta[t * EXACT_BLOCK] = c.kind == GATED ? (activation(c.act, zt) - nf[3]) * (su * u[t] + nf[1])
                                             : activation(c.act, zt) - nf[2] * zt - nf[3];
  }
}

#ifdef TARDIS_BF16_DOT
// correct_block_all in a bf16 model with int8 or bf16 rows: the first and up rows are read as bf16
// (int8 codes widened to bf16 once, exactly; bf16 bundles in place) by vdpbf16ps, their scales
// applied to the sums; the output columns as in correct_block_all.
template <class W>
void correct_block_all_bf16(const Call<W>& c, int64_t j0, int count, float* acc, float* wide) {
  const int64_t d = c.d, n = c.n;
  const bool gated = c.kind == GATED;
  uint16_t* rows16 = reinterpret_cast<uint16_t*>(wide);  // 2 * d bf16 per bundle: half of its fp32 room
  float* outs = wide + EXACT_BLOCK * 2 * d;
  const uint16_t *first[EXACT_BLOCK], *up[EXACT_BLOCK];
  float sf[EXACT_BLOCK], su[EXACT_BLOCK];
  float z[EXACT_BLOCK][TOKEN_BLOCK], u[EXACT_BLOCK][TOKEN_BLOCK], delta[TOKEN_BLOCK * EXACT_BLOCK];
  for (int k = 0; k < count; ++k) {
    const int64_t j = j0 + k;
    if (j < c.dense_from) {
      const int8_t* b = c.qbundles + j * c.qstride;
      const float* s = c.qscales + j * QSCALES;
      uint16_t* f = rows16 + k * 2 * d;
      widen_bf16(b, d, f);
      if (gated) widen_bf16(b + d, d, f + d);
      first[k] = f, up[k] = f + d, sf[k] = s[0], su[k] = s[1];
      widen(b + c.out_offset, s[2], n, outs + k * n);
    } else {
      const uint16_t* b = reinterpret_cast<const uint16_t*>(c.bundles + (j - c.dense_from) * c.stride);
      first[k] = b, up[k] = b + d, sf[k] = su[k] = 1.f;
      widen(b + c.out_offset, 1.f, n, outs + k * n);
    }
  }
  for (int64_t t0 = 0; t0 < c.tokens; t0 += TOKEN_BLOCK) {
    const int64_t tb = c.tokens - t0 < TOKEN_BLOCK ? c.tokens - t0 : TOKEN_BLOCK;
    const uint16_t* xb = c.x16 + t0 * d;
    for (int k = 0; k < count; ++k) {
      if (gated)
        dot_bf16_tokens<2>(first[k], up[k], xb, tb, d, z[k], u[k]);
      else
        dot_bf16_tokens<1>(first[k], first[k], xb, tb, d, z[k], z[k]);
      block_deltas(c, j0 + k, z[k], u[k], sf[k], su[k], tb, delta + k);
    }
    axpy_rows_tokens(acc + t0 * n, delta, EXACT_BLOCK, tb, count, outs, n, n);
  }
}
#endif

// Row r of Wf against every token of the call (4 or more): read once, widened once (bf16 model:
// to bf16 for vdpbf16ps; else to fp32), out[t] = Wf[r] . x_t. Not for int4 rows.
template <class W>
void wf_row_tokens(const Call<W>& c, int64_t r, float* scratch, float* out) {
  const int64_t d = c.d;
#ifdef TARDIS_BF16_DOT
  if (c.x16) {
    const uint16_t* row = reinterpret_cast<const uint16_t*>(scratch);
    if (c.qwf)
      widen_bf16(c.qwf + r * d, d, reinterpret_cast<uint16_t*>(scratch));
    else
      row = reinterpret_cast<const uint16_t*>(c.wf + r * d);
    dot_bf16_tokens<1>(row, row, c.x16, c.tokens, d, out, out);
    if (c.qwf)
      for (int64_t t = 0; t < c.tokens; ++t) out[t] *= c.wf_scales[r];
    return;
  }
#endif
  if (c.qwf)
    widen(c.qwf + r * d, c.wf_scales[r], d, scratch);
  else
    widen(c.wf + r * d, 1.f, d, scratch);
  dot_tokens(scratch, c.xs, c.tokens, d, out, 1);
}

// The exact path of bundles [j0, j0 + count) for every token of the call (exact_all): each
// bundle widened to fp32 once into `wide` (EXACT_BLOCK * (2 * d + n) floats), its pre-activations
// for four tokens per pass over its rows, then each token's accumulator row updated once for the
// whole block.
template <class W>
void correct_block_all(const Call<W>& c, int64_t j0, int count, float* acc, float* wide) {
#ifdef TARDIS_BF16_DOT
  if (c.x16 && !c.int4) return correct_block_all_bf16(c, j0, count, acc, wide);
#endif
  const int64_t d = c.d, n = c.n;
  float* outs = wide + EXACT_BLOCK * 2 * d;  // the block's output columns, n apart
  float z[EXACT_BLOCK][TOKEN_BLOCK], u[EXACT_BLOCK][TOKEN_BLOCK], delta[TOKEN_BLOCK * EXACT_BLOCK];
  for (int k = 0; k < count; ++k) {
    const int64_t j = j0 + k;
    float* first = wide + k * 2 * d;
    if (j < c.dense_from)
      widen_quantized(c, j, first, first + d, outs + k * n);
    else
      widen_bundle(c, c.bundles + (j - c.dense_from) * c.stride, UNIT_SCALES, first, first + d, outs + k * n);
  }
  // A block of tokens at a time (their x stays in L1), every bundle of the block against it.
  for (int64_t t0 = 0; t0 < c.tokens; t0 += TOKEN_BLOCK) {
    const int64_t tb = c.tokens - t0 < TOKEN_BLOCK ? c.tokens - t0 : TOKEN_BLOCK;
    const float* xb = c.xs + t0 * d;
    for (int k = 0; k < count; ++k) {
      const float* first = wide + k * 2 * d;
      if (c.kind == GATED)
        dot2_tokens(first, first + d, xb, tb, d, z[k], u[k]);
      else
        dot_tokens(first, xb, tb, d, z[k], 1);
      block_deltas(c, j0 + k, z[k], u[k], 1.f, 1.f, tb, delta + k);  // scales applied when widened
    }
    axpy_rows_tokens(acc + t0 * n, delta, EXACT_BLOCK, tb, count, outs, n, n);
  }
}

// The exact path of bundle j (guarded neurons first, then the always-exact ones). `dec`: the
// thread's scratch for an int4 bundle dequantized (2 * d + n floats).
template <class W>
int64_t correct(const Call<W>& c, int64_t j, uint64_t mask, float* acc, float* dec) {
  const float* nf = c.neuron + j * NEURON_FLOATS;
  if (j < c.dense_from && c.int4) {
    widen_quantized(c, j, dec, dec + c.d, dec + c.out_offset);
    return correct_bundle(c, dec, nf, UNIT_SCALES, mask, acc);
  }
  if (j < c.dense_from)
    return correct_bundle(c, c.qbundles + j * c.qstride, nf, c.qscales + j * QSCALES, mask, acc);
  return correct_bundle(c, c.bundles + (j - c.dense_from) * c.stride, nf, UNIT_SCALES, mask, acc);
}

// Prefetch bundle j (int8 or dense, each with its own size).
template <class W>
__attribute__((always_inline)) inline void prefetch_neuron(const Call<W>& c, int64_t j) {
  if (j < c.dense_from)
    prefetch_bundle(c.qbundles + j * c.qstride, c.q_bytes);
  else
    prefetch_bundle(c.bundles + (j - c.dense_from) * c.stride, c.bundle_bytes);
}

template <class W>
int run(const W* x, W* y, const W* weights, const uint8_t* guard, const float* floats, const int64_t* m,
        int64_t tokens, bool exact_all, int threads, int64_t* counters) {
  Call<W> c{};
  c.m = m;
  c.tokens = tokens, c.d = m[D_IN], c.n = m[D_OUT], c.kg = m[K_GUARD], c.kb = m[K_GUARD] + m[K_ALWAYS];
  c.stride = m[STRIDE], c.group = m[GROUP], c.rank = m[RANK];
  c.kind = static_cast<int>(m[KIND]), c.act = static_cast<int>(m[ACT]), c.enc = static_cast<int>(m[GUARD]);
  c.subbyte = c.enc == G_INT4 || c.enc == G_INT2;
  c.groups = c.group > 0 ? (c.d + c.group - 1) / c.group : 0;
  c.guard_row = c.enc == G_INT8 ? c.d : c.subbyte ? subbyte_row_bytes(c.d, c.group, c.enc == G_INT4 ? 4 : 2) : 0;
  c.int4 = m[BUNDLES] == B_INT4_ALL;
  const bool quant_all = c.int4 || m[BUNDLES] == B_INT8_ALL;
  const int64_t k_int8 = quant_all ? c.kb : m[BUNDLES] == B_INT8 ? c.kg : 0;
  c.wf = m[HAS_WF] && !quant_all ? weights : nullptr;
  c.bundles = weights + m[OFF_BUNDLES];
  c.qbundles = reinterpret_cast<const int8_t*>(guard + m[OFF_QBUNDLES]);
  c.qscales = floats + m[OFF_QSCALES];
  c.qstride = m[QSTRIDE], c.dense_from = k_int8;
  c.qwf = m[HAS_WF] && quant_all ? c.qbundles + k_int8 * c.qstride : nullptr;  // Wf follows the quantized bundles
  c.wf_scales = c.qscales + QSCALES * k_int8;
  c.out_scales = m[BUNDLES] == B_INT8_ALL ? c.wf_scales + (c.qwf ? c.n : 0) : nullptr;
  c.guard = guard;
  c.bf = floats + m[OFF_BF], c.bands = floats + m[OFF_BANDS], c.neuron = floats + m[OFF_NEURON];
  c.p = floats + m[OFF_P];
  c.out_offset = c.kind == GATED ? 2 * c.d : c.d;
  c.bundle_bytes = (c.out_offset + c.n) * static_cast<int64_t>(sizeof(W));  // a dense bundle
  c.codes4_d = int4_codes_bytes(c.d), c.codes4_n = int4_codes_bytes(c.n);
  c.row4_d = int4_row_bytes(c.d), c.row4_n = int4_row_bytes(c.n);
  c.q_bytes = c.int4 ? (c.kind == GATED ? 2 : 1) * c.row4_d + c.row4_n : c.out_offset + c.n;
  const int64_t d = c.d, n = c.n, kb = c.kb, groups = c.groups;

  // Scratch (grown once, then reused): the per-call inputs of `c`, Wf's output, per-thread
  // corrections, and per thread one decoded guard row with its group minimums.
  const int64_t t_dim = c.enc == G_SVD ? c.rank : 0, q_dim = c.subbyte ? d : 0, g_dim = c.subbyte ? groups : 0;
  // Per thread: exact_all's block of widened bundles, or one int4 bundle (or row of Wf) dequantized.
  // Calls of WF_TOKENS or more tokens read each row of Wf once for all of them (wf_row_tokens).
  const bool wf_by_row = tokens >= WF_TOKENS && !c.int4 && (c.wf || c.qwf);
  const int64_t wide_dim = exact_all ? EXACT_BLOCK * (2 * d + n) : c.int4 ? 2 * d + n : wf_by_row ? d : 0;
  float* buf = scratch(tokens * (d + 2 * q_dim + 2 * g_dim + t_dim + n) +
                       static_cast<size_t>(threads) * (tokens * n + d + groups + wide_dim));
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
  for (int64_t t = 0; t < tokens && c.subbyte; ++t) {
    quantize_token(xs + t * d, d, c.group, xq8 + t * d, xqf + t * d, sx + t * groups, gsum + t * groups);
    for (int64_t i = 0; i < d; ++i) xdeq[t * d + i] = xqf[t * d + i] * sx[t * groups + i / c.group];
  }
  for (int64_t t = 0; t < tokens && c.enc == G_SVD; ++t)
    for (int64_t r = 0; r < c.rank; ++r) proj[t * c.rank + r] = dot(c.p + r * d, xs + t * d, d);
  c.xs = xs, c.xqf = xqf, c.xdeq = xdeq, c.sx = sx, c.gsum = gsum, c.proj = proj, c.xq8 = xq8;
  c.x16 = DTYPE_IS_BF16<W> ? reinterpret_cast<const uint16_t*>(x) : nullptr;

  std::atomic<int64_t> flagged_pairs(0), corrected(0);
  int team = 1;
  const uint64_t all_tokens = tokens == 64 ? ~0ull : ((1ull << tokens) - 1ull);

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    if (tid == 0) team = nth;
    float* acc = local + static_cast<int64_t>(tid) * tokens * n;
    std::memset(acc, 0, sizeof(float) * tokens * n);
    float* wide = rows_scratch + static_cast<int64_t>(threads) * (d + groups) + static_cast<int64_t>(tid) * wide_dim;
    // 1. This thread's rows of Wf x + bf, into the shared buffer.
    for (int64_t r = tid * n / nth; r < (tid + 1) * n / nth; ++r) {
      if (wf_by_row) {
        float wt[MAX_TOKENS];
        wf_row_tokens(c, r, wide, wt);
        for (int64_t t = 0; t < tokens; ++t) yacc[t * n + r] = wt[t] + c.bf[r];
        continue;
      }
      if (c.qwf && c.int4)  // an int4 row: dequantized once, read by every token
        dequant_int4_row(reinterpret_cast<const uint8_t*>(c.qwf) + r * c.row4_d, d, c.codes4_d, wide);
      for (int64_t t = 0; t < tokens; ++t) {
        const float* xt = xs + t * d;
        const float wf = c.wf                ? dot(c.wf + r * d, xt, d)
                         : c.qwf && c.int4 ? dot(wide, xt, d)
                         : c.qwf           ? c.wf_scales[r] * dot_int8(c.qwf + r * d, xt, d)
                                           : 0.f;
        yacc[t * n + r] = wf + c.bf[r];
      }
    }

    // 2. Chunks of neurons, dealt round-robin (chunk k to thread k mod nth: the same split every
    //    call, so the same sums in the same order: deterministic outputs): a guard pass over the
    //    chunk's guard stream, then an exact pass over its flagged bundles, read in place.
    int64_t my_flagged = 0, my_corrected = 0, hit[CHUNK];
    uint64_t hit_mask[CHUNK];
    float zt[MAX_TOKENS];
    float* row = rows_scratch + static_cast<int64_t>(tid) * (d + groups);
    for (int64_t c0 = static_cast<int64_t>(tid) * CHUNK; c0 < kb; c0 += static_cast<int64_t>(nth) * CHUNK) {
      const int64_t c1 = c0 + CHUNK < kb ? c0 + CHUNK : kb;
      if (exact_all) {  // no guard: every bundle, every token, a block of bundles at a time
        for (int64_t j = c0; j < c1; j += EXACT_BLOCK)
          correct_block_all(c, j, static_cast<int>(c1 - j < EXACT_BLOCK ? c1 - j : EXACT_BLOCK), acc, wide);
        my_flagged += (c1 - c0) * tokens;
        my_corrected += c1 - c0;
        continue;
      }
      int hits = 0;
      for (int64_t j = c0; j < c1; ++j) {
        const uint64_t mask = j < c.kg ? flag_tokens(c, j, row, row + d, zt) : all_tokens;
        hit[hits] = j;  // kept only if flagged: no branch on the flag
        hit_mask[hits] = mask;
        hits += mask != 0;
      }
      for (int h = 0; h < hits; ++h) {
        // Prefetch a later flagged bundle, so its lines arrive while this one is used.
        if (h == 0)
          for (int a = 1; a < PREFETCH_AHEAD && a < hits; ++a) prefetch_neuron(c, hit[a]);
        if (h + PREFETCH_AHEAD < hits) prefetch_neuron(c, hit[h + PREFETCH_AHEAD]);
        my_flagged += correct(c, hit[h], hit_mask[h], acc, wide);
        ++my_corrected;
      }
    }
    if (counters) {
      flagged_pairs.fetch_add(my_flagged, std::memory_order_relaxed);
      corrected.fetch_add(my_corrected, std::memory_order_relaxed);
    }
    // 3. After every thread is done, each reduces disjoint output rows (int8 weights: the
    //    corrections' sum times the output channel's scale, applied once).
#pragma omp barrier
    for (int64_t r = tid * n / nth; r < (tid + 1) * n / nth; ++r)
      for (int64_t t = 0; t < tokens; ++t) {
        float s = c.out_scales ? 0.f : yacc[t * n + r];
        for (int k = 0; k < nth; ++k) s += local[(static_cast<int64_t>(k) * tokens + t) * n + r];
        store(y + t * n + r, c.out_scales ? yacc[t * n + r] + c.out_scales[r] * s : s);
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
#if defined(TARDIS_AVX512)
  return 16;
#elif defined(TARDIS_AVX2)
  return 8;
#else
  return 1;
#endif
}

// The element types, in the order of BufferType: kernel.py refuses a library whose list differs.
const char* tardis_buffer_types() { return BUFFER_TYPES; }

// 0 if `meta` (META_LEN int64s) describes buffers of these sizes consistently, else a negative
// error code.
int tardis_check_meta(const int64_t* meta, int64_t n_weights, int64_t n_guard, int64_t n_floats) {
  return check_meta(meta, n_weights, n_guard, n_floats);
}

// One buffer as the caller describes it: its address, element type and element count.
struct Buffer {
  const void* data;
  int64_t type, numel;
};

// The checks every entry point makes before it reads anything: a meta of META_LEN int64s that is
// consistent in itself and with the buffers' counts, the buffers' element types those the pack
// is laid out for, x of d_in features. Returns 0 or a negative error code.
int check_call(const Buffer& x, const Buffer& weights, const Buffer& guard, const Buffer& floats, const Buffer& meta,
               int64_t tokens) {
  if (meta.type != T_I64 || meta.numel != META_LEN) return -11;
  const int64_t* m = static_cast<const int64_t*>(meta.data);
  const int status = check_meta(m, weights.numel, guard.numel, floats.numel);
  if (status) return status;
  if (x.type != m[DTYPE] || weights.type != m[DTYPE] || guard.type != T_U8 || floats.type != T_F32) return -11;
  if (tokens < 1 || tokens > MAX_TOKENS) return -9;
  if (x.numel != tokens * m[D_IN]) return -8;  // no overflow: tokens <= 64, d_in <= MAX_DIM
  return 0;
}

// y (tokens, d_out) = the FFN of x (tokens, d_in), both contiguous; each buffer with its element
// type and count (BufferType), `act` the activation the caller means (the pack's must be the same).
// exact_all (0 or 1): no guard, every bundled neuron on its exact path for every token (the calls
// above dense_above of a pack alone; runtime/ffn_op.py).
// counters (nullable): [flagged (token, neuron) pairs, neurons corrected] are added to, and
// counters[2] is set to the number of threads the call ran on.
// Returns 0, or a negative error code (nothing is read or written then).
int tardis_ffn(const void* x, int64_t x_type, int64_t x_numel, void* y, int64_t y_type, int64_t y_numel,
               const void* weights, int64_t weights_type, int64_t n_weights, const uint8_t* guard, int64_t guard_type,
               int64_t n_guard, const float* floats, int64_t floats_type, int64_t n_floats, const int64_t* meta,
               int64_t meta_type, int64_t meta_numel, int64_t tokens, int64_t act, int64_t exact_all, int threads,
               int64_t* counters) {
  const int status = check_call({x, x_type, x_numel}, {weights, weights_type, n_weights}, {guard, guard_type, n_guard},
                                {floats, floats_type, n_floats}, {meta, meta_type, meta_numel}, tokens);
  if (status) return status;
  if (y_type != meta[DTYPE] || y_numel != tokens * meta[D_OUT]) return -12;
  if (act != meta[ACT]) return -13;
  if (exact_all != 0 && exact_all != 1) return -14;
  if (threads < 1) threads = 1;
  if (meta[DTYPE] == T_F32)
    return run(static_cast<const float*>(x), static_cast<float*>(y), static_cast<const float*>(weights), guard,
               floats, meta, tokens, exact_all == 1, threads, counters);
  return run(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), static_cast<const uint16_t*>(weights),
             guard, floats, meta, tokens, exact_all == 1, threads, counters);
}

// The low-bit guard's predictions for many tokens (the batched path's flags, with the fused
// kernel's arithmetic): out (tokens, k_guard) fp32, bias excluded. Each thread decodes a row once
// into fp32 and dots it with every token. Returns 0, or a negative error code.
// Buffers as in tardis_ffn (weights and floats are only sized, not read); out holds out_numel
// floats and must be tokens * k_guard. Any token count: this is the batched path's.
int tardis_guard_predict(const void* x, int64_t x_type, int64_t x_numel, float* out, int64_t out_numel,
                         int64_t weights_type, int64_t n_weights, const uint8_t* guard, int64_t guard_type,
                         int64_t n_guard, int64_t floats_type, int64_t n_floats, const int64_t* meta, int64_t meta_type,
                         int64_t meta_numel, int64_t tokens, int threads) {
  if (meta_type != T_I64 || meta_numel != META_LEN) return -11;
  const int status = check_meta(meta, n_weights, n_guard, n_floats);
  if (status) return status;
  if (x_type != meta[DTYPE] || weights_type != meta[DTYPE] || guard_type != T_U8 || floats_type != T_F32) return -11;
  // Divisions, not products: tokens is not bounded here.
  if (tokens < 1 || x_numel % meta[D_IN] || x_numel / meta[D_IN] != tokens) return -8;
  if (meta[K_GUARD] ? out_numel % meta[K_GUARD] || out_numel / meta[K_GUARD] != tokens : out_numel) return -12;
  if (meta[GUARD] != G_INT8 && meta[GUARD] != G_INT4 && meta[GUARD] != G_INT2) return -6;
  const int64_t rows = meta[K_GUARD], d = meta[D_IN], group = meta[GROUP];
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
