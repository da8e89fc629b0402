"""Bytes of state per parameter (``fastopt.memory``) against what an optimizer allocates."""

import numpy as np
import pytest

from fastopt.memory import state_bytes_per_param
from fastopt.optimizers import CLASSES


def test_adam_figures():
    assert state_bytes_per_param("adam") == 8
    assert state_bytes_per_param("adam", state_dtype="int8") == 2.03125
    assert state_bytes_per_param("adam", state_dtype="float8_e4m3") == 2.03125
    assert state_bytes_per_param("adam", state_dtype="bfloat16") == 4
    assert state_bytes_per_param("adam", {"amsgrad": True}, state_dtype="int8") == 3 * 1.015625
    assert state_bytes_per_param("adam", param_dtype="bfloat16", master_weights=True) == 12
    assert state_bytes_per_param("lion", state_dtype="int8") == 1.015625
    # slots a rule keeps in full precision: ASGD's ax stays float32
    assert state_bytes_per_param("asgd", state_dtype="int8") == 4


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_equals_the_bytes_an_optimizer_allocates(name, state_dtype):
    """On a parameter of a whole number of blocks, the figure is the allocated bytes / n."""
    cls = CLASSES[name]
    n = 4096
    opt = cls(state_dtype=state_dtype, backend="numpy")  # the oracle: the same buffers
    p = {"x": np.ones(n, np.float32)}
    opt.update(p, {"x": np.full(n, 1e-3, np.float32)})
    got = sum(a.nbytes for a in opt.state["x"].values()) / n
    rule = cls._rule
    hp = opt._rule_hp(opt.hyperparams)
    assert got == state_bytes_per_param(rule, hp, state_dtype=state_dtype)
