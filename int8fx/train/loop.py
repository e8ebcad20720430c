"""One training run: build the model (FP32, or converted with the run's gradient policy), train it with
SGD and a warmup + cosine schedule, evaluate on held-out test images, and return its record.

Runs with the same seed start from the same weights and draw the same batches (see `build_models` and
`train_run`), so the only difference between the FP32 and an INT8 run of one seed is the arithmetic.
"""
from __future__ import annotations

import glob
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import fusing
from .data import Data, augment, fit_input
from .ends import end_layers, remove_end_batchnorm
from .progress import Progress
from .recipe import FP32, Recipe, RunSpec


def build_models(spec: RunSpec, recipe: Recipe, device="cpu"):
    """(model to train, ZooModel) for a run. The FP32 weights are drawn from `spec.seed` before
    conversion, so FP32 and INT8 runs with the same seed start from the same weights. `recipe.end_bn`
    and `recipe.fp32_ends` reshape the first and last layers (int8fx.train.ends)."""
    import int8fx
    from ..zoo import build_model

    torch.manual_seed(spec.seed)
    zm = build_model(recipe.model, width=recipe.width, size=recipe.size)
    model = zm.module
    example = torch.zeros(2, zm.channels, zm.size, zm.size)
    if not recipe.end_bn:
        remove_end_batchnorm(model, example)
    if spec.policy is not None:
        keep = tuple(glob.escape(n) for n in end_layers(model, example)) if recipe.fp32_ends else ()
        model = int8fx.convert(model, int8fx.Int8Config(grad_quant=spec.policy, seed=spec.seed, exclude=keep,
                                                        rounding=run_rounding(spec, recipe)))
    return model.to(device), zm


def run_rounding(spec: RunSpec, recipe: Recipe) -> str | None:
    """The gradient rounding of an INT8 run (its own, else the recipe's); None for FP32."""
    return None if spec.policy is None else spec.rounding or recipe.rounding


