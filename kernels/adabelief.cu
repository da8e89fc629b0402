// AdaBelief: the body of the CuPy kernel fastopt_adabelief. Same statements, names and order as
// adabelief_elem in adabelief.py; inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t) and the step sizes c_m,
// c_g (c_g for Nesterov momentum only) come from the host.
template <typename T>
__device__ __forceinline__ void adabelief_elem(T &p, T g, T &m, T &s,
                                               const T beta1, const T omb1, const T beta2,
                                               const T omb2, const T eps_root,
                                               const T inv_sqrt_bc2, const T eps, const T c_m,
                                               const T c_g)
{
#if MAXIMIZE
    g = -g;
#endif
    m = beta1 * m + omb1 * g;
    const T e = g - m;
    s = beta2 * s + omb2 * (e * e) + eps_root;
    const T d = sqrt(s) * inv_sqrt_bc2 + eps;
#if NESTEROV
    p = p - (c_m * m + c_g * g) / d;
#else
    p = p - c_m * m / d;
#endif
}
