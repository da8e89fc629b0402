"""AdaGrad (PyTorch's form: eps outside the square root, clr = lr / (1 + (t-1)*lr_decay)).

    g = -g if maximize;  g = g + wd*p
    s = s + g*g
    p = p - clr * (g / (sqrt(s) + eps))
"""
import math

STATE = ("sum",)
SCALARS = ("wd", "clr", "eps")


def make_rule(maximize=False, decay=False):
    def adagrad_elem(p, g, s, k):
        wd, clr, eps = k
        if maximize:
            g = -g
        if decay:
            g = g + wd * p
        s = s + g * g
        d = math.sqrt(s) + eps
        p = p - clr * (g / d)
        return p, s

    return adagrad_elem