def lr_at(step: int, total: int, recipe: Recipe) -> float:
    """Linear warmup over `recipe.warmup` of the steps, then cosine decay to 0."""
    warm = max(1, int(round(recipe.warmup * total)))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, size: int = 28, channels: int = 1,
             batch_size: int = 1000) -> tuple[float, float]:
    """(top-1 accuracy in %, mean cross-entropy) of `model` in eval mode on (x, y)."""
    from ..zoo import logits

    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = fit_input(x[i:i + batch_size], size, channels), y[i:i + batch_size]
            out = logits(model(xb)).float()
            loss += F.cross_entropy(out, yb, reduction="sum").item()
            correct += (out.argmax(1) == yb).sum().item()
    finally:
        model.train(was)
    return 100.0 * correct / max(1, len(y)), loss / max(1, len(y))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(model: torch.nn.Module, shape: tuple, device: torch.device) -> float:
    """Compile the INT8 op's fused passes (int8fx.fusing) before the clock starts: training steps (as many
    as it takes a shape to get its exact-shape variants) and one eval forward of a copy of the model on
    random data of the training shape. The compiled code is shared
    by every model in the process and cached on disk, so this costs seconds once per machine, and the
    run's steps/s measures training, not compilation. The copy keeps the model and the random streams
    untouched. Returns the seconds spent."""
    t = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        twin = copy.deepcopy(model).train()
        x = torch.randn(shape, device=device)
        for _ in range(max(1, fusing.STATIC_AFTER)):
            out = twin(x)
            (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
        with torch.no_grad():
            twin.eval()(x)
    del twin
    _sync(device)
    return time.perf_counter() - t


def train_run(spec: RunSpec, recipe: Recipe, data: Data, device="cpu", progress: Progress | None = None) -> dict:
    """Train one run and return its record (the element of results.json "runs").

    Timing: `train_s` covers the optimizer steps only (steps/s is steps / train_s); evaluations are in
    `eval_s`. A non-finite loss stops the run; the record then says `diverged_at`.
    """
    from ..zoo import logits

    progress = progress or Progress()
    device = torch.device(device)
    model, zm = build_models(spec, recipe, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0,
                          weight_decay=recipe.weight_decay)
    stepper = opt
    if spec.dclrs:
        import int8fx

        stepper = int8fx.DeviationLRScaler(opt, model)
    n = len(data.train_y)
    bs = min(recipe.batch_size, n)
    per_epoch = n // bs  # drop the last partial batch: every step has the same batch size
    total = max(1, int(round(recipe.epochs * per_epoch)))
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    eval_at = sorted({max(1, round(total * (i + 1) / recipe.evals)) for i in range(recipe.evals)} | {total})
    g = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed + 1)  # dropout and other in-model randomness
    key = f"{spec.label} s{spec.seed}"
    hist = {"step": [], "epoch": [], "train_loss": [], "train_acc": [], "lr": []}
    evals = {"step": [], "epoch": [], "test_acc": [], "test_loss": [], "n_test": []}
    progress.start(key, total)
    train_s = eval_s = 0.0
    run_loss = run_correct = run_seen = 0.0
    diverged_at = None
    last_test = "-"
    order = torch.randperm(n, generator=g)
    pos = 0
    t_start = time.perf_counter()
    cpu0 = time.process_time()
    compile_s = _warm_up(model, (bs, zm.channels, zm.size, zm.size), device) if spec.policy is not None else 0.0
    if compile_s > 1:
        progress.message(key, f"INT8 passes compiled in {compile_s:.0f} s (torch.compile; cached on disk for later runs)")
    _sync(device)
    t0 = time.perf_counter()
    for step in range(total):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + bs].to(device)
        pos += bs
        xb = fit_input(augment(data.train_x[idx], recipe.augment, g), zm.size, zm.channels)
        yb = data.train_y[idx]
        lr = lr_at(step, total, recipe)
        for group in opt.param_groups:
            group["lr"] = lr
        out = logits(model(xb))
        loss = F.cross_entropy(out, yb, label_smoothing=recipe.label_smoothing)
        stepper.zero_grad(set_to_none=True)
        loss.backward()
        stepper.step()
        run_loss += loss.detach()
        run_correct += (out.detach().argmax(1) == yb).sum()
        run_seen += len(yb)
        done = step + 1
        if done % recipe.log_every == 0 or done == total:
            k = run_seen / bs
            mean_loss = float(run_loss) / k
            hist["step"].append(done)
            hist["epoch"].append(done / per_epoch)
            hist["train_loss"].append(mean_loss)
            hist["train_acc"].append(100.0 * float(run_correct) / run_seen)
            hist["lr"].append(lr)
            run_loss = run_correct = run_seen = 0.0
            if not math.isfinite(mean_loss):
                diverged_at = done
            progress.update(key, done, {"loss": f"{mean_loss:.3f}", "acc": f"{hist['train_acc'][-1]:.1f}",
                                        "test": last_test})
        if done in eval_at or diverged_at:
            _sync(device)
            t1 = time.perf_counter()
            train_s += t1 - t0
            final = done == total or diverged_at is not None
            lim = None if final else recipe.eval_subset
            acc, tloss = evaluate(model, data.test_x[:lim], data.test_y[:lim], zm.size, zm.channels)
            last_test = f"{acc:.1f}"
            evals["step"].append(done)
            evals["epoch"].append(done / per_epoch)
            evals["test_acc"].append(acc)
            evals["test_loss"].append(tloss)
            evals["n_test"].append(len(data.test_y[:lim]))
            progress.message(key, f"epoch {done / per_epoch:.2f}: test top-1 {acc:.2f}% loss {tloss:.4f} "
                                  f"(on {evals['n_test'][-1]} test images)")
            logged = ({"loss": f"{hist['train_loss'][-1]:.3f}", "acc": f"{hist['train_acc'][-1]:.1f}"}
                      if hist["step"] else {})  # an eval may come before the first log
            progress.update(key, done, {**logged, "test": f"{acc:.1f}"})
            _sync(device)
            t0 = time.perf_counter()
            eval_s += t0 - t1
            if diverged_at:
                break
    steps = hist["step"][-1] if hist["step"] else 0
    rec = {
        "label": spec.label, "policy": spec.policy or FP32, "int8": spec.policy is not None, "dclrs": spec.dclrs,
        "rounding": run_rounding(spec, recipe),
        "seed": spec.seed, "model": zm.name, "input": [zm.channels, zm.size, zm.size],
        "params": sum(p.numel() for p in params),
        "top1": evals["test_acc"][-1], "test_loss": evals["test_loss"][-1],
        "final_train_loss": hist["train_loss"][-1], "steps": steps, "epochs": steps / per_epoch,
        "train_s": train_s, "eval_s": eval_s, "compile_s": compile_s, "wall_s": time.perf_counter() - t_start,
        "cpu_s": time.process_time() - cpu0, "threads": torch.get_num_threads(),
        "steps_per_s": steps / train_s if train_s > 0 else float("nan"),
        "diverged_at": diverged_at, "history": hist, "evals": evals,
    }
    progress.finish(key, f"top-1 {rec['top1']:.2f}%  train loss {rec['final_train_loss']:.4f}  "
                         f"{rec['train_s']:.0f}s train, {rec['steps_per_s']:.2f} steps/s"
                    + (f"  DIVERGED at step {diverged_at}" if diverged_at else ""))
    return rec
