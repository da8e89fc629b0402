"""Cases for the GPU kernels of quantized state (``kernels/quant_cuda.py``: the CUDA C kernel
under g++, the numba-cuda kernel under the simulator and on a GPU).

A case is one buffer holding two tensors (``SEGMENTS``: ``(offset, size)``, odd sizes at even
offsets, each ending in a short block in every format, a gap between them and an element after
them that no step may touch: ``OUTSIDE``), its quantized slots laid out as a ``FlatBuffer``
group's (codes over the whole buffer, two per byte for a packed format: a tensor's first code
the high nibble of byte ``offset / 2``; the tensors' block scales one after the other; the block
table of ``numba_quant.blocks_of_segments``). ``expected`` is the definition a
quantized step is held to (``tests/test_quant_numba.py``): per tensor, the float32-state step
of a backend on the dequantized state, then the oracle's quantization.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastopt.kernels import RULES, quant

from fastopt import _quantized as Q
from fastopt import functional as F
from fastopt import quant_reference as qr

#: two tensors of one buffer, of odd lengths: 2 full blocks of 256 and 89 elements (int4: 4 of
#: 128 and 89), then 1 and 43 (2 and 43) after a gap of 39, then one more element
SEGMENTS = ((0, 601), (640, 299))
LENGTH = 940
#: the buffer's elements outside every tensor (the gap and the last element)
OUTSIDE = np.ones(LENGTH, bool)
for _off, _n in SEGMENTS:
    OUTSIDE[_off : _off + _n] = False
#: a value no step writes (the elements ``OUTSIDE`` must keep it)
POISON = np.float32(-7.25)


def _bytes(off: int, n: int, fmt: str) -> slice:
    """The bytes of codes of the tensor at ``off`` of ``n`` elements (two codes per byte for a
    packed format, ``off`` even)."""
    if fmt in quant.PACKED:
        return slice(off // 2, off // 2 + quant.code_bytes(n, fmt))
    return slice(off, off + n)


def rule_format_params(default: set[tuple[str, str]], rules: Any = RULES) -> list[Any]:
    """``(rule, fmt)`` pytest params over ``rules`` and every quantized format, each marked
    ``exhaustive`` unless in ``default``."""
    return [
        pytest.param(
            rule,
            fmt,
            id=f"{rule}-{fmt}",
            marks=() if (rule, fmt) in default else (pytest.mark.exhaustive,),
        )
        for rule in rules
        for fmt in quant.ALL_FORMATS
    ]


def block_table(fmt: str) -> np.ndarray:
    from fastopt.backends.numba_quant import blocks_of_segments

    return blocks_of_segments(SEGMENTS, quant.BLOCKS[fmt])


def _block_ranges(fmt: str) -> list[tuple[int, int]]:
    out, b = [], 0
    for _, n in SEGMENTS:
        out.append((b, b + quant.nblocks(n, fmt)))
        b += quant.nblocks(n, fmt)
    return out


def initial(rule: str, hp: dict[str, Any], fmt: str, rng: Any) -> dict[str, Any]:
    """Slot states over the buffer: ``(codes, absmax)`` for a quantized slot, float32 for
    another used one, None where the variant of step 1 uses none. Random non-trivial values
    (a slot's initial value where it is ``fresh``; non-negative where the slot is even; centered
    RMSprop's ``v`` above ``ga²`` by a margin, as in ``tests/test_quant_numba.py``)."""
    spec = RULES[rule]
    flags = spec.flags_of(hp, 1, spec.initial_host_state(hp))
    out: dict[str, Any] = {}
    for s, used in zip(spec.slots, spec.slots_used(flags)):
        if not used:
            out[s.name] = None
            continue
        x = rng.standard_normal(LENGTH).astype(np.float32) * np.float32(0.1)
        if s.even:
            x = np.abs(x) + np.float32(spec.initial(s.name, hp))
        if s.fresh:
            x[:] = spec.initial(s.name, hp)
        out[s.name] = _quantize(x, fmt, s.quant_map) if s.quantize else x
    if out.get("grad_avg") is not None:
        # centered RMSprop takes sqrt(v - ga²): v above ga² (decoded) by a margin
        ga = _values(out["grad_avg"], fmt, spec.slot("grad_avg").quant_map)
        v = ga * ga + np.float32(0.05) + np.abs(rng.standard_normal(LENGTH)).astype(np.float32)
        sq = spec.slot("square_avg")
        out["square_avg"] = _quantize(v, fmt, sq.quant_map) if sq.quantize else v
    return out


def _quantize(x: np.ndarray, fmt: str, qm: str) -> tuple[np.ndarray, np.ndarray]:
    codes = np.full(quant.code_bytes(LENGTH, fmt), 0xA5, np.uint8)  # the gap's: never written
    scales = []
    for off, n in SEGMENTS:
        c, a = Q.quantize(x[off : off + n], fmt, qm)
        codes[_bytes(off, n, fmt)] = c
        scales.append(a)
    return codes, np.concatenate(scales)


def _values(pair: Any, fmt: str, qm: str) -> np.ndarray:
    if not isinstance(pair, tuple):
        return np.asarray(pair)
    out = np.zeros(LENGTH, np.float32)
    for (off, n), (b0, b1) in zip(SEGMENTS, _block_ranges(fmt)):
        c = pair[0][_bytes(off, n, fmt)]
        out[off : off + n] = qr.dequantize(c, pair[1][b0:b1], fmt, qm, n)
    return out


def tensors(rule: str, fmt: str, p: np.ndarray, g: np.ndarray, state: dict[str, Any]) -> list[Any]:
    """The buffer's tensors as a multi-tensor table takes them (``_launch.TensorTable``:
    ``(param, grad, slots, None)`` of views, a quantized slot as its ``(codes, absmax)``
    views), the second tensor first: each row's scales are found from its own row."""
    out = []
    for (off, n), (b0, b1) in reversed(list(zip(SEGMENTS, _block_ranges(fmt)))):
        sl, cb = slice(off, off + n), _bytes(off, n, fmt)
        slots = [
            None if a is None else (a[0][cb], a[1][b0:b1]) if isinstance(a, tuple) else a[sl]
            for a in (state[s] for s in RULES[rule].state)
        ]
        out.append((p[sl], g[sl], slots, None))
    return out


def copy(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: None if v is None else (v[0].copy(), v[1].copy()) if isinstance(v, tuple) else v.copy()
        for k, v in state.items()
    }


def host_state_kw(rule: str, hp: dict[str, Any], step: int) -> dict[str, Any]:
    spec = RULES[rule]
    return {"host_state": spec.replay_host_state(hp, step)} if spec.host_state else {}


def expected(
    rule: str,
    hp: dict[str, Any],
    fmt: str,
    p: np.ndarray,
    g: np.ndarray,
    state: dict[str, Any],
    step: int,
    backend: str = "numba",
) -> tuple[np.ndarray, dict[str, Any]]:
    """``(param, state)`` after the step by definition: per tensor, ``backend``'s float32-state
    step on the dequantized state, then the oracle's quantization (the gap unchanged)."""
    spec = RULES[rule]
    p_out = p.copy()
    st_out = copy(state)
    for (off, n), (b0, b1) in zip(SEGMENTS, _block_ranges(fmt)):
        sl, cb = slice(off, off + n), _bytes(off, n, fmt)
        full: dict[str, Any] = {}
        for s in spec.slots:
            a = state[s.name]
            if a is None:
                full[s.name] = None
            elif isinstance(a, tuple):
                full[s.name] = qr.dequantize(a[0][cb], a[1][b0:b1], fmt, s.quant_map, n)
            else:
                full[s.name] = a[sl].copy()
        ps = p[sl].copy()
        F.run(
            rule,
            ps,
            g[sl],
            full,
            step=step,
            hp=hp,
            backend=backend,
            **host_state_kw(rule, hp, step),
        )
        p_out[sl] = ps
        for s in spec.slots:
            a = st_out[s.name]
            if isinstance(a, tuple):
                c, m = qr.quantize(full[s.name], fmt, s.quant_map)
                a[0][cb], a[1][b0:b1] = c, m
            elif a is not None:
                a[sl] = full[s.name]
    return p_out, st_out


def assert_same(
    got_p: np.ndarray,
    got: dict[str, Any],
    want_p: np.ndarray,
    want: dict[str, Any],
    what: str,
    fmt: str,
) -> None:
    """Bit for bit: params, every float32 slot, every code and scale of format ``fmt`` (codes
    compared where their block's scale is not NaN: a NaN block's codes are the rule's NaNs
    either way; every byte outside the tensors too)."""
    assert np.array_equal(got_p.view(np.uint32), want_p.view(np.uint32)), f"{what}: param"
    per = 2 if fmt in quant.PACKED else 1  # elements per byte
    for name, w in want.items():
        g = got[name]
        if isinstance(w, tuple):
            assert np.array_equal(g[1], w[1], equal_nan=True), f"{what}: {name}.absmax"
            ok = np.ones(w[0].size, bool)
            for (off, n), (b0, b1) in zip(SEGMENTS, _block_ranges(fmt)):
                nan = np.isnan(w[1][b0:b1])
                cb = _bytes(off, n, fmt)
                first = per * np.arange(cb.stop - cb.start)  # each byte's first element
                ok[cb] = ~nan[first // quant.BLOCKS[fmt]]
            assert np.array_equal(g[0][ok], w[0][ok]), f"{what}: {name}.codes"
        elif w is not None:
            assert np.array_equal(g, w, equal_nan=True), f"{what}: {name}"


def bf16_sr_scale_against_the_cpu_loop(device_step: Any) -> None:
    """bfloat16 params and grads, stochastic rounding and a host loss scale (the storage
    format's loads and stores around the same codec), Adam in int8 for two steps:
    ``device_step(rule, hp, fmt, t, flags, k, io, p, g, state, blocks, (inv_scale, salt, key))``
    steps ``p``/``state`` in place, and must equal the CPU backend's quantized loop over the
    same buffer and block table bit for bit."""
    import ml_dtypes
    from fastopt.kernels import storage

    from fastopt.backends.numba_quant import prepare_quant
    from support.matrix import RULE_FULL

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rule, fmt, hp = "adam", "int8", RULE_FULL["adam"]
    spec = RULES[rule]
    io = storage.IO(param="bfloat16", grad="bfloat16", quant=fmt, sr=True, scale="host")
    rng = np.random.default_rng(4)
    p = rng.standard_normal(LENGTH).astype(bf16)
    st = initial(rule, hp, fmt, rng)
    p_c, st_c = p.copy(), copy(st)
    blocks = block_table(fmt)
    for t in (1, 2):
        g = (rng.standard_normal(LENGTH) * 8).astype(bf16)
        flags, k = spec.variant_and_scalars(hp, t, spec.replay_host_state(hp, t))
        key, salt, inv = storage.step_key(7, t), 3, 0.125
        run = prepare_quant(rule, flags, spec.slots_used(flags), k, io, extras=(inv, key))
        states = [(*st_c[s.name], blocks) if st_c[s.name] is not None else None for s in spec.slots]
        run(p_c, g, states, None, salt)
        device_step(rule, hp, fmt, t, flags, k, io, p, g, st, blocks, (inv, salt, key))
        assert np.array_equal(p.view(np.uint16), p_c.view(np.uint16)), f"param, step {t}"
        none = np.zeros(1, np.float32)
        assert_same(none, st, none, st_c, f"bfloat16 sr step {t}", fmt)
