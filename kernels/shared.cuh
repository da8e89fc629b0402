// The gradient prologue of kernels/shared.py (prologue), the same statements: g = -g with
// MAXIMIZE_; with DECAY_, p = p * decay_f (DECOUPLED_: decay_f = 1 - lr*weight_decay) or
// g = g + wd * p (L2). The flags are template arguments (a variant's 0/1 macros, or a rule's
// constant form), so each variant compiles branch-free; the argument a form never reads is a
// placeholder. Included by the .cu bodies: cuda_source.body pastes it in their place.
template <int MAXIMIZE_, int DECAY_, int DECOUPLED_, typename T>
__device__ __forceinline__ void prologue(T &p, T &g, const T wd, const T decay_f)
{
    if (MAXIMIZE_) {
        g = -g;
    }
    if (DECAY_) {
        if (DECOUPLED_) {
            p = p * decay_f;
        } else {
            g = g + wd * p;
        }
    }
}
