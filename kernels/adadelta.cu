// Adadelta: the body of the CuPy kernel fastopt_adadelta. Same statements, names and order as
// adadelta_elem in adadelta.py.
#include "shared.cuh"
template <typename T>
__device__ __forceinline__ void adadelta_elem(T &p, T g, T &v, T &acc,
                                              const T wd, const T rho, const T omr, const T eps,
                                              const T lr)
{
    prologue<MAXIMIZE, DECAY, 0>(p, g, wd, wd);
    v = rho * v + omr * g * g;
    const T denom = sqrt(v + eps);
    const T delta = sqrt(acc + eps) / denom * g;
    acc = rho * acc + omr * delta * delta;
    p = p - lr * delta;
}
