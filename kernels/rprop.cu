// Rprop: the body of the CuPy kernel fastopt_rprop. Same statements, names and order as
// rprop_elem in rprop.py; T(0) would do for zero, which the Python rule takes from the host.
template <typename T>
__device__ __forceinline__ void rprop_elem(T &p, T g, T &prev, T &size,
                                           const T etaminus, const T etaplus,
                                           const T step_size_min, const T step_size_max,
                                           const T zero)
{
#if MAXIMIZE
    g = -g;
#endif
    const T s = g * prev;
    if (s > T(0)) {
        size = size * etaplus;
    } else if (s < T(0)) {
        size = size * etaminus;
        g = zero;  // torch zeroes the gradient where its sign flipped
    }
    if (size < step_size_min) {
        size = step_size_min;
    }
    if (size > step_size_max) {
        size = step_size_max;
    }
    // p - sign(g)*size: no step where g is 0 or NaN (torch's sign of both is 0)
    if (g > T(0)) {
        p = p - size;
    } else if (g < T(0)) {
        p = p + size;
    }
    prev = g;
}
