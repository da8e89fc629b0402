// Lion: the body of the CuPy kernel fastopt_lion. Same statements, names and order as lion_elem
// in lion.py.
#include "shared.cuh"
template <typename T>
__device__ __forceinline__ void lion_elem(T &p, T g, T &m,
                                          const T decay_f, const T beta1, const T omb1,
                                          const T beta2, const T omb2, const T lr)
{
    prologue<MAXIMIZE, DECAY, 1>(p, g, decay_f, decay_f);
    const T c = beta1 * m + omb1 * g;
    // sign(c) as +-lr, and lr*c (0 or NaN, like sign) when c is 0 or NaN; T(0), not 0.0, keeps
    // the float comparison in float
    if (c > T(0)) {
        p = p - lr;
    } else if (c < T(0)) {
        p = p + lr;
    } else {
        p = p - lr * c;
    }
    m = beta2 * m + omb2 * g;
}
