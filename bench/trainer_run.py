"""transformers' ``Trainer`` with ``fastopt.torch.AdamW`` against ``torch.optim.AdamW``: a tiny
GPT-2 built from its config (no download), random token batches, on the CPU.

Three runs of ``--steps`` steps with the same seed: torch.optim, fastopt, and fastopt stopped at
half way (a Trainer checkpoint: ``optimizer.pt`` written with ``torch.save``) and resumed with
``resume_from_checkpoint`` by a new Trainer. Prints the final losses, the largest parameter
difference of fastopt against torch, and of the resumed run against the uninterrupted one.

Needs ``pip install transformers accelerate`` (not a dependency of fastopt: about 150 MB).

    python bench/trainer_run.py [--steps 20] [--json PATH]
"""

import argparse
import json
import sys
import tempfile


def _data(n, vocab, length, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def _run(which, steps, out_dir, resume=None, stop_at=None):
    import torch
    import transformers as tf

    import fastopt.torch as fot

    tf.set_seed(0)
    cfg = tf.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = tf.GPT2LMHeadModel(cfg)
    kw = dict(lr=1e-3, weight_decay=0.01)
    opt = (
        fot.AdamW(model.parameters(), **kw)
        if which == "fastopt"
        else torch.optim.AdamW(model.parameters(), foreach=False, **kw)
    )
    args = tf.TrainingArguments(
        output_dir=out_dir,
        max_steps=stop_at or steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_steps=stop_at or steps,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    sched = tf.get_linear_schedule_with_warmup(opt, 0, steps)
    trainer = tf.Trainer(
        model=model, args=args, train_dataset=_data(256, 128, 32, 1), optimizers=(opt, sched)
    )
    if stop_at:  # the Trainer stops here; the linear schedule still runs to ``steps``
        trainer.args.max_steps = stop_at
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = [p.detach().clone() for p in model.parameters()]
    return losses, params, None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import glob

    with tempfile.TemporaryDirectory() as d:
        lt, pt, _ = _run("torch", a.steps, d + "/torch")
        lf, pf, _ = _run("fastopt", a.steps, d + "/fastopt")
        half = a.steps // 2
        _run("fastopt", a.steps, d + "/resumed", stop_at=half)
        (ckpt,) = glob.glob(d + f"/resumed/checkpoint-{half}")
        lr_, pr, _ = _run("fastopt", a.steps, d + "/resumed2", resume=ckpt)
    diff = max(float((x - y).abs().max()) for x, y in zip(pf, pt))
    rdiff = max(float((x - y).abs().max()) for x, y in zip(pr, pf))
    out = {
        "steps": a.steps,
        "final_loss": {"torch": lt[-1], "fastopt": lf[-1], "fastopt_resumed": lr_[-1]},
        "max_param_diff_fastopt_vs_torch": diff,
        "max_param_diff_resumed_vs_uninterrupted": rdiff,
    }
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if diff < 1e-5 and rdiff == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
