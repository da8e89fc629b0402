// Adam / AdamW / AMSGrad (eps added after the bias correction, outside the root): the body of
// the CuPy kernel fastopt_adam. Same statements, names and order as adam_elem in adam.py;
// step_size = lr / (1 - beta1^t) and inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t) come from the host,
// so the kernel holds no pow.
#include "shared.cuh"
template <typename T>
__device__ __forceinline__ void adam_elem(T &p, T g, T &m, T &v, T &vmax,
                                          const T wd, const T decay_f, const T beta1,
                                          const T omb1, const T beta2, const T omb2,
                                          const T step_size, const T inv_sqrt_bc2, const T eps)
{
    prologue<MAXIMIZE, DECAY, DECOUPLED>(p, g, wd, decay_f);
    m = beta1 * m + omb1 * g;
    v = beta2 * v + omb2 * g * g;
#if AMSGRAD
    // torch.maximum: NaN in either operand gives NaN (CUDA's max and fmax would return the
    // other operand)
    if (v > vmax || isnan(v)) {
        vmax = v;
    }
    const T d = sqrt(vmax) * inv_sqrt_bc2 + eps;
#else
    const T d = sqrt(v) * inv_sqrt_bc2 + eps;
#endif
    p = p - step_size * m / d;
}
