"""``fastopt.torch`` on CUDA tensors against ``torch.optim`` on the same GPU (``-m gpu``)."""

import pytest
from gpu_common import needs_gpu

pytestmark = needs_gpu
torch = pytest.importorskip("torch")


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad"])
def test_training_matches_torch_on_cuda(name):
    _cuda()
    import fastopt.torch as fot

    out = []
    for which in ("fastopt", "torch"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
        ).cuda()
        kw = {"lr": 1e-2, **({"momentum": 0.9} if name == "SGD" else {})}
        opt = (
            getattr(fot, name)(model.parameters(), **kw)
            if which == "fastopt"
            else getattr(torch.optim, name)(model.parameters(), **kw, foreach=False)
        )
        x, y = torch.randn(128, 32, device="cuda"), torch.randn(128, 8, device="cuda")
        for _ in range(20):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        out.append([p.detach() for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_gradscaler_cuda_skips_inf_step():
    _cuda()
    import fastopt.torch as fot

    results = []
    for which in ("fastopt", "torch"):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4).cuda()
        opt = (fot.Adam if which == "fastopt" else torch.optim.Adam)(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
        x, y = torch.randn(32, 16, device="cuda"), torch.randn(32, 4, device="cuda")
        for t in range(6):
            opt.zero_grad()
            scaler.scale(((model(x) - y) ** 2).mean()).backward()
            if t == 2:
                model.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        results.append(([p.detach() for p in model.parameters()], scaler.get_scale()))
    (pa, sa), (pb, sb) = results
    assert sa == sb
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
