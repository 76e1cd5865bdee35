// Portable SIMD for the CPU kernels: GCC/Clang vector extensions (no
// intrinsics), so the same source compiles for any target.  On x86-64 each
// kernel is compiled three times, for the baseline ISA (SSE2), AVX2+FMA and
// AVX-512, and the widest one the running CPU supports is picked at run time
// (RLKERNELS_CPU_ISA=baseline|avx2|avx512 caps the choice, for tests and
// comparisons).  A shipped wheel therefore runs everywhere and still uses the
// wide units where they exist; no -march flag is needed.
//
// A kernel is a struct with `template <int W> static void run(args...)`, always
// inlined, W the vector width in floats; run_simd<Kernel>(args...) calls the
// variant for this CPU.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if !defined(__GNUC__) && !defined(__clang__)
#error "rlkernels' CPU kernels need GCC or Clang (vector extensions)"
#endif

#define RLK_ALWAYS_INLINE inline __attribute__((always_inline))
// For a lambda inside a kernel: inlined into the per-ISA copy that calls it, so its body
// is compiled for that ISA (a lambda does not inherit its enclosing function's target).
#define RLK_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
// Wide vector values only cross always-inlined calls, so the ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__)
#define RLK_SIMD_X86 1
#define RLK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2")))
#define RLK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2")))
#else
#define RLK_SIMD_X86 0
#endif

