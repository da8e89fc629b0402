// Quantized state slots (kernels/quant.py) on the GPU: the codec a kernel of kernels/quant_cuda.py
// runs per quant block, one thread per element and one CUDA block (QBLOCK threads) per block
// of codes. The tables live in shared memory, loaded once per CUDA block: `dec` (256 float32,
// the value of each code) and `thr` (the 255 ascending thresholds, then +inf).
//   decode: dec[code] * (absmax / top), as the CPU loop computes it;
//   encode: code = #{k : thr[k] < y}, by a branch-free binary search over the 256 entries
//           (the CPU finds the same count by a bucket lookup; NaN gives 0), for a float8 slot
//           over |y| with y's sign bit set on the byte (int4's encode is not here: the CPU's
//           15 comparisons, generated per map by quant_cuda.encode4_source);
//   absmax: the maximum of the magnitudes' bit patterns (NaN above every number), a tree in
//           shared memory over the block's threads, the same value in any order.
// No header is included (the text is pasted into each kernel's translation unit, also inside
// namespaces by the CPU harness).

__device__ __forceinline__ unsigned int fastopt_q_encode(const float y, const float *thr,
                                                         const int signmag)
{
    const unsigned int u = __float_as_uint(y);
    const float a = signmag ? __uint_as_float(u & 0x7FFFFFFFu) : y;
    unsigned int c = 0u;
    FASTOPT_UNROLL
    for (unsigned int s = 128u; s > 0u; s >>= 1) {
        c += (thr[c + s - 1u] < a) ? s : 0u;
    }
    return signmag ? (c | ((u >> 24) & 0x80u)) : c;
}

__device__ __forceinline__ unsigned int fastopt_q_magnitude(const float x)
{
    return __float_as_uint(x) & 0x7FFFFFFFu;
}
