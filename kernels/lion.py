"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    g = -g if maximize
    p = p * decay                      (decay = 1 - lr*wd)
    c = beta1*m + omb1*g;  p = p - lr*sign(c)
    m = beta2*m + omb2*g
"""

STATE = ("exp_avg",)
SCALARS = ("decay", "beta1", "omb1", "beta2", "omb2", "lr")


def make_rule(maximize=False, decay=False):
    def lion_elem(p, g, m, k):
        decay_f, beta1, omb1, beta2, omb2, lr = k
        if maximize:
            g = -g
        if decay:
            p = p * decay_f
        c = beta1 * m + omb1 * g
        # sign(c) without a literal: +-lr, and lr*c (0 or NaN, like sign) when c is 0 or NaN
        if c > 0:
            p = p - lr
        elif c < 0:
            p = p + lr
        else:
            p = p - lr * c
        m = beta2 * m + omb2 * g
        return p, m

    return lion_elem
