// Adan: the body of the CuPy kernel fastopt_adan. Same statements, names and order as adan_elem
// in adan.py; the bias corrections (inv_bc1, c_v, inv_bc3) come from the host, and whether this
// is the first step (no previous gradient: no difference) is the FIRST macro, chosen on the host
// per step.
template <typename T>
__device__ __forceinline__ void adan_elem(T &p, T g, T &m, T &v, T &n, T &prev,
                                          const T beta1, const T omb1, const T beta2,
                                          const T omb2, const T beta3, const T omb3,
                                          const T inv_bc1, const T c_v, const T inv_bc3,
                                          const T eps_root, const T eps, const T wd,
                                          const T lr)
{
#if MAXIMIZE
    g = -g;
#endif
    m = beta1 * m + omb1 * g;
#if FIRST
    v = beta2 * v;
    const T sq = g;
#else
    const T diff = g - prev;
    v = beta2 * v + omb2 * diff;
    const T sq = g + omb2 * diff;
#endif
    n = beta3 * n + omb3 * (sq * sq);
    T u = (m * inv_bc1 + c_v * v) / (sqrt(n * inv_bc3 + eps_root) + eps);
#if DECAY
    u = u + wd * p;
#endif
    p = p - lr * u;
    prev = g;
}
