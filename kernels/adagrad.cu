// AdaGrad (eps outside the square root): the body of the CuPy kernel fastopt_adagrad.
// Same statements, names and order as adagrad_elem in adagrad.py; clr = lr / (1 + (t-1)*lr_decay)
// comes from the host.
#include "shared.cuh"
template <typename T>
__device__ __forceinline__ void adagrad_elem(T &p, T g, T &s,
                                             const T wd, const T clr, const T eps)
{
    prologue<MAXIMIZE, DECAY, 0>(p, g, wd, wd);
    s = s + g * g;
    const T d = sqrt(s) + eps;
    p = p - clr * (g / d);
}
