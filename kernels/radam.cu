// RAdam: the body of the CuPy kernel fastopt_radam. Same statements, names and order as
// radam_elem in radam.py; whether this step rectifies (rho_t > 5) is the RECTIFY macro, chosen
// on the host per step, and bc1, sqrt_bc2 and rect come from the host.
template <typename T>
__device__ __forceinline__ void radam_elem(T &p, T g, T &m, T &v,
                                           const T wd, const T decay_f, const T beta1,
                                           const T omb1, const T beta2, const T omb2,
                                           const T bc1, const T lr, const T sqrt_bc2,
                                           const T eps, const T rect)
{
#if MAXIMIZE
    g = -g;
#endif
#if DECAY
#if DECOUPLED
    p = p * decay_f;
#else
    g = g + wd * p;
#endif
#endif
    m = beta1 * m + omb1 * g;
    v = beta2 * v + omb2 * g * g;
#if RECTIFY
    p = p - m / bc1 * lr * (sqrt_bc2 / (sqrt(v) + eps)) * rect;
#else
    p = p - m / bc1 * lr;
#endif
}
