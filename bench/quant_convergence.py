"""Convergence of ``fastopt.torch`` with quantized state: a small transformer language model
(2 layers, d = 64, 4 heads, vocabulary 64, context 32) on a fixed synthetic sequence task,
trained for 500 steps on the CPU with float32, int8 and float8_e4m3 state, for Adam, AdamW,
Lion and SGD with momentum; the table gives the final loss on a fixed held-out batch and the
difference from the float32-state run.

The task: sequences of a fixed random second-order Markov chain over 64 tokens (the next token
depends on the previous one and on the class, mod 4, of the one before: 256 contexts, each
allowing 4 next tokens with random probabilities; the mean entropy of a context is the floor of
the loss). The same model initialisation, data and order for every run (seeded); every
parameter's state is quantized (no minimum tensor size: bitsandbytes keeps tensors under 4096
elements in float32 by default, here the biases and norms are quantized too).

    python bench/quant_convergence.py            # the table (500 steps)
    python bench/quant_convergence.py --steps 100 --optimizers Adam
    python bench/quant_convergence.py --int4 --optimizers Adam

``--int4``: float32 against int4 state (torchao's 4-bit maps and blocks of 128,
``kernels/quant.py``), a table of its own.

``tests/test_torch_quant.py::test_quantized_state_trains_a_transformer_like_float32`` runs it
under -m exhaustive and records the figures (every case within 1 % of float32 state, but SGD
with momentum in float8: +1.28 %, within the spread of its runs from seed to seed).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

import fastopt.torch as fot

VOCAB = 64
CONTEXT = 32
D = 64
HEADS = 4
LAYERS = 2
BATCH = 32
#: the previous-but-one token's classes the next token depends on
KEYS = 4
STEPS = 500
FORMATS = (None, "int8", "float8_e4m3")
#: the optimizers and their settings (lr picked from two or three float32 runs of 500 steps
#: each; the quantized runs use the same)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Adam": ("Adam", dict(lr=1e-2)),
    "AdamW": ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    "Lion": ("Lion", dict(lr=1e-3, weight_decay=0.1)),
    "SGD_momentum": ("SGD", dict(lr=1.0, momentum=0.9)),
}


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(D)
        self.attn = torch.nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(D)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(D, 4 * D), torch.nn.GELU(), torch.nn.Linear(4 * D, D)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class LM(torch.nn.Module):
    """A GPT-style decoder: token and position embeddings, pre-norm blocks, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, D)
        self.pos = torch.nn.Parameter(torch.randn(CONTEXT, D) * 0.02)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, VOCAB)
        mask = torch.triu(torch.full((CONTEXT, CONTEXT), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        x = self.tok(idx) + self.pos[:n]
        for b in self.blocks:
            x = b(x, self.mask[:n, :n])
        return self.head(self.ln(x))


def chain(seed: int = 1234) -> torch.Tensor:
    """The task's transition table ``[KEYS, VOCAB, VOCAB]``: P(next | prev2 mod KEYS, prev1),
    4 allowed next tokens per context (the previous-but-one token is read through attention)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(KEYS, VOCAB, VOCAB)
    nxt = torch.randint(0, VOCAB, (KEYS, VOCAB, 4), generator=g)
    w = torch.rand(KEYS, VOCAB, 4, generator=g) + 0.2
    probs.scatter_add_(2, nxt, w)
    return probs / probs.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` sequences of ``CONTEXT + 1`` tokens of the chain."""
    out = torch.empty(n, CONTEXT + 1, dtype=torch.long)
    out[:, :2] = torch.randint(0, VOCAB, (n, 2), generator=g)
    for t in range(2, CONTEXT + 1):
        p = probs[out[:, t - 2] % KEYS, out[:, t - 1]]
        out[:, t] = torch.multinomial(p, 1, generator=g)[:, 0]
    return out


_DATA: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def dataset(steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batches, held)``: ``steps`` training batches and the held-out batch (sampled once
    per (steps, seed): every run sees the same data in the same order)."""
    key = (steps, seed)
    if key not in _DATA:
        probs = chain()
        g = torch.Generator().manual_seed(seed + 1)
        batches = sample(probs, steps * BATCH, g).reshape(steps, BATCH, CONTEXT + 1)
        held = sample(probs, 256, torch.Generator().manual_seed(seed + 2))
        _DATA[key] = (batches, held)
    return _DATA[key]


def train(name: str, fmt: str | None, steps: int = STEPS, seed: int = 0) -> float:
    """The held-out loss after ``steps`` steps of optimizer ``name`` (``OPTIMIZERS``) with
    ``state_dtype=fmt``."""
    cls, kw = OPTIMIZERS[name]
    torch.manual_seed(seed)
    model = LM()
    opt = getattr(fot, cls)(model.parameters(), state_dtype=fmt, **kw)
    batches, held = dataset(steps, seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    for batch in batches:
        logits = model(batch[:, :-1])
        loss = loss_fn(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(held[:, :-1])
        return float(loss_fn(logits.reshape(-1, VOCAB), held[:, 1:].reshape(-1)))


def table_int4(names: list[str], steps: int = STEPS) -> dict[str, dict[str, float]]:
    """``{optimizer: {"float32": loss, "int4": loss}}``, printed as it goes."""
    out: dict[str, dict[str, float]] = {}
    print(f"{'optimizer':<14} {'float32':>9} {'int4':>19}   ({steps} steps)")
    for name in names:
        t0 = time.perf_counter()
        row = {"float32": train(name, None, steps), "int4": train(name, "int4", steps)}
        base = row["float32"]
        cells = f"{base:8.5f} {row['int4']:8.5f} ({100 * (row['int4'] / base - 1):+6.3f} %)"
        print(f"{name:<14} {cells}   [{time.perf_counter() - t0:.0f} s]", flush=True)
        out[name] = row
    return out


def table(names: list[str], steps: int = STEPS) -> dict[str, dict[str, float]]:
    """``{optimizer: {format: loss}}`` (format "float32" for float32 state), printed as it
    goes."""
    out: dict[str, dict[str, float]] = {}
    print(f"{'optimizer':<14} {'float32':>9} {'int8':>19} {'float8_e4m3':>19}   ({steps} steps)")
    for name in names:
        row = {}
        t0 = time.perf_counter()
        for fmt in FORMATS:
            row[fmt or "float32"] = train(name, fmt, steps)
        base = row["float32"]
        cells = [f"{base:8.5f}"] + [
            f"{row[f]:8.5f} ({100 * (row[f] / base - 1):+6.3f} %)" for f in ("int8", "float8_e4m3")
        ]
        print(f"{name:<14} {' '.join(cells)}   [{time.perf_counter() - t0:.0f} s]", flush=True)
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS))
    ap.add_argument("--int4", action="store_true", help="float32 against int4 state (core)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same figures on any machine (and no oversubscription)
    probs = chain()
    ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).mean()
    print(f"entropy floor of the task (mean over contexts): {float(ent):.4f} nats; "
          f"uniform: {math.log(VOCAB):.4f}")  # fmt: skip
    if args.int4:
        table_int4(args.optimizers, args.steps)
    else:
        table(args.optimizers, args.steps)


if __name__ == "__main__":
    main()
