"""``numba_backend.launch_many``: one launch over many tensors equals one launch per tensor.

Tensors of lengths around the chunk size (and one large enough for the parallel loop) go
through the table of addresses; every variant's params and state must equal, bit for bit, the
one-tensor loop's on the same inputs (the same rule, the same scalars: the same operations).
Guard elements around every buffer must keep their poison.
"""

import numpy as np
import pytest
from fastopt.kernels import RULES

from fastopt.backends import numba_backend as nb

C = nb.CHUNK
SIZES = (1, C - 1, C, C + 1, 3 * C + 5, 70_001)
POISON = -7.25e3


def _buffers(rng, n, dtype, nslots):
    """Guarded arrays: each is the middle of a poisoned store (so a stray write shows)."""
    out = []
    for _ in range(2 + nslots):
        store = np.full(n + 8, POISON, dtype)
        store[4:-4] = rng.uniform(0.5, 2.0, n) * np.where(rng.random(n) < 0.5, -1, 1)
        out.append(store)
    for j in range(2, 2 + nslots):  # squared averages stay positive
        out[j][4:-4] = np.abs(out[j][4:-4])
    return out


#: each rule's variant with every flag on (the most code), in float32; one rule in float64 too
#: (each variant is a compile: the other variants share the table walk, which is flag-free)
CASES = [(r, np.float32) for r in RULES] + [("adam", np.float64)]


@pytest.mark.parametrize("rule,dtype", CASES, ids=[f"{r}-{np.dtype(d).name}" for r, d in CASES])
def test_many_equals_one_by_one(rule, dtype):
    spec = RULES[rule]
    rng = np.random.default_rng(len(rule))
    hp = {h.name: h.probe if h.probe is not None else h.default for h in spec.hyper}
    hp = {**spec.defaults, **{k: v for k, v in hp.items() if not isinstance(v, bool)}}
    try:
        hp = spec.validate(hp)
    except ValueError:
        hp = spec.validate(spec.defaults)
    for flags in spec.variants()[-1:]:
        used = spec.slots_used(flags)
        _, k = spec.plan(hp, 3)
        stores = [_buffers(rng, n, dtype, len(spec.slots)) for n in SIZES]
        twins = [[s.copy() for s in st] for st in stores]
        table = np.array(
            [
                [n, st[0][4:].ctypes.data, st[1][4:].ctypes.data]
                + [st[2 + j][4:].ctypes.data if used[j] else 0 for j in range(len(spec.slots))]
                for n, st in zip(SIZES, stores)
            ],
            dtype=np.int64,
        )
        nb.launch_many(rule, flags, used, dtype, table, nb.chunks_for(SIZES), k)
        for tw in twins:
            states = tuple(tw[2 + j][4:-4] if used[j] else None for j in range(len(spec.slots)))
            nb.prepare(rule, flags, used, k, dtype)(tw[0][4:-4], tw[1][4:-4], states)
        for n, st, tw in zip(SIZES, stores, twins):
            for a, b in zip(st, tw):
                np.testing.assert_array_equal(a, b, err_msg=f"{rule} {flags} n={n}")
                assert (a[:4] == POISON).all() and (a[-4:] == POISON).all()


def test_chunks_cover_every_element_once():
    rows = nb.chunks_for(SIZES)
    seen = {t: np.zeros(n, int) for t, n in enumerate(SIZES)}
    for t, lo, hi in rows:
        assert 0 <= lo < hi <= SIZES[t] and hi - lo <= C
        seen[t][lo:hi] += 1
    assert all((v == 1).all() for v in seen.values())
    assert nb.chunks_for([]).shape == (0, 3)


def test_add_at_adds_to_each_address_and_nothing_else():
    buf = np.arange(8, dtype=np.float32)
    picked = [1, 4, 4, 7]  # an address twice: added twice, as two ``+= 1`` would
    nb.add_at(np.array([buf.ctypes.data + 4 * i for i in picked], dtype=np.int64), 1.0)
    want = np.arange(8, dtype=np.float32)
    np.add.at(want, picked, np.float32(1.0))
    assert np.array_equal(buf, want)
    nb.add_at(np.zeros(0, dtype=np.int64), 1.0)  # nothing to do
    assert np.array_equal(buf, want)
