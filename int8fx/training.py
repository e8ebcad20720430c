"""Train a CNN on Fashion-MNIST in FP32 and in INT8 with each gradient policy, side by side.

Every run of one invocation shares the recipe (model, data subset, schedule, augmentation); runs with
the same seed also share the initial weights and the order of the batches, so the only difference
between `fp32` and `gvq-mcs` at seed 0 is the INT8 arithmetic. The command writes to its output folder:

    results.json   the recipe, the machine, every run with its curves, and the per-policy summary
    results.md     the tables printed at the end (per run, and mean +- std over seeds)
    accuracy.png   test top-1 against epochs, one line per policy (band: min..max over seeds)
    loss.png       training loss against epochs
    curves.png     both side by side

Presets: `--quick` (the README command, a few minutes on a 2-core CPU: a 20k-image subset, 2 epochs,
scored on the full 10k test set) and `--full` (FP32 + gvq-mcs, dsgc, per-tensor x 3 seeds on all 60k
images; sized to finish in about 90 minutes on a 2-core CPU with `--jobs 2`). Any option overrides the
preset. Library use: `run_experiment(recipe, runs, seeds)` returns the same dict as results.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

FP32 = "fp32"
DCLRS_SUFFIX = "+dclrs"


# ---------------------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a run except the policy and the seed.

    train_subset: number of training images (a fixed, class-balanced selection shared by all runs and
        seeds), None for all 60,000. test_subset: likewise for the 10,000 test images (None: all; only
        for smoke tests, reported numbers use the full test set). evals: test evaluations per run,
        evenly spaced, the last at the end; eval_subset limits the intermediate ones (the final one
        always uses the whole test set) to keep the curves cheap.
    """

    model: str = "smallcnn"
    width: float | None = 16
    size: int | None = None
    epochs: float = 2
    train_subset: int | None = 20_000
    test_subset: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.05  # fraction of the steps with a linear LR ramp, then cosine to 0
    label_smoothing: float = 0.0
    augment: str = "flip"  # "none" | "flip" | "flip+crop"
    evals: int = 5
    eval_subset: int | None = 2_000
    log_every: int = 10
    max_steps: int | None = None  # cap on optimizer steps (smoke tests); the schedule spans the cap
    rounding: str = "stochastic"  # Int8Config.rounding of the INT8 runs' gradients

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # fp32 + 2 INT8 policies, two runs at a time with one thread each (see run_experiment for why)
    "quick": dict(recipe=Recipe(), runs=(FP32, "gvq-mcs", "per-tensor"), seeds=(0,), jobs=2),
    # 12 runs; sized from measured step times (benchmarks/RESULTS.md, section train)
    "full": dict(recipe=Recipe(epochs=5, train_subset=None, evals=5, eval_subset=None),
                 runs=(FP32, "gvq-mcs", "dsgc", "per-tensor"), seeds=(0, 1, 2), jobs=2),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run: `policy` None is FP32; otherwise a registered gradient quantizer name."""

    policy: str | None
    seed: int = 0
    dclrs: bool = False

    @property
    def label(self) -> str:
        return FP32 if self.policy is None else self.policy + (DCLRS_SUFFIX if self.dclrs else "")


def parse_runs(items, dclrs: bool = False) -> list[tuple[str | None, bool]]:
    """'fp32,gvq-mcs,dsgc+dclrs' (or a list) -> [(policy or None, dclrs)], validated against the
    registered gradient quantizers; `dclrs` adds DCLRS to every INT8 run."""
    from .quant import grad_quantizer_names

    if isinstance(items, str):
        items = [s for s in items.replace(" ", "").split(",") if s]
    names = grad_quantizer_names()
    out: list[tuple[str | None, bool]] = []
    for item in items:
        base, plus = (item[: -len(DCLRS_SUFFIX)], True) if item.endswith(DCLRS_SUFFIX) else (item, False)
        if base.lower() == FP32:
            if plus:
                raise ValueError("DCLRS scales INT8 layers' learning rates; 'fp32+dclrs' means nothing")
            out.append((None, False))
            continue
        if base not in names:
            raise ValueError(f"unknown run {item!r}: use 'fp32' or a gradient quantizer ({', '.join(names)}), "
                             f"optionally with '{DCLRS_SUFFIX}'")
        if (plus or dclrs) and not dclrs_available():
            raise ValueError("DCLRS is not available in this int8fx (no int8fx.DeviationLRScaler)")
        out.append((base, plus or dclrs))
    if not out:
        raise ValueError("no runs given")
    return list(dict.fromkeys(out))


def dclrs_available() -> bool:
    import int8fx

    return hasattr(int8fx, "DeviationLRScaler")


def preset_runs(preset: str) -> tuple[str, ...]:
    """The preset's runs that this int8fx has registered (a policy still in development is skipped)."""
    from .quant import grad_quantizer_names

    names = grad_quantizer_names()
    return tuple(r for r in PRESETS[preset]["runs"] if r == FP32 or r in names)


