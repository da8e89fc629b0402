"""RMSProp (PyTorch's form: eps outside the square root, optional centering and momentum).

    g = -g if maximize;  g = g + wd*p
    v = alpha*v + oma*g*g                       (oma = 1 - alpha)
    centered: ga = ga + oma*(g - ga);  d = sqrt(v - ga*ga) + eps   else d = sqrt(v) + eps
    momentum: b = mu*b + g/d;  p = p - lr*b     else p = p - lr*(g/d)

``v - ga*ga`` is one fused multiply-add, ``fma(-ga, ga, v)``, as torch's
``addcmul(v, ga, ga, value=-1)`` is on FMA hardware: where ``ga*ga`` overflows, ``v = inf``
gives ``d = inf`` (the param stays finite), not ``inf - inf = NaN``.
"""
import math

from .fma import fma

STATE = ("square_avg", "grad_avg", "momentum_buffer")
SCALARS = ("wd", "alpha", "oma", "eps", "mu", "lr")


def make_rule(maximize=False, decay=False, centered=False, momentum=False):
    def rmsprop_elem(p, g, v, ga, b, k):
        wd, alpha, oma, eps, mu, lr = k
        if maximize:
            g = -g
        if decay:
            g = g + wd * p
        v = alpha * v + oma * g * g
        if centered:
            ga = ga + oma * (g - ga)
            d = math.sqrt(fma(-ga, ga, v)) + eps
        else:
            d = math.sqrt(v) + eps
        if momentum:
            b = mu * b + g / d
            p = p - lr * b
        else:
            p = p - lr * (g / d)
        return p, v, ga, b

    return rmsprop_elem
