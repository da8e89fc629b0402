// ASGD: the body of the CuPy kernel fastopt_asgd. Same statements, names and order as
// asgd_elem in asgd.py; eta and mu are the host state, and whether this step averages
// (mu != 1) is the AVERAGE macro, chosen on the host per step.
#include "shared.cuh"
template <typename T>
__device__ __forceinline__ void asgd_elem(T &p, T g, T &ax,
                                          const T wd, const T decay_f, const T eta, const T mu)
{
    prologue<MAXIMIZE, DECAY, 0>(p, g, wd, wd);
    p = p * decay_f;
    p = p - eta * g;
#if AVERAGE
    ax = ax + (p - ax) * mu;
#else
    ax = p;
#endif
}
