// CPU harness for the CuPy kernel bodies (kernels/*.cu), compiled by g++ as plain C++.
//
// The CUDA qualifiers become ordinary inline functions and abs / sqrt / max / fma / isnan
// resolve to the C++ overloads for T, so float stays float as on the GPU. variants.inc (written by
// tests/test_cuda_harness.py) then holds, per kernel variant: its flag #defines, the rule's .cu
// body inside its own namespace, and an extern "C" loop that binds each element the way CuPy's
// generated ElementwiseKernel does (`const T &grad = ...; T &param = ...; const T lr = ...;`)
// and runs the kernel's operation text verbatim. FASTOPT_RAW names a second file holding the
// raw (grid-stride, vectorised) kernels of the same variants, each run by a loop over every
// (block, thread) of a small grid, so their indexing (vectors, tail, several trips) runs too.
#include <algorithm>
#include <cmath>
#include <cstring>

#define __device__
#define __forceinline__ inline
#define __global__

struct Dim3 { unsigned x; };
static Dim3 blockIdx, threadIdx, blockDim, gridDim;
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
// the mixed-precision kernels (kernels/storage.cuh): 16-byte loads and CUDA's bit casts
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline unsigned int __float_as_uint(float x) { unsigned int u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned int u) { float x; std::memcpy(&x, &u, 4); return x; }
#define FASTOPT_UNROLL

using std::abs;
using std::fma;
using std::isnan;
using std::max;
using std::sqrt;

typedef FASTOPT_T T;

#include "variants.inc"
#include FASTOPT_RAW
