"""Adam / AdamW / AMSGrad (PyTorch's form: eps added after the bias correction, outside the root).

    g = -g if maximize
    decoupled (AdamW): p = p * decay  (decay = 1 - lr*wd)    else g = g + wd*p
    m = beta1*m + omb1*g;  v = beta2*v + omb2*g*g
    amsgrad: vmax = max(vmax, v) (NaN if either is);  d = sqrt(vmax or v) * inv_sqrt_bc2 + eps
    p = p - step_size*m / d
    (step_size = lr / (1 - beta1^t), inv_sqrt_bc2 = 1/sqrt(1 - beta2^t))
"""
import math

STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SCALARS = ("wd", "decay", "beta1", "omb1", "beta2", "omb2", "step_size", "inv_sqrt_bc2", "eps")


def make_rule(maximize=False, decay=False, decoupled=False, amsgrad=False):
    def adam_elem(p, g, m, v, vmax, k):
        wd, decay_f, beta1, omb1, beta2, omb2, step_size, inv_sqrt_bc2, eps = k
        if maximize:
            g = -g
        if decay:
            if decoupled:
                p = p * decay_f
            else:
                g = g + wd * p
        m = beta1 * m + omb1 * g
        v = beta2 * v + omb2 * g * g
        if amsgrad:
            # torch.maximum: NaN in either operand gives NaN (Python's max and CUDA's fmax
            # would return the other operand)
            if v > vmax or math.isnan(v):
                vmax = v
            d = math.sqrt(vmax) * inv_sqrt_bc2 + eps
        else:
            d = math.sqrt(v) * inv_sqrt_bc2 + eps
        p = p - step_size * m / d
        return p, m, v, vmax

    return adam_elem
