// SGD with optional momentum / Nesterov: the body of the CuPy kernel fastopt_sgd.
// Same statements, names and order as sgd_elem in sgd.py. Flags are 0/1 macros fixed per
// compiled variant; every scalar arrives in the buffer type T (mu_b = 0, omd_b = 1 on the first
// step, so b = g there).
#include "shared.cuh"
template <typename T>
__device__ __forceinline__ void sgd_elem(T &p, T g, T &b,
                                         const T wd, const T mu_b, const T omd_b, const T mu,
                                         const T lr)
{
    prologue<MAXIMIZE, DECAY, 0>(p, g, wd, wd);
#if MOMENTUM
    b = mu_b * b + omd_b * g;
#if NESTEROV
    g = g + mu * b;
#else
    g = b;
#endif
#endif
    p = p - lr * g;
}
