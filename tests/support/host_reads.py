"""A guard for the sync-free tests of ``fastopt.torch``'s device path: no host read of a tensor.

On a GPU, ``.item()``, ``float()``, ``int()``, ``bool()``, ``.tolist()`` of a device tensor is a
host synchronisation. On the CPU (the fake GPU backend of ``support.fake_table``) the same calls
are patched to raise for the tensors a steady step must not read (loss scale, found-inf flag,
lr, step counts), so a test proves the step never asks for their values.
"""

import contextlib

__all__ = ["no_host_reads"]

#: the ``torch.Tensor`` methods through which Python reads a tensor's value on the host
_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist")


@contextlib.contextmanager
def no_host_reads(tensors):
    """Within the block, a host read (``_READS``) of any of ``tensors`` raises AssertionError."""
    import torch

    ids = {id(t) for t in tensors}
    saved = {n: getattr(torch.Tensor, n) for n in _READS}

    def guard(name):
        orig = saved[name]

        def f(self, *a, **k):
            if id(self) in ids:
                raise AssertionError(f"host read: {name} of a watched tensor")
            return orig(self, *a, **k)

        return f

    for n in _READS:
        setattr(torch.Tensor, n, guard(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
