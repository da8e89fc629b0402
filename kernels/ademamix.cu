// AdEMAMix: the body of the CuPy kernel fastopt_ademamix. Same statements, names and order as
// ademamix_elem in ademamix.py; the bias corrections inv_bc1, inv_bc2 come from the host (the
// slow average m2 has none).
template <typename T>
__device__ __forceinline__ void ademamix_elem(T &p, T g, T &m1, T &m2, T &nu,
                                              const T beta1, const T omb1, const T beta2,
                                              const T omb2, const T beta3, const T omb3,
                                              const T inv_bc1, const T alpha, const T inv_bc2,
                                              const T eps_root, const T eps, const T wd,
                                              const T lr)
{
#if MAXIMIZE
    g = -g;
#endif
    m1 = beta1 * m1 + omb1 * g;
    m2 = beta3 * m2 + omb3 * g;
    nu = beta2 * nu + omb2 * (g * g);
    T u = (m1 * inv_bc1 + alpha * m2) / (sqrt(nu * inv_bc2 + eps_root) + eps);
#if DECAY
    u = u + wd * p;
#endif
    p = p - lr * u;
}
