// Adan: the body of the CuPy kernel fastopt_adan. Same statements, names and order as adan_elem
// in adan.py; the bias corrections (inv_bc1, c_v, inv_bc3) come from the host, and whether this
// is the first step (no previous gradient: no difference) is the FIRST macro, chosen on the host
// per step. The SELECT variant (scalars computed on the device) computes both forms and keeps
// the later one where later > first_f.
template <typename T>
__device__ __forceinline__ void adan_elem(T &p, T g, T &m, T &v, T &n, T &prev,
                                          const T beta1, const T omb1, const T beta2,
                                          const T omb2, const T beta3, const T omb3,
                                          const T inv_bc1, const T c_v, const T inv_bc3,
                                          const T eps_root, const T eps, const T wd,
                                          const T lr, const T later, const T first_f)
{
#if MAXIMIZE
    g = -g;
#endif
    m = beta1 * m + omb1 * g;
#if SELECT
    const T diff = g - prev;
    const T v_later = beta2 * v + omb2 * diff;
    const T sq_later = g + omb2 * diff;
    const T v_first = beta2 * v;
    v = (later > first_f) ? v_later : v_first;
    const T sq = (later > first_f) ? sq_later : g;
#elif FIRST
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
