// Storage conversions of the mixed-precision kernels: kernels/storage.py in CUDA C, operation
// for operation (same constants, same rounding), on 32-bit unsigned integers. float16 and
// bfloat16 arrays are `unsigned short` arrays; these convert their bits exactly:
//   bf16 -> f32: shift up; f32 -> bf16: round to nearest even on the bits, NaN kept quiet;
//   f16 <-> f32: exact on every value (subnormals, +-0, +-inf), round to nearest even;
//   stochastic rounding to bf16 from a counter-based hash of (salt, step key, index);
//   a float32 master as bf16 bits + an int16 remainder and back (rem_hi/rem_lo/rem_join:
//   the high half rounded half away from zero, the low half kept; a bijection of the bits).
// No header is included (the text is pasted into each kernel's translation unit, also inside
// namespaces by the CPU harness, which defines __float_as_uint / __uint_as_float itself).
#ifndef FASTOPT_UNROLL
#define FASTOPT_UNROLL _Pragma("unroll")
#endif

__device__ __forceinline__ float fastopt_bf16_load(const unsigned short h)
{
    return __uint_as_float((unsigned int)h << 16);
}

__device__ __forceinline__ unsigned short fastopt_bf16_store(const float x)
{
    const unsigned int u = __float_as_uint(x);
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return (unsigned short)(nan ? ((u >> 16) | 0x40u) : ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16));
}

__device__ __forceinline__ unsigned short fastopt_bf16_store_sr(const float x, const unsigned int r)
{
    const unsigned int u = __float_as_uint(x);
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return (unsigned short)(nan ? ((u >> 16) | 0x40u) : ((u + r) >> 16));
}

// the float32 master of bf16 bits h and remainder r: the high half less one where r < 0
__device__ __forceinline__ float fastopt_rem_join(const unsigned short h, const short r)
{
    const unsigned int hi = ((unsigned int)h - (r < 0 ? 1u : 0u)) & 0xFFFFu;
    return __uint_as_float((hi << 16) | (unsigned int)(unsigned short)r);
}

// the bf16 bits beside the remainder: the high half, plus one where the low half >= 0x8000
__device__ __forceinline__ unsigned short fastopt_rem_hi(const float x)
{
    const unsigned int u = __float_as_uint(x);
    return (unsigned short)((u >> 16) + ((u >> 15) & 1u));
}

// the remainder: the low half as a signed 16-bit value
__device__ __forceinline__ short fastopt_rem_lo(const float x)
{
    return (short)(unsigned short)(__float_as_uint(x) & 0xFFFFu);
}

__device__ __forceinline__ float fastopt_f16_load(const unsigned short h)
{
    const unsigned int e = h & 0x7C00u;
    unsigned int o = (((unsigned int)h & 0x7FFFu) << 13) + 0x38000000u;
    if (e == 0x7C00u) {
        o += 0x38000000u;  // inf or NaN: the exponent is all ones again
    } else if (e == 0u) {  // zero or subnormal: renormalised by one exact float subtraction
        o = __float_as_uint(__uint_as_float(o + 0x00800000u) - 6.103515625e-05f);
    }
    return __uint_as_float(o | (((unsigned int)h & 0x8000u) << 16));
}

__device__ __forceinline__ unsigned short fastopt_f16_store(const float x)
{
    const unsigned int u = __float_as_uint(x);
    const unsigned int a = u & 0x7FFFFFFFu;
    unsigned int o;
    if (a >= 0x47800000u) {  // |x| >= 65536: inf, or NaN (quiet, the top of its payload kept)
        o = a > 0x7F800000u ? (0x7E00u | ((a >> 13) & 0x3FFu)) : 0x7C00u;
    } else if (a < 0x38800000u) {  // a float16 subnormal or zero, aligned by one float add
        o = __float_as_uint(__uint_as_float(a) + 0.5f) - 0x3F000000u;
    } else {  // rebias the exponent, round half to even
        o = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    }
    return (unsigned short)(o | ((u >> 16) & 0x8000u));
}

__device__ __forceinline__ unsigned int fastopt_mix32(unsigned int x)
{
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    return x ^ (x >> 15);
}

// 16 random bits of element i of the array with `salt`, under the step key
__device__ __forceinline__ unsigned int fastopt_sr_bits(const long long i, const unsigned int salt,
                                                        const unsigned int key)
{
    unsigned int h = fastopt_mix32((unsigned int)i ^ salt);
    h = fastopt_mix32((h + (unsigned int)((unsigned long long)i >> 32)) ^ key);
    return h >> 16;
}
