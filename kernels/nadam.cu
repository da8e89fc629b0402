// NAdam: the body of the CuPy kernel fastopt_nadam. Same statements, names and order as
// nadam_elem in nadam.py; bc2 = 1 - beta2^t and the two step sizes c_g, c_m (from the momentum
// schedule and its running product) come from the host.
#include "shared.cuh"
template <typename T>
__device__ __forceinline__ void nadam_elem(T &p, T g, T &m, T &v,
                                           const T wd, const T decay_f, const T omb1,
                                           const T beta2, const T omb2, const T bc2,
                                           const T eps, const T c_g, const T c_m)
{
    prologue<MAXIMIZE, DECAY, DECOUPLED>(p, g, wd, decay_f);
    m = m + omb1 * (g - m);
    v = beta2 * v + omb2 * g * g;
    const T d = sqrt(v / bc2) + eps;
    p = p - c_g * g / d;
    p = p - c_m * m / d;
}