# ------------------------------------------------------------------------------------------ data


@dataclass
class Data:
    """Fashion-MNIST as normalised float tensors [N, 1, 28, 28] on the training device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str = "fashion-mnist"


def balanced_subset(labels: torch.Tensor, n: int | None, seed: int = 1234) -> torch.Tensor:
    """Indices of n samples with (nearly) equal counts per class, the same for every run and seed."""
    if n is None or n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    classes = labels.unique()
    per = [perm[labels[perm] == c] for c in classes]
    take = [p[: n // len(classes) + (1 if i < n % len(classes) else 0)] for i, p in enumerate(per)]
    return torch.cat(take).sort().values


def load_data(recipe: Recipe, path=None, device="cpu") -> Data:
    from .data import load_fashion_mnist, normalize_images

    tx, ty = load_fashion_mnist("train", path)
    vx, vy = load_fashion_mnist("test", path)
    ti = balanced_subset(ty, recipe.train_subset)
    vi = balanced_subset(vy, recipe.test_subset)
    dev = torch.device(device)
    return Data(normalize_images(tx[ti]).to(dev), ty[ti].to(dev), normalize_images(vx[vi]).to(dev), vy[vi].to(dev))


def _fit_input(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resize/replicate a [B, 1, 28, 28] batch to what the model wants (torchvision models)."""
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, channels, -1, -1) if channels != x.shape[1] else x


