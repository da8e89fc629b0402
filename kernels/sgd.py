"""SGD with optional momentum / Nesterov (PyTorch's form).

    g = -g if maximize;  g = g + wd*p
    b = mu_b*b + omd_b*g          (mu_b = 0, omd_b = 1 on the first step: b = g)
    g = g + mu*b if nesterov else b
    p = p - lr*g
"""

STATE = ("momentum_buffer",)
SCALARS = ("wd", "mu_b", "omd_b", "mu", "lr")


def make_rule(maximize=False, decay=False, momentum=False, nesterov=False):
    def sgd_elem(p, g, b, k):
        wd, mu_b, omd_b, mu, lr = k
        if maximize:
            g = -g
        if decay:
            g = g + wd * p
        if momentum:
            b = mu_b * b + omd_b * g
            if nesterov:
                g = g + mu * b
            else:
                g = b
        p = p - lr * g
        return p, b

    return sgd_elem
