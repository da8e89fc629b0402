"""``fastopt demo``: the valley paths against the oracle, the MLP's gradients against finite
differences, every optimizer training, the command end to end, and the missing-extra message."""

import subprocess
import sys

import numpy as np
import pytest
from support.tolerances import TOL  # the suite's one table, keyed by dtype

from fastopt import cli, optimizers, reference
from fastopt.backends import numba_backend
from fastopt.demo.problems import (
    CHOSEN,
    VALLEY_START,
    init_mlp,
    mlp_loss,
    mlp_loss_and_grad,
    specs,
    train_mlp,
    valley_path,
)

#: the settings chosen by hand (the searched ones are tested in
#: test_every_registered_optimizer_is_in_the_demo)
SPECS = tuple(CHOSEN.values())
SPEC_IDS = [s.name for s in SPECS]


def oracle(spec):
    """How a demo optimizer maps onto the oracle: its rule's function, the flags its class pins
    (Nesterov's nesterov=True, AdamW's decoupled_weight_decay=True) and the state slots it keeps."""
    import inspect

    cls = getattr(optimizers, spec.name)
    fn = getattr(reference, cls._rule)
    flags = {k: v for k, v in cls._pinned.items() if k in inspect.signature(fn).parameters}
    return fn, flags, cls.slots_for(**spec.valley)


def oracle_valley_path(spec, steps, dtype=np.float64):
    """The valley path computed with ``fastopt.reference`` alone: no FlatBuffer, no class."""
    fn, flags, slots = oracle(spec)
    p = np.array(VALLEY_START, dtype=dtype)
    state = {s: np.zeros(2, dtype) for s in slots}
    path = [p.copy()]
    for t in range(1, steps + 1):
        g = np.array([p[0] / 10, 2 * p[1]], dtype=dtype)
        fn(p, g, state, step=t, **spec.valley, **flags)
        path.append(p.copy())
    return np.stack(path)


def test_chosen_settings_name_registered_optimizers():
    assert set(CHOSEN) <= set(optimizers.CLASSES)
    assert all(s.name == name for name, s in CHOSEN.items())


# -- the valley ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_valley_path_matches_oracle_point_for_point(spec, dtype):
    steps = 30
    got = valley_path(spec, steps, backend="numba", dtype=dtype)
    oracle = oracle_valley_path(spec, steps, np.float64)
    assert got.shape == (steps + 1, 2) and got.dtype == dtype
    assert not np.array_equal(got[-1], got[0]), "the path did not move"
    np.testing.assert_allclose(got, oracle, **TOL[np.dtype(dtype)])
    # backend "numpy" is the oracle behind the same FlatBuffer + opt.step plumbing: identical
    np.testing.assert_array_equal(
        valley_path(spec, steps, backend="numpy", dtype=dtype),
        oracle_valley_path(spec, steps, dtype),
    )


def test_valley_sgd_has_the_closed_form():
    # p -= lr·(x/10, 2y): x_t = x0·(1 − lr/10)^t, y_t = y0·(1 − 2·lr)^t — written by hand
    spec = next(s for s in SPECS if s.name == "SGD")
    lr = spec.valley["lr"]
    t = np.arange(31)
    want = np.stack(
        [VALLEY_START[0] * (1 - lr / 10) ** t, VALLEY_START[1] * (1 - 2 * lr) ** t], axis=1
    )
    np.testing.assert_allclose(
        valley_path(spec, 30, backend="numba"), want, **TOL[np.dtype(np.float64)]
    )


def test_valley_momentum_is_the_textbook_heavy_ball():
    # the chapter's form: v = μ·v − lr·g; p += v (v starts at 0); same path at constant lr
    spec = next(s for s in SPECS if s.name == "Momentum")
    lr, mu = spec.valley["lr"], spec.valley["momentum"]
    p, v = np.array(VALLEY_START), np.zeros(2)
    want = [p.copy()]
    for _ in range(30):
        v = mu * v - lr * np.array([p[0] / 10, 2 * p[1]])
        p = p + v
        want.append(p)
    np.testing.assert_allclose(
        valley_path(spec, 30, backend="numba"), np.stack(want), **TOL[np.dtype(np.float64)]
    )