def augment(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """Per-sample random horizontal flip and, for 'flip+crop', a random shift of up to 2 pixels (zero
    padding then a 28x28 crop), drawn from `g` so that runs with the same seed see the same batches."""
    if kind == "none":
        return x
    b, _, h, w = x.shape
    flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if kind == "flip+crop":
        p = 2
        xp = F.pad(x, (p, p, p, p))  # zeros (background after normalisation is negative: fine)
        oy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        rows = (oy.view(-1, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (ox.view(-1, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        ci = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        x = xp[bi, ci, rows, cols]
    elif kind != "flip":
        raise ValueError(f"augment must be 'none', 'flip' or 'flip+crop', got {kind!r}")
    return x


# ------------------------------------------------------------------------------------- progress


class Progress:
    """Receives a run's events; the base class is silent (tests, library use)."""

    def start(self, key: str, total: int) -> None: ...
    def update(self, key: str, step: int, info: dict) -> None: ...
    def message(self, key: str, text: str) -> None: ...
    def finish(self, key: str, text: str) -> None: ...


class TqdmProgress(Progress):
    """One tqdm bar per run (at most `slots` at a time, for parallel runs); lines for evals and ends."""

    def __init__(self, slots: int = 1, file=None) -> None:
        from tqdm.auto import tqdm

        self._tqdm, self.file = tqdm, file or sys.stderr
        self.bars: dict[str, object] = {}
        self.slots = slots
        self.free = list(range(slots))
        self.slot: dict[str, int] = {}
        tty = hasattr(self.file, "isatty") and self.file.isatty()
        self.mininterval = 0.5 if tty else 30.0  # keep nohup logs short

    def start(self, key, total):
        pos = self.free.pop(0) if self.free else len(self.slot)
        self.slot[key] = pos
        self.bars[key] = self._tqdm(total=total, desc=key, position=pos, leave=self.slots == 1,
                                    dynamic_ncols=True, mininterval=self.mininterval, file=self.file, unit="step")

    def update(self, key, step, info):
        bar = self.bars.get(key)
        if bar is not None:
            bar.set_postfix(info, refresh=False)
            bar.update(step - bar.n)

    def message(self, key, text):
        self._tqdm.write(f"{key}: {text}", file=self.file)

    def finish(self, key, text):
        bar = self.bars.pop(key, None)
        if bar is not None:
            bar.close()
        self.free.append(self.slot.pop(key, 0))
        self.free.sort()
        self._tqdm.write(f"{key}: {text}", file=self.file)


class LineProgress(Progress):
    """Plain lines for logs (nohup, CI): every eval, every `every` of the steps, and each run's end."""

    def __init__(self, file=None, every: float = 0.1) -> None:
        self.file, self.every = file or sys.stderr, every
        self.total: dict[str, int] = {}
        self.next: dict[str, int] = {}
        self.t0: dict[str, float] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def start(self, key, total):
        self.total[key], self.next[key], self.t0[key] = total, max(1, int(total * self.every)), time.perf_counter()
        self._print(f"{key}: start, {total} steps")

    def update(self, key, step, info):
        if step >= self.next.get(key, 0):
            dt = time.perf_counter() - self.t0[key]
            self.next[key] = step + max(1, int(self.total[key] * self.every))
            self._print(f"{key}: step {step}/{self.total[key]} ({step / dt:.2f} steps/s) "
                        + " ".join(f"{k} {v}" for k, v in info.items()))

    def message(self, key, text):
        self._print(f"{key}: {text}")

    def finish(self, key, text):
        self._print(f"{key}: {text}")


class _QueueProgress(Progress):
    """Forwards events from a worker process to the parent's TqdmProgress."""

    def __init__(self, queue) -> None:
        self.q = queue

    def start(self, key, total):
        self.q.put(("start", key, total))

    def update(self, key, step, info):
        self.q.put(("update", key, step, info))

    def message(self, key, text):
        self.q.put(("message", key, text))

    def finish(self, key, text):
        self.q.put(("finish", key, text))


# ------------------------------------------------------------------------------------- training


def build_models(spec: RunSpec, recipe: Recipe, device="cpu"):
    """(model to train, ZooModel) for a run. The FP32 weights are drawn from `spec.seed` before
    conversion, so FP32 and INT8 runs with the same seed start from the same weights."""
    import int8fx
    from .zoo import build_model

    torch.manual_seed(spec.seed)
    zm = build_model(recipe.model, width=recipe.width, size=recipe.size)
    model = zm.module
    if spec.policy is not None:
        model = int8fx.convert(model, int8fx.Int8Config(grad_quant=spec.policy, seed=spec.seed, rounding=recipe.rounding))
    return model.to(device), zm


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
    from .zoo import logits

    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = _fit_input(x[i:i + batch_size], size, channels), y[i:i + batch_size]
            out = logits(model(xb)).float()
            loss += F.cross_entropy(out, yb, reduction="sum").item()
            correct += (out.argmax(1) == yb).sum().item()
    finally:
        model.train(was)
    return 100.0 * correct / max(1, len(y)), loss / max(1, len(y))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(spec: RunSpec, recipe: Recipe, data: Data, device="cpu", progress: Progress | None = None) -> dict:
    """Train one run and return its record (the element of results.json "runs").

    Timing: `train_s` covers the optimizer steps only (steps/s is steps / train_s); evaluations are in
    `eval_s`. A non-finite loss stops the run; the record then says `diverged_at`.
    """
    from .zoo import logits

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
    _sync(device)
    t0 = time.perf_counter()
    for step in range(total):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + bs].to(device)
        pos += bs
        xb = _fit_input(augment(data.train_x[idx], recipe.augment, g), zm.size, zm.channels)
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
            progress.update(key, done, {"loss": f"{hist['train_loss'][-1]:.3f}", "acc": f"{hist['train_acc'][-1]:.1f}",
                                        "test": f"{acc:.1f}"})
            _sync(device)
            t0 = time.perf_counter()
            eval_s += t0 - t1
            if diverged_at:
                break
    steps = hist["step"][-1] if hist["step"] else 0
    rec = {
        "label": spec.label, "policy": spec.policy or FP32, "int8": spec.policy is not None, "dclrs": spec.dclrs,
        "seed": spec.seed, "model": zm.name, "input": [zm.channels, zm.size, zm.size],
        "params": sum(p.numel() for p in params),
        "top1": evals["test_acc"][-1], "test_loss": evals["test_loss"][-1],
        "final_train_loss": hist["train_loss"][-1], "steps": steps, "epochs": steps / per_epoch,
        "train_s": train_s, "eval_s": eval_s, "wall_s": time.perf_counter() - t_start,
        "cpu_s": time.process_time() - cpu0, "threads": torch.get_num_threads(),
        "steps_per_s": steps / train_s if train_s > 0 else float("nan"),
        "diverged_at": diverged_at, "history": hist, "evals": evals,
    }
    progress.finish(key, f"top-1 {rec['top1']:.2f}%  train loss {rec['final_train_loss']:.4f}  "
                         f"{rec['train_s']:.0f}s train, {rec['steps_per_s']:.2f} steps/s"
                    + (f"  DIVERGED at step {diverged_at}" if diverged_at else ""))
    return rec


# ------------------------------------------------------------------------------------ experiment

_WORKER_DATA: dict = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(spec: RunSpec, recipe: Recipe, device: str, data_path, queue) -> dict:
    key = (recipe.train_subset, recipe.test_subset, str(data_path), device)
    if key not in _WORKER_DATA:
        _WORKER_DATA.clear()
        _WORKER_DATA[key] = load_data(recipe, data_path, device)
    return train_run(spec, recipe, _WORKER_DATA[key], device, _QueueProgress(queue) if queue is not None else None)


def run_experiment(recipe: Recipe, runs=(FP32, "per-tensor"), seeds=(0,), device="cpu", data_path=None,
                   jobs: int = 1, threads: int | None = None, dclrs: bool = False,
                   progress: Progress | None = None, data: Data | None = None) -> dict:
    """Train every (run, seed) pair and return {"recipe", "machine", "runs", "summary"}.

    jobs > 1 trains that many runs at once in worker processes with `threads` (default: cores // jobs)
    threads each. Why both presets do that on a CPU: a small CNN's INT8 step is hundreds of small
    memory-bound ops, and two threads on one run barely beat one; on a shared machine they are much
    worse, since every op waits for both threads (measured on 2 cores at load ~5: a smallcnn gvq-mcs step
    took 0.33 CPU-s on one thread and 2.3-4.5 s wall on two). Runs are ordered seed-major (all policies
    of seed 0 first), so a partial experiment is still a like-for-like comparison.
    """
    parsed = parse_runs(runs, dclrs)
    specs = [RunSpec(p, s, d) for s in seeds for p, d in parsed]
    dev = torch.device(device)
    if dev.type == "cuda":
        jobs = 1
    jobs = max(1, min(jobs, len(specs)))
    records: list[dict] = []
    git, started = _git_state(), _dt.datetime.now().astimezone().isoformat(timespec="seconds")  # the code that runs
    t0 = time.perf_counter()
    if jobs == 1:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            data = data or load_data(recipe, data_path, dev)
            for spec in specs:
                records.append(train_run(spec, recipe, data, dev, progress))
        finally:
            torch.set_num_threads(before)
    else:
        records = _run_parallel(specs, recipe, str(dev), data_path, jobs,
                                threads or max(1, (os.cpu_count() or 1) // jobs), progress)
    return {
        "int8fx_version": _version(), "git": git, "date": started,
        "machine": machine_info(dev), "device": str(dev), "jobs": jobs, "recipe": recipe.to_dict(),
        "experiment_s": time.perf_counter() - t0, "runs": records, "summary": summarize(records),
    }


def _run_parallel(specs, recipe, device, data_path, jobs, threads, progress):
    import multiprocessing as mp
    import queue as _queue
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")  # fork after torch's thread pools have started can deadlock
    with ctx.Manager() as manager:
        q = manager.Queue() if progress is not None else None
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as ex:
            futures = [ex.submit(_worker, s, recipe, device, data_path, q) for s in specs]
            while True:
                pending = [f for f in futures if not f.done()]
                if q is not None:
                    try:
                        while True:
                            ev = q.get(timeout=0.2)
                            getattr(progress, ev[0])(*ev[1:])
                    except _queue.Empty:
                        pass
                elif pending:
                    time.sleep(0.2)
                if not pending:
                    break
            if q is not None:  # drain the last events
                while not q.empty():
                    ev = q.get()
                    getattr(progress, ev[0])(*ev[1:])
            return [f.result() for f in futures]


def _git_state() -> dict:
    """The commit of the int8fx checkout that ran (and whether it had local changes), if it is one."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    if head.returncode:
        return {}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _version() -> str:
    try:
        import int8fx

        return int8fx.__version__
    except Exception:  # pragma: no cover
        return "?"


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": _cpu_name()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["loadavg_at_end"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def summarize(records: list[dict]) -> list[dict]:
    """One row per run label: mean, std (sample), min and max of top-1 over seeds, and the gap to FP32."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["label"], []).append(r)
    rows = []
    for label, rs in by.items():
        acc = torch.tensor([r["top1"] for r in rs], dtype=torch.float64)
        rows.append({
            "label": label, "seeds": [r["seed"] for r in rs], "n": len(rs),
            "top1_mean": acc.mean().item(), "top1_std": acc.std().item() if len(rs) > 1 else 0.0,
            "top1_min": acc.min().item(), "top1_max": acc.max().item(),
            "final_train_loss_mean": sum(r["final_train_loss"] for r in rs) / len(rs),
            "test_loss_mean": sum(r["test_loss"] for r in rs) / len(rs),
            "train_s_mean": sum(r["train_s"] for r in rs) / len(rs),
            "steps_per_s_mean": sum(r["steps_per_s"] for r in rs) / len(rs),
            "diverged": sum(r["diverged_at"] is not None for r in rs),
        })
    fp = next((r for r in rows if r["label"] == FP32), None)
    for r in rows:
        r["delta_vs_fp32"] = r["top1_mean"] - fp["top1_mean"] if fp else None
    return rows


# ---------------------------------------------------------------------------------------- output


def tables_markdown(results: dict) -> str:
    """The per-run table and, with several seeds, the per-policy summary, as Markdown."""
    lines = ["| run | seed | top-1 (%) | test loss | final train loss | train time (s) | steps/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        flag = f" (diverged at {r['diverged_at']})" if r["diverged_at"] else ""
        lines.append(f"| {r['label']}{flag} | {r['seed']} | {r['top1']:.2f} | {r['test_loss']:.4f} | "
                     f"{r['final_train_loss']:.4f} | {r['train_s']:.0f} | {r['steps_per_s']:.2f} |")
    out = "\n".join(lines)
    if any(s["n"] > 1 for s in results["summary"]):
        lines = ["| run | seeds | top-1 mean ± std (%) | min..max | vs FP32 (points) | train time (s) | steps/s |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for s in results["summary"]:
            d = "" if s["delta_vs_fp32"] is None or s["label"] == FP32 else f"{s['delta_vs_fp32']:+.2f}"
            lines.append(f"| {s['label']} | {s['n']} | {s['top1_mean']:.2f} ± {s['top1_std']:.2f} | "
                         f"{s['top1_min']:.2f}..{s['top1_max']:.2f} | {d} | {s['train_s_mean']:.0f} | "
                         f"{s['steps_per_s_mean']:.2f} |")
        out += "\n\n" + "\n".join(lines)
    return out


def print_tables(results: dict, file=None) -> None:
    """Print the tables with rich (plain Markdown when rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(tables_markdown(results), file=file)
        return
    console = Console(file=file, width=max(100, Console().width))
    t = Table(title="int8fx train: per run")
    for c in ("run", "seed", "top-1 %", "test loss", "final train loss", "train s", "steps/s"):
        t.add_column(c, justify="left" if c == "run" else "right")
    for r in results["runs"]:
        t.add_row(r["label"] + (" (diverged)" if r["diverged_at"] else ""), str(r["seed"]), f"{r['top1']:.2f}",
                  f"{r['test_loss']:.4f}", f"{r['final_train_loss']:.4f}", f"{r['train_s']:.0f}",
                  f"{r['steps_per_s']:.2f}")
    console.print(t)
    if any(s["n"] > 1 for s in results["summary"]):
        t = Table(title="mean over seeds")
        for c in ("run", "seeds", "top-1 mean ± std", "min..max", "vs FP32", "train s", "steps/s"):
            t.add_column(c, justify="left" if c == "run" else "right")
        for s in results["summary"]:
            d = "" if s["delta_vs_fp32"] is None or s["label"] == FP32 else f"{s['delta_vs_fp32']:+.2f}"
            t.add_row(s["label"], str(s["n"]), f"{s['top1_mean']:.2f} ± {s['top1_std']:.2f}",
                      f"{s['top1_min']:.2f}..{s['top1_max']:.2f}", d, f"{s['train_s_mean']:.0f}",
                      f"{s['steps_per_s_mean']:.2f}")
        console.print(t)


def _curves(results: dict, series: str, key: str):
    """{label: (x, mean, min, max)} over seeds for a history ('history' or 'evals') field."""
    by: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by.setdefault(r["label"], []).append(r[series])
    out = {}
    for label, hs in by.items():
        n = min(len(h[key]) for h in hs)
        if n == 0:
            continue
        v = torch.tensor([h[key][:n] for h in hs], dtype=torch.float64)
        out[label] = (hs[0]["epoch"][:n], v.mean(0).tolist(), v.min(0).values.tolist(), v.max(0).values.tolist())
    return out


def write_plots(results: dict, out: Path) -> list[Path]:
    """accuracy.png, loss.png and curves.png (both) in `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    title = f"{results['recipe']['model']} on Fashion-MNIST"
    seeds = max(s["n"] for s in results["summary"])
    if seeds > 1:
        title += f" (mean of {seeds} seeds, band min..max)"

    def draw(ax, kind):
        if kind == "acc":
            curves = _curves(results, "evals", "test_acc")
            ax.set_ylabel("test top-1 (%)")
            lo = min((min(c[2]) for c in curves.values()), default=0)
            ax.set_ylim(max(lo - 2, 0), 100 if lo < 80 else min(100, max(max(c[3]) for c in curves.values()) + 1))
        else:
            curves = _curves(results, "history", "train_loss")
            ax.set_ylabel("training loss")
            ax.set_yscale("log")
        for label, (x, m, lo_, hi) in curves.items():
            style = "-" if label == FP32 else "--"
            line, = ax.plot(x, m, style, label=label, marker="o" if kind == "acc" else None, markersize=3)
            if seeds > 1:
                ax.fill_between(x, lo_, hi, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    paths = []
    for name, kinds in (("accuracy.png", ("acc",)), ("loss.png", ("loss",)), ("curves.png", ("loss", "acc"))):
        fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds) + 0.5, 3.6), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            draw(ax, kind)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def write_outputs(results: dict, out) -> dict[str, Path]:
    """results.json, results.md and the PNGs; returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    r, m = results["recipe"], results["machine"]
    cap = f" (capped at {r['max_steps']} steps)" if r["max_steps"] else ""
    head = (f"# int8fx train: {r['model']} on Fashion-MNIST\n\n{results['date']}, device {results['device']}, "
            f"{m.get('processor', '')}, {m.get('cpu_count')} cores, {results['jobs']} run(s) at a time; "
            f"{r['epochs']:g} epochs{cap} on {r['train_subset'] or 60000} training images, top-1 on "
            f"{r['test_subset'] or 10000} test images.\n")
    if results.get("command"):
        head += f"\nCommand: `{results['command']}`\n"
    paths["table"].write_text(head + "\n" + tables_markdown(results) + "\n")
    for p in write_plots(results, out):
        paths[p.stem] = p
    return paths


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="the README run: fp32 + 2 INT8 policies, 20k images, 2 epochs (default)")
    g.add_argument("--full", dest="preset", action="store_const", const="full",
                   help="fp32 + gvq-mcs, dsgc, per-tensor x 3 seeds on all 60k images (about 90 min on 2 cores)")
    p.add_argument("--runs", help="comma list: 'fp32' and/or gradient policies, e.g. fp32,gvq-mcs,dsgc"
                                  + (f"; append '{DCLRS_SUFFIX}' for DCLRS" if dclrs_available() else ""))
    p.add_argument("--seeds", help="comma list of seeds, e.g. 0,1,2")
    p.add_argument("--model", help="resnet20 | mobilenetv2 | smallcnn | any torchvision classification model")
    p.add_argument("--width", type=float, help="channel width of int8fx's models (ResNet/CNN base, MobileNet multiplier)")
    p.add_argument("--size", type=int, help="input resolution (default: 28, or what a torchvision model needs)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--train-subset", type=int, help="train on this many images (balanced); 0 = all 60,000")
    p.add_argument("--test-subset", type=int, help="score on this many test images; 0 = all 10,000 (default)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (SGD, Nesterov momentum 0.9, warmup + cosine)")
    p.add_argument("--augment", choices=("none", "flip", "flip+crop"))
    p.add_argument("--evals", type=int, help="test evaluations per run (curve points)")
    p.add_argument("--rounding", choices=("stochastic", "nearest"), help="gradient rounding of the INT8 runs "
                                                                        "(default: stochastic, as Int8Config)")
    p.add_argument("--max-steps", type=int, help="stop each run after this many steps (smoke tests)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, or auto (cuda when available)")
    p.add_argument("--data", help="folder with the Fashion-MNIST IDX files (default: $INT8FX_DATA, then "
                                  "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", help="output folder (default: runs/<timestamp>)")
    p.add_argument("--jobs", type=int, help="runs trained at once on CPU, in worker processes (full preset: 2)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                   help="tqdm bars, plain log lines, or nothing (auto: bars on a terminal, else lines)")
    if dclrs_available():
        p.add_argument("--dclrs", action="store_true", help="add deviation-counteractive LR scaling to INT8 runs")
    p.set_defaults(preset="quick")


def recipe_from_args(args) -> tuple[Recipe, tuple, tuple, int]:
    """(recipe, runs, seeds, jobs) from the preset with the command-line overrides applied."""
    preset = PRESETS[args.preset]
    changes = {}
    for name in ("model", "width", "size", "epochs", "batch_size", "lr", "augment", "evals", "max_steps", "rounding"):
        v = getattr(args, name, None)
        if v is not None:
            changes[name] = v
    if args.model is not None and args.width is None and args.model != preset["recipe"].model:
        changes["width"] = None  # the preset's width belongs to its own model
    for name in ("train_subset", "test_subset"):
        v = getattr(args, name, None)
        if v is not None:
            changes[name] = v or None
    recipe = dataclasses.replace(preset["recipe"], **changes)
    runs = tuple(args.runs.split(",")) if args.runs else preset_runs(args.preset)
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip()) if args.seeds else preset["seeds"]
    jobs = args.jobs if args.jobs is not None else preset["jobs"]
    return recipe, runs, seeds, jobs


def run(args) -> int:
    try:
        recipe, runs, seeds, jobs = recipe_from_args(args)
        parse_runs(runs, getattr(args, "dclrs", False))
    except ValueError as e:
        print(f"int8fx train: {e}", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("int8fx train: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    from .data import DataNotFound, find_fashion_mnist

    try:
        find_fashion_mnist(args.data)
    except DataNotFound as e:
        print(f"int8fx train: {e}", file=sys.stderr)
        return 2
    print(f"int8fx train ({args.preset}): {recipe.model} on Fashion-MNIST, runs {', '.join(runs)}, seeds "
          f"{', '.join(map(str, seeds))}, {recipe.epochs:g} epochs on {recipe.train_subset or 60000} images, "
          f"device {device}, {jobs} job(s); writing to {out}", file=sys.stderr)
    mode = args.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "lines"
    progress = {"bar": lambda: TqdmProgress(slots=jobs), "lines": LineProgress, "none": lambda: None}[mode]()
    results = run_experiment(recipe, runs, seeds, device, args.data, jobs, args.threads,
                             getattr(args, "dclrs", False), progress)
    results["command"] = "int8fx train " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train"] else " ".join(sys.argv)
    paths = write_outputs(results, out)
    print_tables(results)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
