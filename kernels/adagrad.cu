// AdaGrad (eps outside the square root): the body of the CuPy kernel fastopt_adagrad.
// Same statements, names and order as adagrad_elem in adagrad.py; clr = lr / (1 + (t-1)*lr_decay)
// comes from the host.
template <typename T>
__device__ __forceinline__ void adagrad_elem(T &p, T g, T &s,
                                             const T wd, const T clr, const T eps)
{
#if MAXIMIZE
    g = -g;
#endif
#if DECAY
    g = g + wd * p;
#endif
    s = s + g * g;
    const T d = sqrt(s) + eps;
    p = p - clr * (g / d);
}