def test_valley_updates_run_through_the_kernels(monkeypatch):
    calls = []
    real = numba_backend.prepare

    def counting(rule, flags, writes, k, dtype, **kw):
        run = real(rule, flags, writes, k, dtype, **kw)

        def counted(param, grad, states, master=None, salt=0):
            calls.append((rule, param.shape))
            return run(param, grad, states, master, salt)

        return counted

    monkeypatch.setattr(numba_backend, "prepare", counting)
    spec = next(s for s in SPECS if s.name == "Adam")
    valley_path(spec, 5, backend="numba")
    # one fused launch per step, over the FlatBuffer's whole (padded) buffer
    assert [c[0] for c in calls] == ["adam"] * 5
    assert all(c[1][0] >= 2 for c in calls)


# -- the MLP ------------------------------------------------------------------------------------
def test_mlp_gradient_matches_finite_differences():
    rng = np.random.default_rng(7)
    X = rng.uniform(0, 1, (16, 64))
    y = rng.integers(0, 10, 16)
    params = init_mlp(seed=3, dtype=np.float64)
    for b in ("b1", "b2"):  # biases start at zero in training; make them count here
        params[b][...] = rng.normal(0, 0.1, params[b].shape)
    grads = {n: np.full_like(p, np.nan) for n, p in params.items()}
    loss = mlp_loss_and_grad(params, X, y, grads)
    assert float(loss) == pytest.approx(float(mlp_loss(params, X, y)), rel=1e-15)
    h = 1e-5
    for name, p in params.items():
        num = np.empty_like(p)
        flat, out = p.reshape(-1), num.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + h
            up = float(mlp_loss(params, X, y))
            flat[i] = old - h
            down = float(mlp_loss(params, X, y))
            flat[i] = old
            out[i] = (up - down) / (2 * h)
        ana = grads[name]
        err = np.linalg.norm(num - ana) / (np.linalg.norm(num) + np.linalg.norm(ana))
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
        assert np.abs(grads[name]).max() > 0


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from fastopt.demo.cli import load_data

    return load_data()


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_every_optimizer_lowers_the_training_loss(spec, digits):
    X_tr, y_tr = digits[0].astype(np.float32), digits[1]
    before = float(mlp_loss(init_mlp(seed=0), X_tr, y_tr))
    r = train_mlp(spec, digits, iters=60, batch=64, backend="numba", seed=0)
    assert r.losses.shape == (60,) and np.isfinite(r.losses).all()
    assert r.train_loss < 0.9 * before, f"{spec.name}: {before:.4f} -> {r.train_loss:.4f}"
    assert r.losses[-10:].mean() < r.losses[:10].mean()
    assert 0.1 < r.test_accuracy <= 1.0
    assert r.ms_per_step > 0 and r.ms_per_iter >= r.ms_per_step


def test_training_is_the_same_on_the_numpy_oracle(digits):
    # the MLP run through the kernels follows the oracle's run (float32, a few steps)
    spec = next(s for s in SPECS if s.name == "Adam")
    a = train_mlp(spec, digits, iters=10, batch=32, backend="numba")
    b = train_mlp(spec, digits, iters=10, batch=32, backend="numpy")
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-4)


