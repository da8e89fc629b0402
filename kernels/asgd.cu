// ASGD: the body of the CuPy kernel fastopt_asgd. Same statements, names and order as
// asgd_elem in asgd.py; eta and mu are the host state, and whether this step averages
// (mu != 1) is the AVERAGE macro, chosen on the host per step. The SELECT variant (eta and mu
// advanced on the device) computes both and keeps the average where avg > avg0.
#include "shared.cuh"
template <typename T>
__device__ __forceinline__ void asgd_elem(T &p, T g, T &ax,
                                          const T wd, const T decay_f, const T eta, const T mu,
                                          const T avg, const T avg0)
{
    prologue<MAXIMIZE, DECAY, 0>(p, g, wd, wd);
    p = p * decay_f;
    p = p - eta * g;
#if SELECT
    const T mean = ax + (p - ax) * mu;
    ax = (avg > avg0) ? mean : p;
#elif AVERAGE
    ax = ax + (p - ax) * mu;
#else
    ax = p;
#endif
}
