// Adamax: the body of the CuPy kernel fastopt_adamax. Same statements, names and order as
// adamax_elem in adamax.py; step_size = lr / (1 - beta1^t) comes from the host.
#include "shared.cuh"
template <typename T>
__device__ __forceinline__ void adamax_elem(T &p, T g, T &m, T &u,
                                            const T wd, const T omb1, const T beta2,
                                            const T eps, const T step_size)
{
    prologue<MAXIMIZE, DECAY, 0>(p, g, wd, wd);
    m = m + omb1 * (g - m);
    const T a = beta2 * u;
    const T b = abs(g) + eps;
    // torch.maximum: NaN in either operand gives NaN (CUDA's max and fmax would return the
    // other operand)
    if (b > a || isnan(b)) {
        u = b;
    } else {
        u = a;
    }
    p = p - step_size * m / u;
}
