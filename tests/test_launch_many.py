"""``numba_backend.launch_many``: one launch over many tensors equals one launch per tensor.

Tensors of lengths around the chunk size (and one large enough for the parallel loop) go
through the table of addresses; every variant's params and state must equal, bit for bit, the
one-tensor loop's on the same inputs (the same rule, the same scalars: the same operations).
Guard elements around every buffer must keep their poison.

The table walk depends on a variant's state layout (how many slots, which are present), not on
its rule: the default run keeps the first rule of each layout, the other rules are the
``exhaustive`` group (each is a compile of the many-tensor loop and of both one-tensor loops).
"""

import numpy as np
import pytest
from fastopt.kernels import RULES
from support.cover import marks

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


def _layout(rule):
    spec = RULES[rule]
    return len(spec.slots), tuple(spec.slots_used(spec.variants()[-1]))


#: the first rule of each state layout (of its fullest variant)
LAYOUT_RULES = set({_layout(r): r for r in reversed(RULES)}.values())


@pytest.mark.parametrize(
    "rule,dtype",
    [
        pytest.param(r, d, marks=marks(r in LAYOUT_RULES), id=f"{r}-{np.dtype(d).name}")
        for r, d in CASES
    ],
)
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
        _, k = spec.variant_and_scalars(hp, 3)
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


# -- storage formats (mixed precision): launch_many_io ---------------------------------------------

POISON16 = 0x7E01  # a bfloat16 NaN pattern: any write over a guard shows


def _bits16(x, kind):
    """float32 values as the uint16 patterns of ``kind`` (bfloat16 rounded on the bits)."""
    if kind == "float16":
        return x.astype(np.float16).view(np.uint16)
    return ((x.astype(np.float32).view(np.uint32) + 0x8000) >> 16).astype(np.uint16)


def _store(rng, n, kind, lead, positive=False):
    """A guarded buffer of ``n`` elements stored as ``kind`` after ``lead`` guard elements."""
    x = rng.uniform(0.5, 2.0, n) * (1 if positive else np.where(rng.random(n) < 0.5, -1, 1))
    if kind in ("bfloat16", "float16"):
        store = np.full(n + lead + 4, POISON16, np.uint16)
        store[lead:-4] = _bits16(x, kind)
    else:
        store = np.full(n + lead + 4, POISON, np.dtype(kind))
        store[lead:-4] = x
    return store


#: (name, rule, IO keywords, first-element offset): every storage format fastopt.torch launches,
#: stochastic rounding (its hash index counts from the tensor's start, not the chunk's), the
#: loss scale with the grads stored back, and arrays that are not 4-byte aligned (no word loop)
IO_CASES = [
    ("bf16-words", "adam", {}, 4),
    ("bf16-misaligned", "adam", {}, 5),
    ("bf16-words-sgd", "sgd", {}, 4),
    ("bf16-words-rprop", "rprop", {}, 4),
    ("f16", "adam", {"param": "float16", "grad": "float16", "state": "float16"}, 4),
    ("bf16-master", "adam", {"state": "float32", "master": True}, 4),
    (
        "f16-master",
        "adam",
        {"param": "float16", "grad": "float16", "state": "float32", "master": True},
        4,
    ),
    ("bf16-words-scale-grads", "adam", {"scale": "host", "write_grad": True}, 4),
    ("bf16-sr", "adam", {"sr": True}, 4),
]


@pytest.mark.parametrize("name,rule,kw,lead", IO_CASES, ids=[c[0] for c in IO_CASES])
def test_many_io_equals_one_by_one(name, rule, kw, lead):
    from fastopt.kernels.storage import IO

    io = IO(**{"param": "bfloat16", "grad": "bfloat16", "state": "bfloat16", **kw})
    spec = RULES[rule]
    rng = np.random.default_rng(len(name))
    flags = spec.variants()[-1] if rule == "adam" else spec.variants()[0]
    used = spec.slots_used(flags)
    nslots = len(spec.slots)
    _, k = spec.variant_and_scalars(spec.validate(spec.defaults), 3)
    inv_scale, key, salt = (0.5 if io.scale else 1.0), 0x5EED1234, 77
    # one case runs the parallel loops (SIZES, over PARALLEL_MIN elements); the others the
    # serial ones, still over tensors split into chunks and odd lengths (fewer compiles)
    sizes = SIZES if name == "bf16-words" else (1, 6, C - 9, C + 1)
    assert (sum(sizes) >= nb.PARALLEL_MIN) == (name == "bf16-words")

    def buffers(n):
        arrs = [_store(rng, n, io.param, lead), _store(rng, n, io.grad, lead)]
        arrs += [_store(rng, n, io.state, lead, positive=True) for _ in range(nslots)]
        arrs.append(_store(rng, n, "float32", lead) if io.master else None)
        return arrs

    stores = [buffers(n) for n in sizes]
    twins = [[None if s is None else s.copy() for s in st] for st in stores]
    grads0 = [st[1].copy() for st in stores]

    def addr(a):
        return a[lead:].ctypes.data

    table = np.array(
        [
            [n, addr(st[0]), addr(st[1])]
            + [addr(st[2 + j]) if used[j] else 0 for j in range(nslots)]
            + ([addr(st[-1])] if io.master else [])
            for n, st in zip(sizes, stores)
        ],
        dtype=np.int64,
    )
    spy = []
    real = nb.many_io_kernel
    try:
        nb.many_io_kernel = lambda *a: spy.append(a[-1]) or real(*a)
        nb.launch_many_io(
            rule, flags, used, io, table, nb.chunks_for(sizes), k, inv_scale, key, salt
        )
    finally:
        nb.many_io_kernel = real
    assert spy == [name.startswith("bf16-words")], "word loop taken where it must (not) be"
    run = nb.prepare(rule, flags, used, k, None, io=io, extras=(inv_scale, key))
    for tw in twins:
        body = [None if a is None else a[lead:-4] for a in tw]
        states = tuple(body[2 + j] if used[j] else None for j in range(nslots))
        run(body[0], body[1], states, body[-1], salt)
    for n, st, tw in zip(sizes, stores, twins):
        for a, b in zip(st, tw):
            if a is None:
                continue
            np.testing.assert_array_equal(a, b, err_msg=f"{name} n={n}")
            guard = POISON16 if a.dtype == np.uint16 else POISON
            assert (a[:lead] == guard).all() and (a[-4:] == guard).all(), f"{name} n={n}"
    if io.write_grad:  # the grads were stored back unscaled (x 0.5: exact in bfloat16)
        for n, st, g0 in zip(sizes, stores, grads0):
            got = (st[1][lead:-4].astype(np.uint32) << 16).view(np.float32)
            want = (g0[lead:-4].astype(np.uint32) << 16).view(np.float32) * np.float32(0.5)
            np.testing.assert_array_equal(got, want, err_msg=f"unscaled grads n={n}")