# -- the command --------------------------------------------------------------------------------
def test_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    out = tmp_path / "figs"
    rc = cli.main(
        [
            "demo",
            "--out",
            str(out),
            "--steps",
            "4",
            "--valley-steps",
            "3",
            "--batch",
            "32",
            "--quick",
            "--backend",
            "numba",
        ]
    )
    assert rc == 0
    for name in ("valley_paths.png", "training_curves.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("| ")]
    shown = specs()  # every optimizer of the registry, chosen or searched settings
    assert len(rows) == 1 + len(shown) == 1 + len(optimizers.CLASSES)  # header + one per optimizer
    for spec in shown:
        assert any(r.startswith(f"| {spec.name} ") for r in rows)
    assert "[mlp]" in captured.err and "valley_paths.png" in captured.err


@pytest.mark.parametrize("module", ["matplotlib", "sklearn"])
def test_missing_extra_exits_2_with_the_install_line(module, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    out = tmp_path / "figs"
    assert cli.main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert 'pip install "fastopt[demo]"' in err
    assert {"matplotlib": "matplotlib", "sklearn": "scikit-learn"}[module] in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps"),
        (["--backend", "nonsense"], "unknown backend 'nonsense'"),
    ],
)
def test_bad_arguments_exit_2(argv, message, tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_import_fastopt_loads_no_demo_dependency():
    code = (
        "import sys, fastopt, fastopt.demo, fastopt.demo.plot; "
        "bad = [m for m in ('matplotlib', 'sklearn') if m in sys.modules]; "
        "sys.exit(f'imported at import time: {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the chapter's figure with fastopt.textbook -------------------------------------------------
def test_textbook_valley_path_is_the_chapter_script():
    from fastopt import textbook
    from fastopt.demo.problems import TEXTBOOK_VALLEY, textbook_valley_path

    path = textbook_valley_path("SGD", 30)
    lr = TEXTBOOK_VALLEY["SGD"]["lr"]
    t = np.arange(31)  # p -= lr·(x/10, 2y), written by hand
    want = np.stack(
        [VALLEY_START[0] * (1 - lr / 10) ** t, VALLEY_START[1] * (1 - 2 * lr) ** t], axis=1
    )
    np.testing.assert_allclose(path, want, rtol=0, atol=1e-12)
    assert set(TEXTBOOK_VALLEY) == set(textbook.__all__) - {"EPS"}


def test_demo_textbook_draws_the_chapters_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs"
    rc = cli.main(
        [
            "demo",
            "--textbook",
            "--out",
            str(out),
            "--valley-steps",
            "5",
            "--quick",
            "--backend",
            "numba",
        ]
    )
    assert rc == 0
    png = (out / "textbook_valley.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sorted(p.name for p in out.iterdir()) == ["textbook_valley.png"]  # no MLP figures
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("| ")]
    names = ("SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam")
    assert len(rows) == 1 + len(names)
    for name in names:
        assert any(r.startswith(f"| {name} ") for r in rows)
    assert "textbook_valley.png" in captured.err


def test_demo_textbook_needs_matplotlib_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # scikit-learn is not needed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["demo", "--textbook", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "missing: matplotlib" in err and "scikit-learn" not in err


def test_demo_textbook_refuses_the_numpy_backend(tmp_path, capsys):
    assert cli.main(["demo", "--textbook", "--out", str(tmp_path / "x"), "--backend", "numpy"]) == 2
    assert "torch.optim oracle" in capsys.readouterr().err


def test_every_registered_optimizer_is_in_the_demo(monkeypatch):
    """The demo's list is the registry: a new optimizer class shows up with settings searched
    on the valley (the lr that ends closest to the minimum) and its own default lr on the MLP,
    and gets a color of its own."""
    import fastopt
    from fastopt import optimizers
    from fastopt.demo import plot, problems

    class Shrink(fastopt.SGD):
        """A new optimizer nobody chose demo settings for."""

    registry = dict(optimizers.CLASSES, Shrink=Shrink)
    monkeypatch.setattr(optimizers, "CLASSES", registry)
    monkeypatch.setattr(optimizers, "Shrink", Shrink, raising=False)
    specs = problems.specs()
    assert [s.name for s in specs] == list(registry)
    auto = specs[-1]
    assert auto.source == "searched" and auto.mlp == {"lr": 1e-3}
    assert auto.valley["lr"] in problems.VALLEY_LRS
    # the searched lr is the best of the grid: none ends closer to the minimum
    end = problems.valley_path(auto, backend="numpy")[-1]
    for lr in problems.VALLEY_LRS:
        other = problems.valley_path(problems.Spec("Shrink", {"lr": lr}, {}), backend="numpy")[-1]
        assert np.hypot(*end) <= np.hypot(*other) or not np.isfinite(np.hypot(*other))
    assert len(set(plot.colors(len(specs)))) == len(specs)
