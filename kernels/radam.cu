// RAdam: the body of the CuPy kernel fastopt_radam. Same statements, names and order as
// radam_elem in radam.py; whether this step rectifies (rho_t > 5) is the RECTIFY macro, chosen
// on the host per step, and step_size (lr, the bias corrections and the rectification term
// folded) comes from the host: one division per element. The SELECT variant (scalars computed
// on the device) holds both terms and takes the one the scalars rect and den0 choose.
#include "shared.cuh"
template <typename T>
__device__ __forceinline__ void radam_elem(T &p, T g, T &m, T &v,
                                           const T wd, const T decay_f, const T omb1,
                                           const T beta2, const T omb2, const T step_size,
                                           const T eps, const T rect, const T den0)
{
    prologue<MAXIMIZE, DECAY, DECOUPLED>(p, g, wd, decay_f);
    m = m + omb1 * (g - m);
    v = beta2 * v + omb2 * g * g;
#if SELECT
    const T d = (rect > den0) ? (sqrt(v) + eps) : den0;
    p = p - step_size * m / d;
#elif RECTIFY
    p = p - step_size * m / (sqrt(v) + eps);
#else
    p = p - step_size * m;
#endif
}
