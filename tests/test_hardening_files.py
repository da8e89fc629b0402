"""Hardening, round 2: checkpoint files and the chapter's classes (``fastopt.textbook``).

Each finding of the second red-team round about these two doors is a test here: the call either
gives the correct result or raises a clear ``TypeError``/``ValueError``/``KeyError`` and changes
nothing (parameters, optimizer state, step counts, Adam's ``iter``).

Checkpoints: a file whose state does not fit the optimizer it is loaded into (shapes, dtypes,
the state dtype policy, master copies, the host state, the parameters a stepped optimizer was
bound to) was accepted, its parameters written, and every later step refused; a sparse file of
6 GiB whose prefix claims a few bytes was read whole before its size was checked; a header of
100,000 nested brackets raised ``RecursionError``.

Textbook: a read-only state array of a later key was found by the kernel after earlier keys were
stepped; ``Adam(beta1=1e200)`` advanced ``iter`` before its scalar overflowed; ``np.matrix``
params were walked as one row.
"""

import copy
import hashlib
import json
import time
import tracemalloc
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import checkpoint as ckpt
from fastopt import precision, textbook


# -- checkpoint files, written by hand ----------------------------------------------------------
def _write(path, header, payload=b"", *, header_bytes=None, digest=True):
    """A checkpoint file of this header and payload with a correct prefix and checksum (so that
    only what the test puts in it is wrong)."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    prefix = ckpt._PREFIX.pack(ckpt.MAGIC, ckpt.FORMAT_VERSION, len(raw), len(payload))
    h = hashlib.sha256(prefix)
    h.update(raw)
    h.update(payload)
    path.write_bytes(prefix + (h.digest() if digest else bytes(32)) + raw + payload)
    return path


def _entry(role, name, slot, a, offset):
    return {
        "role": role,
        "name": name,
        "slot": slot,
        "dtype": a.dtype.str,
        "shape": list(a.shape),
        "offset": offset,
        "nbytes": a.nbytes,
    }


def _crafted(path, opt, params, state, step=1):
    """A file holding ``params`` and ``state`` ({name: {slot: array}}) under ``opt``'s kind and
    hyperparameters, whatever they are."""
    arrays = [("param", n, None, a) for n, a in params.items()]
    arrays += [("state", n, s, a) for n, st in state.items() for s, a in st.items()]
    entries, blobs, off = [], [], 0
    for role, name, slot, a in arrays:
        entries.append(_entry(role, name, slot, a, off))
        blobs.append(a.tobytes())
        off += a.nbytes
    header = {
        "format": "fastopt-checkpoint",
        "optimizer": type(opt).__name__,
        "step": step,
        "hyperparams": opt.hyperparams,
        "arrays": entries,
    }
    return _write(path, header, b"".join(blobs))


def _snapshot(opt, params):
    return {k: v.copy() for k, v in params.items()}, opt.state_dict()


def _unchanged(opt, params, snap):
    p0, sd0 = snap
    for k in params:
        np.testing.assert_array_equal(params[k], p0[k], strict=True)
    sd = opt.state_dict()
    assert sd["step"] == sd0["step"] and sd["hyperparams"] == sd0["hyperparams"]
    assert set(sd["state"]) == set(sd0["state"])
    for n, st in sd["state"].items():
        assert set(st) == set(sd0["state"][n])
        for s, a in st.items():
            np.testing.assert_array_equal(a, sd0["state"][n][s], strict=True)


def _still_steps_like_a_fresh_one(opt, params):
    """A refused load left a fresh optimizer fresh: its next step is a new optimizer's."""
    twin, mine = type(opt)(**opt.hyperparams), {k: v.copy() for k, v in params.items()}
    g = {k: np.full_like(v, 0.5) for k, v in params.items()}
    opt.update(params, g)
    twin.update(mine, g)
    for k in params:
        np.testing.assert_array_equal(params[k], mine[k])


