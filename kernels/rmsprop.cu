// RMSProp (eps outside the square root, optional centering and momentum): the body of the CuPy
// kernel fastopt_rmsprop. Same statements, names and order as rmsprop_elem in rmsprop.py; v - ga*ga
// is one fused multiply-add, as torch's addcmul (inf stays inf where ga*ga overflows).
#include "shared.cuh"
template <typename T>
__device__ __forceinline__ void rmsprop_elem(T &p, T g, T &v, T &ga, T &b,
                                             const T wd, const T alpha, const T oma, const T eps,
                                             const T mu, const T lr)
{
    prologue<MAXIMIZE, DECAY, 0>(p, g, wd, wd);
    v = alpha * v + oma * g * g;
#if CENTERED
    ga = ga + oma * (g - ga);
    const T d = sqrt(fma(-ga, ga, v)) + eps;
#else
    const T d = sqrt(v) + eps;
#endif
#if MOMENTUM
    b = mu * b + g / d;
    p = p - lr * b;
#else
    p = p - lr * (g / d);
#endif
}