namespace rlk {
namespace simd {

// 16-bit floats as stored by torch (c10::BFloat16 and c10::Half share these layouts).
struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

template <int W> struct V {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
};

template <int W> using vf = typename V<W>::f;
template <int W> using vu = typename V<W>::u;

template <class To, class From>
RLK_ALWAYS_INLINE To bit_cast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To out;
  std::memcpy(&out, &x, sizeof out);
  return out;
}

template <int W> RLK_ALWAYS_INLINE vf<W> splat(float x) { return vf<W>{} + x; }

// ---- scalar conversions ---------------------------------------------------------------------
RLK_ALWAYS_INLINE float to_float(float x) { return x; }
RLK_ALWAYS_INLINE float to_float(bf16 x) { return bit_cast<float>(uint32_t(x.bits) << 16); }
RLK_ALWAYS_INLINE float to_float(fp16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t em = x.bits & 0x7fffu;
  float mag;
  if (em >= 0x7c00u) mag = bit_cast<float>((em << 13) + (224u << 23));   // inf, NaN
  else if (em >= 0x0400u) mag = bit_cast<float>((em << 13) + (112u << 23));  // normal
  else mag = float(em) * 5.9604644775390625e-8f;                            // subnormal, 2^-24
  return bit_cast<float>(bit_cast<uint32_t>(mag) | sign);
}

template <class T> RLK_ALWAYS_INLINE T from_float(float x);
template <> RLK_ALWAYS_INLINE float from_float<float>(float x) { return x; }
template <> RLK_ALWAYS_INLINE bf16 from_float<bf16>(float x) {
  const uint32_t u = bit_cast<uint32_t>(x);
  if (x != x) return bf16{0x7fc0};
  return bf16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <> RLK_ALWAYS_INLINE fp16 from_float<fp16>(float x) {
  uint32_t u = bit_cast<uint32_t>(x);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (143u << 23)) {  // >= 65536 rounds to inf; NaN stays NaN
    o = u > (255u << 23) ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {  // subnormal or zero: let the FPU round
    o = bit_cast<uint32_t>(bit_cast<float>(u) + 0.5f) - bit_cast<uint32_t>(0.5f);
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    o = (u + (uint32_t(int32_t(15 - 127)) << 23) + 0xfffu + odd) >> 13;
  }
  return fp16{uint16_t(o | (sign >> 16))};
}

// ---- vector loads and stores ----------------------------------------------------------------
template <int W> RLK_ALWAYS_INLINE vf<W> load(const float* p) {
  vf<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W> RLK_ALWAYS_INLINE vf<W> load(const bf16* p) {
  typename V<W>::h h;
  std::memcpy(&h, p, sizeof h);
  return bit_cast<vf<W>>(__builtin_convertvector(h, vu<W>) << 16);
}

// Half-precision bits held in the low 16 bits of each 32-bit lane, as floats.
template <int W> RLK_ALWAYS_INLINE vf<W> fp16_lanes(vu<W> bits) {
  typedef vu<W> u;
  const u sign = (bits & 0x8000u) << 16;
  const u em = bits & 0x7fffu;
  const u normal = (em << 13) + (112u << 23);
  const u special = (em << 13) + (224u << 23);
  // em < 2^15: converted as signed, which every ISA has an instruction for
  const u subnormal = bit_cast<u>(__builtin_convertvector(bit_cast<typename V<W>::i>(em), vf<W>) * 5.9604644775390625e-8f);
  const u mag = em >= 0x7c00u ? special : (em >= 0x0400u ? normal : subnormal);
  return bit_cast<vf<W>>(mag | sign);
}

template <int W> RLK_ALWAYS_INLINE vf<W> load(const fp16* p) {
  typename V<W>::h h;
  std::memcpy(&h, p, sizeof h);
  return fp16_lanes<W>(__builtin_convertvector(h, vu<W>));
}

// 2 W consecutive elements as two vectors.  For float: the first W, then the next W.
// For the 16-bit types: the even elements, then the odd ones.  Read as W 32-bit lanes,
// elements 2l and 2l + 1 share lane l (element 2l in the low half on little-endian
// machines), so a shift and a mask widen them: no shuffles, where widening W consecutive 16-bit values
// (load above) takes four to six shuffle instructions a vector with GCC 12 on
// AVX-512.  Reductions that take their lanes from here assign element j of a 2 W block
// to a fixed lane (a function of j % 2 W and the type), wherever the block lies.
template <int W> RLK_ALWAYS_INLINE void load2(const float* p, vf<W>& first, vf<W>& second) {
  first = load<W>(p);
  second = load<W>(p + W);
}

// Which half of a 32-bit lane holds the first (even) of its two 16-bit elements.
constexpr bool kEvenInLowHalf = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;

template <int W> RLK_ALWAYS_INLINE void load2(const bf16* p, vf<W>& even, vf<W>& odd) {
  vu<W> bits;
  std::memcpy(&bits, p, sizeof bits);
  const vf<W> low = bit_cast<vf<W>>(bits << 16), high = bit_cast<vf<W>>(bits & 0xffff0000u);
  even = kEvenInLowHalf ? low : high;
  odd = kEvenInLowHalf ? high : low;
}

template <int W> RLK_ALWAYS_INLINE void load2(const fp16* p, vf<W>& even, vf<W>& odd) {
  vu<W> bits;
  std::memcpy(&bits, p, sizeof bits);
  const vf<W> low = fp16_lanes<W>(bits & 0xffffu), high = fp16_lanes<W>(bits >> 16);
  even = kEvenInLowHalf ? low : high;
  odd = kEvenInLowHalf ? high : low;
}

template <int W> RLK_ALWAYS_INLINE void store(float* p, vf<W> v) { std::memcpy(p, &v, sizeof v); }

// Each lane rounded to nearest even, as bfloat16 bits in the low 16 bits of the lane.
template <int W> RLK_ALWAYS_INLINE vu<W> bf16_lanes_of(vf<W> v) {
  typedef vu<W> u;
  const u bits = bit_cast<u>(v);
  const u out = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return v != v ? u{} + 0x7fc0u : out;
}

template <int W> RLK_ALWAYS_INLINE void store(bf16* p, vf<W> v) {
  const typename V<W>::h h = __builtin_convertvector(bf16_lanes_of<W>(v), typename V<W>::h);
  std::memcpy(p, &h, sizeof h);
}

// Each lane rounded to nearest even, as half-precision bits in the low 16 bits of the lane.
template <int W> RLK_ALWAYS_INLINE vu<W> fp16_lanes_of(vf<W> v) {
  typedef vu<W> u;
  u bits = bit_cast<u>(v);
  const u sign = bits & 0x80000000u;
  bits ^= sign;
  const u big = bits > (255u << 23) ? u{} + 0x7e00u : u{} + 0x7c00u;
  const u small = bit_cast<u>(bit_cast<vf<W>>(bits) + 0.5f) - bit_cast<uint32_t>(0.5f);
  const u normal = (bits + (uint32_t(int32_t(15 - 127)) << 23) + 0xfffu + ((bits >> 13) & 1u)) >> 13;
  u out = bits >= (143u << 23) ? big : (bits < (113u << 23) ? small : normal);
  return out | (sign >> 16);
}

template <int W> RLK_ALWAYS_INLINE void store(fp16* p, vf<W> v) {
  const typename V<W>::h h = __builtin_convertvector(fp16_lanes_of<W>(v), typename V<W>::h);
  std::memcpy(p, &h, sizeof h);
}

// The inverse of load2: 2 W consecutive elements from the two vectors load2 gives.
template <int W> RLK_ALWAYS_INLINE void store2(float* p, vf<W> first, vf<W> second) {
  store<W>(p, first);
  store<W>(p + W, second);
}

template <int W> RLK_ALWAYS_INLINE void store2(bf16* p, vf<W> even, vf<W> odd) {
  const vu<W> bits = kEvenInLowHalf ? bf16_lanes_of<W>(even) | (bf16_lanes_of<W>(odd) << 16)
                                    : bf16_lanes_of<W>(odd) | (bf16_lanes_of<W>(even) << 16);
  std::memcpy(p, &bits, sizeof bits);
}

template <int W> RLK_ALWAYS_INLINE void store2(fp16* p, vf<W> even, vf<W> odd) {
  const vu<W> bits = kEvenInLowHalf ? fp16_lanes_of<W>(even) | (fp16_lanes_of<W>(odd) << 16)
                                    : fp16_lanes_of<W>(odd) | (fp16_lanes_of<W>(even) << 16);
  std::memcpy(p, &bits, sizeof bits);
}

// Tails: the first n < W elements, the rest filled with `fill`.
template <int W, class T> RLK_ALWAYS_INLINE vf<W> load_partial(const T* p, int64_t n, float fill) {
  float buf[W];
  for (int l = 0; l < W; ++l) buf[l] = l < n ? to_float(p[l]) : fill;
  return load<W>(buf);
}

template <int W, class T> RLK_ALWAYS_INLINE void store_partial(T* p, vf<W> v, int64_t n) {
  T buf[W];
  store<W>(buf, v);
  for (int64_t l = 0; l < n; ++l) p[l] = buf[l];
}

// ---- arithmetic -----------------------------------------------------------------------------
template <int W> RLK_ALWAYS_INLINE vf<W> vmax(vf<W> a, vf<W> b) { return a > b ? a : b; }

template <int W> RLK_ALWAYS_INLINE float hmax(vf<W> v) {
  float m = v[0];
  for (int l = 1; l < W; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

template <int W> RLK_ALWAYS_INLINE float hsum(vf<W> v) {
  // pairwise, for accuracy and a short dependency chain
  float buf[W];
  std::memcpy(buf, &v, sizeof buf);
  for (int half = W / 2; half > 0; half /= 2)
    for (int l = 0; l < half; ++l) buf[l] += buf[l + half];
  return buf[0];
}

// 2^y for y <= 127, 0 below 2^-125 (callers only need y <= 0); NaN stays NaN.
// `clamped` receives max(y, -125), with which y * 2^y stays 0 (not NaN) at
// y = -inf.  Split y = k + r with k an integer and |r| <= 1/2, a degree-5
// minimax polynomial for 2^r (relative error 1.9e-7 in float32), and the
// exponent k added in the integer domain.
template <int W> RLK_ALWAYS_INLINE vf<W> exp2(vf<W> y, vf<W>& clamped) {
  typedef vf<W> f;
  const auto tiny = y < -125.0f;
  clamped = tiny ? splat<W>(-125.0f) : y;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const f t = clamped + shifter;
  const f r = clamped - (t - shifter);
  f p = splat<W>(1.3264737e-3f);
  p = p * r + 9.6715130e-3f;
  p = p * r + 5.5507336e-2f;
  p = p * r + 2.4022242e-1f;
  p = p * r + 6.9314700e-1f;
  p = p * r + 1.0f;  // exactly 1 at r = 0: a one-hot row gets log p = 0 exactly
  // t's bits are shifter's plus k, and shifter's low 9 bits are 0, so t's bits
  // shifted into the exponent field are k << 23 (mod 2^32) without subtracting
  // shifter first.
  const f out = bit_cast<f>(bit_cast<vu<W>>(p) + (bit_cast<vu<W>>(t) << 23));
  return tiny ? splat<W>(0.0f) : out;
}

template <int W> RLK_ALWAYS_INLINE vf<W> exp2(vf<W> y) {
  vf<W> unused;
  return exp2<W>(y, unused);
}

// ---- dispatch -------------------------------------------------------------------------------
enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
  Isa best = Isa::kBaseline;
#if RLK_SIMD_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = Isa::kAvx512;
#endif
  if (const char* cap = std::getenv("RLKERNELS_CPU_ISA")) {
    Isa want = best;
    if (std::strcmp(cap, "baseline") == 0) want = Isa::kBaseline;
    else if (std::strcmp(cap, "avx2") == 0) want = Isa::kAvx2;
    if (int(want) < int(best)) best = want;
  }
  return best;
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

#if RLK_SIMD_X86
template <class Kernel, class... Args> RLK_TARGET_AVX512 void run_avx512(Args&&... args) {
  Kernel::template run<16>(args...);
}
template <class Kernel, class... Args> RLK_TARGET_AVX2 void run_avx2(Args&&... args) {
  Kernel::template run<8>(args...);
}
#endif

template <class Kernel, class... Args> void run_simd(Args&&... args) {
#if RLK_SIMD_X86
  switch (cpu_isa()) {
    case Isa::kAvx512: return run_avx512<Kernel>(args...);
    case Isa::kAvx2: return run_avx2<Kernel>(args...);
    default: return Kernel::template run<4>(args...);
  }
#else
  Kernel::template run<8>(args...);
#endif
}

}  // namespace simd
}  // namespace rlk