def _mismatched(tmp_path):
    """(file, fresh target optimizer, target params, error, words): checkpoints whose state does
    not fit the target, each one accepted (params written) before this round."""
    rng = np.random.default_rng(0)
    w32, b64 = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5)
    params = {"w": w32, "b": b64}
    adam, out = fastopt.Adam(lr=0.01), []

    def target():
        return {"w": np.zeros((3, 4), np.float32), "b": np.zeros(5)}

    good = {
        n: {"exp_avg": np.ones_like(a), "exp_avg_sq": np.ones_like(a)} for n, a in params.items()
    }
    # a state buffer of another shape than its parameter
    bad = {**good, "w": {"exp_avg": np.ones(12, np.float32), "exp_avg_sq": np.ones_like(w32)}}
    out.append((_crafted(tmp_path / "shape", adam, params, bad), adam, ValueError, "exp_avg.*'w'"))
    # a state buffer of another dtype than the optimizer keeps (the param's)
    bad = {**good, "b": {"exp_avg": np.ones(5, np.float32), "exp_avg_sq": np.ones(5)}}
    out.append((_crafted(tmp_path / "dtype", adam, params, bad), adam, ValueError, "exp_avg.*'b'"))
    # a state buffer missing, one too many
    bad = {**good, "w": {"exp_avg": np.ones_like(w32)}}
    out.append((_crafted(tmp_path / "missing", adam, params, bad), adam, KeyError, "exp_avg_sq"))
    bad = {**good, "w": {**good["w"], "max_exp_avg_sq": np.ones_like(w32)}}
    out.append((_crafted(tmp_path / "extra", adam, params, bad), adam, KeyError, "max_exp_avg"))
    # a host state of the wrong shape (NAdam's mu_product is one number)
    nadam = fastopt.NAdam()
    st = {
        n: {"exp_avg": np.ones_like(a), "exp_avg_sq": np.ones_like(a), "mu_product": np.ones(3)}
        for n, a in params.items()
    }
    out.append((_crafted(tmp_path / "host", nadam, params, st), nadam, ValueError, "mu_product"))
    # a real file saved with another state dtype policy: its state is float32 for a float64 param
    saver = fastopt.Adam(lr=0.01, state_dtype="float32")
    saved = {k: v.copy() for k, v in params.items()}
    saver.update(saved, {k: np.ones_like(v) for k, v in saved.items()})
    fastopt.save_checkpoint(tmp_path / "policy", saver, saved)
    out.append((tmp_path / "policy", adam, ValueError, "exp_avg.*'b'.*float64"))
    return [
        (path, type(opt)(**opt.hyperparams), target(), exc, words) for path, opt, exc, words in out
    ]


def test_state_that_does_not_fit_a_fresh_optimizer_is_refused_before_any_write(tmp_path):
    for path, opt, params, exc, words in _mismatched(tmp_path):
        snap = _snapshot(opt, params)
        with pytest.raises(exc, match=words):
            fastopt.load_checkpoint(path, opt, params)
        _unchanged(opt, params, snap)
        _still_steps_like_a_fresh_one(opt, params)


def test_master_copies_in_a_file_for_an_optimizer_without_them_are_refused(tmp_path):
    ml = pytest.importorskip("ml_dtypes")
    p = {"w": np.arange(6, dtype=np.float32).astype(ml.bfloat16)}
    saver = fastopt.Adam(master_weights=True)
    saver.update(p, {"w": np.ones(6, ml.bfloat16)})
    fastopt.save_checkpoint(tmp_path / "m", saver, p)
    opt, params = fastopt.Adam(), {"w": np.zeros(6, ml.bfloat16)}
    snap = _snapshot(opt, params)
    with pytest.raises(KeyError, match=precision.MASTER):
        fastopt.load_checkpoint(tmp_path / "m", opt, params)
    _unchanged(opt, params, snap)


def test_params_of_another_dtype_than_a_stepped_optimizer_was_bound_to_are_refused(tmp_path):
    # the state (float32 by policy) fits the bound optimizer's; the params do not fit its binding
    saver = fastopt.Adam(state_dtype="float32")
    p64 = {"w": np.ones(4)}
    saver.update(p64, {"w": np.ones(4)})
    fastopt.save_checkpoint(tmp_path / "c", saver, p64)
    bound, p32 = fastopt.Adam(state_dtype="float32"), {"w": np.ones(4, np.float32)}
    bound.update(p32, {"w": np.ones(4, np.float32)})
    other = {"w": np.zeros(4)}
    snap, before = _snapshot(bound, p32), other["w"].copy()
    with pytest.raises(ValueError, match="first stepped with float32"):
        fastopt.load_checkpoint(tmp_path / "c", bound, other)
    _unchanged(bound, p32, snap)
    np.testing.assert_array_equal(other["w"], before)
    bound.update(p32, {"w": np.ones(4, np.float32)})  # and it still steps its own params


def test_a_fitting_file_still_loads_after_the_new_checks(tmp_path):
    ml = pytest.importorskip("ml_dtypes")
    half = {"w": np.linspace(-1, 1, 6).astype(ml.bfloat16), "b": np.ones(3, np.float32)}
    first = fastopt.NAdam(master_weights=True, state_dtype="float32")
    first.update(half, {k: np.full_like(v, 0.25) for k, v in half.items()})
    fastopt.save_checkpoint(tmp_path / "ok", first, half)
    again = fastopt.NAdam(master_weights=True, state_dtype="float32")
    target = {k: np.zeros_like(v) for k, v in half.items()}
    fastopt.load_checkpoint(tmp_path / "ok", again, target)
    g = {k: np.full_like(v, -0.5) for k, v in half.items()}
    first.update(half, g)
    again.update(target, g)
    for k in half:
        np.testing.assert_array_equal(target[k], half[k])
    for k, st in first.state.items():
        for s, a in st.items():
            np.testing.assert_array_equal(again.state[k][s], a)


# -- reads bounded by the file's size -----------------------------------------------------------
def _bounded(call):
    """Run ``call`` (expected to raise); return (exception, seconds, peak bytes allocated)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        call()
    except (ValueError, KeyError, TypeError) as exc:
        caught = exc
    else:
        caught = None
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return caught, seconds, peak


def _sparse(path, head, size):
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)  # a hole: no disk blocks, reads as zeros
    return path


def test_a_huge_sparse_file_claiming_a_few_bytes_is_refused_without_reading_it(tmp_path):
    # the prefix says 20 bytes of header and payload; the file is 6 GiB of holes
    head = ckpt._PREFIX.pack(ckpt.MAGIC, ckpt.FORMAT_VERSION, 12, 8) + bytes(32)
    path = _sparse(tmp_path / "sparse", head, 6 << 30)
    opt, params = fastopt.Adam(), {"w": np.ones(2)}
    exc, seconds, peak = _bounded(lambda: fastopt.load_checkpoint(path, opt, params))
    assert isinstance(exc, fastopt.CheckpointError) and "trailing data" in str(exc)
    assert peak < 1 << 20 and seconds < 5, (peak, seconds)  # it read the 52-byte prefix only
    assert opt.step_count == 0 and np.array_equal(params["w"], np.ones(2))


def test_a_huge_declared_header_is_refused_before_it_is_read(tmp_path):
    n = ckpt.MAX_HEADER + 1  # consistent with the file's size, beyond the limit
    head = ckpt._PREFIX.pack(ckpt.MAGIC, ckpt.FORMAT_VERSION, n, 0) + bytes(32)
    path = _sparse(tmp_path / "header", head, ckpt._HEAD + n)
    exc, seconds, peak = _bounded(
        lambda: fastopt.load_checkpoint(path, fastopt.SGD(), {"w": np.ones(2)})
    )
    assert isinstance(exc, fastopt.CheckpointError) and "header" in str(exc)
    assert peak < 1 << 20 and seconds < 5, (peak, seconds)


def test_a_huge_payload_for_small_params_is_refused_before_it_is_read(tmp_path):
    # a well-formed header declaring one 6 GiB array, over a sparse payload: the target's
    # parameter is 2 elements, so nothing of the payload is read (not even to hash it)
    big = 6 << 30
    header = {
        "format": "fastopt-checkpoint",
        "optimizer": "SGD",
        "step": 0,
        "hyperparams": fastopt.SGD().hyperparams,
        "arrays": [
            {
                "role": "param",
                "name": "w",
                "slot": None,
                "dtype": "<f8",
                "shape": [big // 8],
                "offset": 0,
                "nbytes": big,
            }
        ],
    }
    raw = json.dumps(header).encode()
    head = ckpt._PREFIX.pack(ckpt.MAGIC, ckpt.FORMAT_VERSION, len(raw), big) + bytes(32) + raw
    path = _sparse(tmp_path / "payload", head, len(head) + big)
    params = {"w": np.ones(2)}
    exc, seconds, peak = _bounded(lambda: fastopt.load_checkpoint(path, fastopt.SGD(), params))
    assert isinstance(exc, ValueError) and "'w'" in str(exc), exc
    assert peak < 4 << 20 and seconds < 5, (peak, seconds)
    np.testing.assert_array_equal(params["w"], 1.0)


def test_an_array_larger_than_what_remains_is_refused_before_allocating(tmp_path):
    header = {
        "format": "fastopt-checkpoint",
        "optimizer": "SGD",
        "step": 0,
        "hyperparams": fastopt.SGD().hyperparams,
        "arrays": [
            {
                "role": "param",
                "name": "w",
                "slot": None,
                "dtype": "<f8",
                "shape": [10**12],
                "offset": 0,
                "nbytes": 8 * 10**12,
            }
        ],
    }
    path = _write(tmp_path / "c", header, bytes(16))
    exc, _, peak = _bounded(lambda: fastopt.load_checkpoint(path, fastopt.SGD(), {"w": np.ones(2)}))
    assert isinstance(exc, fastopt.CheckpointError) and "does not fit the payload" in str(exc)
    assert peak < 1 << 20


# -- headers parsed with bounded depth ----------------------------------------------------------
@pytest.mark.parametrize("nest", ["[", '{"a":'])
def test_a_deeply_nested_header_is_refused_with_a_clear_error(tmp_path, nest):
    close = "]" if nest == "[" else "}"
    raw = (nest * 100_000 + "0" + close * 100_000).encode()
    path = _write(tmp_path / "nested", None, header_bytes=raw)
    opt, params = fastopt.SGD(), {"w": np.ones(2)}
    with pytest.raises(fastopt.CheckpointError, match="nested 100000 deep"):
        fastopt.load_checkpoint(path, opt, params)
    assert opt.step_count == 0 and np.array_equal(params["w"], np.ones(2))


def test_brackets_inside_names_are_not_nesting(tmp_path):
    name = '[[[{{"\\]' * 40  # brackets, quotes and a backslash in a parameter name
    opt, params = fastopt.Adam(), {name: np.ones(3)}
    opt.update(params, {name: np.full(3, 0.5)})
    fastopt.save_checkpoint(tmp_path / "c", opt, params)
    again, target = fastopt.Adam(), {name: np.zeros(3)}
    fastopt.load_checkpoint(tmp_path / "c", again, target)
    np.testing.assert_array_equal(target[name], params[name])
    assert again.step_count == 1


def test_a_nested_header_with_a_bad_checksum_is_reported_as_corrupted(tmp_path):
    path = _write(tmp_path / "c", None, header_bytes=b"[" * 5000, digest=False)
    with pytest.raises(fastopt.CheckpointError, match="checksum"):
        fastopt.load_checkpoint(path, fastopt.SGD(), {"w": np.ones(2)})


def test_nan_in_a_header_is_refused(tmp_path):
    opt = fastopt.SGD()
    raw = json.dumps(
        {
            "format": "fastopt-checkpoint",
            "optimizer": "SGD",
            "step": 0,
            "hyperparams": dict(opt.hyperparams, lr=float("nan")),
            "arrays": [],
        }
    ).encode()
    assert b"NaN" in raw
    path = _write(tmp_path / "c", None, header_bytes=raw)
    with pytest.raises(fastopt.CheckpointError, match="NaN"):
        fastopt.load_checkpoint(path, opt, {})


# -- textbook: checked for every key before the first write -------------------------------------
def _two_keys(name):
    opt = getattr(textbook, name)(lr=0.1)
    params = {"a": np.ones(4), "b": np.full(3, 2.0)}
    opt.update(params, {"a": np.full(4, 0.5), "b": np.full(3, 0.5)})
    return opt, params


def _textbook_snapshot(opt, params):
    state = {s: copy.deepcopy(getattr(opt, s)) for s in opt._state}
    return {k: copy.deepcopy(v) for k, v in params.items()}, state, getattr(opt, "iter", None)


def _textbook_unchanged(opt, params, snap):
    p0, state, it = snap
    assert set(params) == set(p0)
    for k in p0:
        np.testing.assert_array_equal(params[k], p0[k], strict=True)
    for s, before in state.items():
        now = getattr(opt, s)
        if not isinstance(before, dict):
            assert now == before
            continue
        assert set(now) == set(before)
        for k, a in before.items():
            assert type(now[k]) is type(a)
            np.testing.assert_array_equal(np.asarray(now[k]), np.asarray(a), strict=True)
    assert getattr(opt, "iter", None) == it


@pytest.mark.parametrize(
    "name, spoil, exc, words",
    [
        ("Momentum", lambda o: o.v["b"].setflags(write=False), ValueError, r"v\['b'\].*read-only"),
        ("Adam", lambda o: o.v["b"].setflags(write=False), ValueError, r"v\['b'\].*read-only"),
        ("AdaGrad", lambda o: o.h.__setitem__("b", np.zeros(4)), ValueError, r"h\['b'\]"),
        ("RMSprop", lambda o: o.h.__setitem__("b", np.zeros(3, np.float32)), ValueError, "float32"),
        ("Nesterov", lambda o: o.v.__setitem__("b", _matrix(np.zeros(3))), TypeError, "matrix"),
        ("Nesterov", lambda o: o.v.__setitem__("b", [0.0, 0.0, 0.0]), TypeError, "list"),
        ("Momentum", lambda o: setattr(o, "v", [1, 2]), TypeError, "state v is a list"),
        ("Adam", lambda o: o.m.pop("b"), KeyError, r"m\['b'\]"),
    ],
)
def test_a_bad_state_array_of_a_later_key_is_refused_before_the_first_write(
    name, spoil, exc, words
):
    opt, params = _two_keys(name)
    spoil(opt)
    snap = _textbook_snapshot(opt, params)
    with pytest.raises(exc, match=words):
        opt.update(params, {"a": np.full(4, 0.5), "b": np.full(3, 0.5)})
    _textbook_unchanged(opt, params, snap)  # "a" comes first: not stepped either


def test_a_state_array_sharing_memory_with_its_param_is_refused():
    opt, params = _two_keys("Momentum")
    opt.v["b"] = params["b"]  # the velocity is the parameter itself
    snap = _textbook_snapshot(opt, params)
    with pytest.raises(ValueError, match=r"v\['b'\] shares memory with the parameter"):
        opt.update(params, {"a": np.ones(4), "b": np.ones(3)})
    _textbook_unchanged(opt, params, snap)


@pytest.mark.parametrize("beta1, beta2", [(1e200, 0.999), (0.9, 1e300), (0.9, -1e200)])
def test_adam_scalars_that_overflow_change_nothing(beta1, beta2):
    # beta**1 is finite, beta**2 overflows: the second update is refused with iter still 1
    opt = textbook.Adam(beta1=beta1, beta2=beta2)
    params = {"a": np.ones(4), "b": np.full(3, 2.0)}
    grads = {"a": np.ones(4), "b": np.ones(3)}
    with np.errstate(invalid="ignore"):  # sqrt(1 - 1e300) is NaN, as in the chapter
        opt.update(params, grads)
    snap = _textbook_snapshot(opt, params)
    with pytest.raises(ValueError, match="lr_t at iter 2 cannot be computed.*Overflow"):
        opt.update(params, grads)
    _textbook_unchanged(opt, params, snap)
    # betas set after good steps: the same
    opt, params = _two_keys("Adam")
    opt.beta1, opt.beta2 = beta1, beta2
    snap = _textbook_snapshot(opt, params)
    with pytest.raises(ValueError, match="lr_t at iter 2"):
        opt.update(params, grads)
    _textbook_unchanged(opt, params, snap)
    opt.beta1, opt.beta2 = 0.9, 0.999
    opt.iter = "3"
    with pytest.raises(TypeError, match="iter must be an integer"):
        opt.update(params, grads)
    assert opt.iter == "3"


def _matrix(a):
    with warnings.catch_warnings():  # np.matrix is pending deprecation; users still have them
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix(a)


@pytest.mark.parametrize("kind", ["matrix", "MaskedArray"])
@pytest.mark.parametrize("role", ["param", "grad"])
def test_matrix_and_masked_arrays_are_refused(kind, role):
    # np.matrix: reshape(-1) stays (1, n), so a loop over its first axis ran once; the
    # chapter's `g * g` is a matrix product there. Masked arrays: the kernel would step the
    # masked elements that the chapter's NumPy leaves alone.
    row = [[1.0, 2.0, 3.0]]
    bad = _matrix(row) if kind == "matrix" else np.ma.masked_array(row, mask=[[0, 1, 0]])
    opt = textbook.Momentum()
    good = np.ones(3)
    params = {"good": good, "bad": bad if role == "param" else np.ones((1, 3))}
    grads = {"good": np.ones(3), "bad": bad if role == "grad" else np.ones((1, 3))}
    before = np.array(params["bad"])
    with pytest.raises(TypeError, match=kind):
        opt.update(params, grads)
    np.testing.assert_array_equal(good, 1.0)
    np.testing.assert_array_equal(np.asarray(params["bad"]), before)
    assert opt.v is None


def test_other_ndarray_subclasses_are_stepped_through_a_plain_view(tmp_path):
    class Tagged(np.ndarray):
        pass

    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 4))
    mm = np.lib.format.open_memmap(tmp_path / "w.npy", "w+", np.float64, (5, 4))
    mm[...] = w
    tagged = w.copy().view(Tagged)
    plain = w.copy()
    opts = [textbook.Nesterov(lr=0.1) for _ in range(3)]
    for _ in range(3):
        g = rng.standard_normal((5, 4))
        for opt, p in zip(opts, (mm, tagged, plain)):
            opt.update({"w": p}, {"w": g})
    np.testing.assert_array_equal(np.asarray(mm), plain)  # every element, not one row
    np.testing.assert_array_equal(np.asarray(tagged), plain)
