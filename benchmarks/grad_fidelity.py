"""Gradient fidelity of every gradient quantizer policy, per layer, on real data.

For each model, an FP32 copy trains with SGD on real Fashion-MNIST batches (after `--warmup` steps, so
that the measurement is not of a random init). Before each of its next `--steps` steps, every
INT8 copy (one per policy) receives the FP32 weights and runs forward/backward on the same batch (same
dropout masks); the weight gradient dW and the input gradient dX of every conv/linear layer are compared,
by cosine similarity and relative L2 error ||g8 - g|| / ||g||, with two references:
  * "fp32": the FP32 model. End to end: what INT8 training gets instead of the FP32 gradient. It includes
    the forward's quantization error, which is the same for every policy and grows with depth.
  * "exact": the exact backward of the very same INT8 forward (see ExactBackward). Only the gradient
    quantizer differs, so this is the comparison between policies.
Quantizer state (MCS running clips, DSGC ratios) carries over from step to step as in training.

Also timed: each policy's forward+backward per step (best of the steps, so other processes on the
machine disturb it least), as a ratio to per-tensor in the same run. `--train-steps N` adds a short
training run per policy (same init, same batches, same dropout masks) against FP32.

    python benchmarks/grad_fidelity.py                          # resnet18 + mobilenet_v2, defaults below
    python benchmarks/grad_fidelity.py --plot fidelity.png --train-steps 80
    python benchmarks/grad_fidelity.py --models resnet18 --size 64 --batch 64 --steps 20   # bigger
A policy may be written name@P to set clip_update_period=P (e.g. dsgc@1: search every step).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import int8fx  # noqa: E402
from int8fx.data import load_fashion_mnist, normalize_images  # noqa: E402
from int8fx.nn.modules import Int8Layer  # noqa: E402
from int8fx.quant.core import dequantize, quantize_per_channel, quantize_per_tensor  # noqa: E402

POLICIES = ("per-tensor", "gvq", "mcs", "gvq-mcs", "gvq-mcs-search", "dsgc", "dsgc@1")


def make_config(spec: str, exclude: tuple, rounding: str = "nearest") -> int8fx.Int8Config:
    name, _, period = spec.partition("@")
    extra = {"clip_update_period": int(period)} if period else {}
    return int8fx.Int8Config(grad_quant=name, exclude=exclude, rounding=rounding, **extra)


def build_model(name: str, seed: int) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(num_classes=10).train()


def batches(n_steps: int, batch: int, size: int, seed: int):
    images, labels = load_fashion_mnist("train")
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[: n_steps * batch]
    for i in range(n_steps):
        j = idx[i * batch:(i + 1) * batch]
        yield normalize_images(images[j], size, 3), labels[j]


class ExactBackward(nn.Module):
    """Stands in for one Int8Layer: forward values are the INT8 op's, bit for bit; the backward is the
    exact FP32 backward of that quantized forward (straight-through fake quantization of X per tensor and
    W per channel). Comparing an INT8 model's gradients with a model of these isolates the gradient
    quantizer: the forward, and so every activation and BatchNorm statistic, is identical."""

    def __init__(self, layer: Int8Layer):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        object.__setattr__(self, "layer", layer)  # not a child: state_dict keys stay those of FP32

    def forward(self, x):
        layer = self.layer
        with torch.no_grad():
            y8 = layer(x)
        padding = layer.padding if layer.dims else 0
        if layer.dims and layer.padding_mode != "zeros":  # as nn.Conv2d: pad in float, then a conv without padding
            x, padding = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0
        qx, sx = quantize_per_tensor(x.detach())
        w = self.weight
        qw, sw = quantize_per_channel(w.detach().reshape(w.shape[0], -1), 0)
        xh = x + (dequantize(qx, sx) - x).detach()
        wh = w + (dequantize(qw, sw[:, None]).view_as(w) - w).detach()
        if layer.dims == 0:
            y = F.linear(xh, wh, self.bias)
        else:
            conv = (F.conv1d, F.conv2d, F.conv3d)[layer.dims - 1]
            y = conv(xh, wh, self.bias, layer.stride, padding, layer.dilation, layer.groups)
        return y8 + (y - y.detach())  # y - y.detach() is exactly 0: the value stays y8 to the bit


def exact_backward_twin(fp: nn.Module, names: list[str]) -> nn.Module:
    twin = int8fx.convert(fp, int8fx.Int8Config(grad_quant="per-tensor"))
    for n in names:
        parent, _, leaf = n.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, leaf, ExactBackward(twin.get_submodule(n)))
    return twin


class GradRecorder:
    """dW (from .grad) and dX (module-level grad_input, i.e. this layer's own contribution even when its
    input feeds several layers) of the named conv/linear layers of one model."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.mods = {n: model.get_submodule(n) for n in names}
        self.dx: dict[str, torch.Tensor] = {}
        for n, m in self.mods.items():
            m.register_full_backward_hook(lambda mod, gin, gout, n=n: self.dx.__setitem__(n, gin[0].detach().clone()))

    def grads(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (m.weight.grad.detach().clone(), self.dx[n]) for n, m in self.mods.items()}


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(cosine, relative L2) of a against the reference b."""
    a, b = a.double().flatten(), b.double().flatten()
    cos = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
    return cos, float((a - b).norm() / b.norm().clamp_min(1e-300))


def fwd_bwd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x.clone().requires_grad_(True)), y)
    loss.backward()
    return loss.item()


# metric columns: for each reference, (dW cos, dX cos, dW relL2, dX relL2)
REFS = {"fp32": "FP32 model (end to end)", "exact": "exact backward of the same INT8 forward (gradient quantizer alone)"}


def fidelity(model_name: str, policies: list[str], args) -> dict:
    fp = build_model(model_name, args.seed)
    opt = torch.optim.SGD(fp.parameters(), lr=args.lr, momentum=0.9)
    for x, y in batches(args.warmup, args.batch, args.size, args.seed + 2):  # FP32 only: leave random init
        opt.zero_grad()
        F.cross_entropy(fp(x), y).backward()
        opt.step()
    qms = {p: int8fx.convert(fp, make_config(p, tuple(args.exclude), args.rounding)) for p in policies}
    first = qms[policies[0]]
    names = [s.name for s in int8fx.inspect(first).converted if isinstance(first.get_submodule(s.name), Int8Layer)]
    models = {"fp32": fp, "exact": exact_backward_twin(fp, names), **qms}
    rec = {k: GradRecorder(m, names) for k, m in models.items()}
    sums = {(p, r): {n: [0.0] * 4 for n in names} for p in policies for r in REFS}
    times: dict[str, list[float]] = {k: [] for k in models}
    for step, (x, y) in enumerate(batches(args.steps, args.batch, args.size, args.seed)):
        state = fp.state_dict()
        for k, m in models.items():
            if k != "fp32":
                m.load_state_dict(state)  # quantizer buffers are optional: they keep their running values
        grads = {}
        for k, m in models.items():
            torch.manual_seed(args.seed + step)  # same dropout masks (mobilenet_v2's classifier) in every model
            t = time.perf_counter()
            fwd_bwd(m, x, y)
            times[k].append(time.perf_counter() - t)
            grads[k] = rec[k].grads()
        for p in policies:
            for r in REFS:
                for n, (dw, dx) in grads[p].items():
                    (cw, rw), (cx, rx) = compare(dw, grads[r][n][0]), compare(dx, grads[r][n][1])
                    for i, v in enumerate((cw, cx, rw, rx)):
                        sums[p, r][n][i] += v
        opt.step()
        print(f"  {model_name} step {step + 1}/{args.steps} done", file=sys.stderr)
    per_layer = {f"{p}|{r}": {n: [v / args.steps for v in sums[p, r][n]] for n in names} for p in policies for r in REFS}
    med = {k: min(v) for k, v in times.items()}  # best of the steps: least disturbed by other processes
    return {"model": model_name, "layers": names, "per_layer": per_layer,
            "ms_per_step": {k: 1000 * v for k, v in med.items()},
            "overhead_vs_per_tensor": {p: med[p] / med["per-tensor"] for p in policies} if "per-tensor" in med else {}}


def summary_rows(res: dict, policies: list[str], ref: str) -> list[tuple]:
    """Per policy: mean over layers of the step-averaged metric, and the worst layer."""
    rows = []
    for p in policies:
        cols = list(zip(*res["per_layer"][f"{p}|{ref}"].values()))  # metric -> per-layer values
        mean = [statistics.fmean(c) for c in cols]
        worst = [min(cols[0]), min(cols[1]), max(cols[2]), max(cols[3])]
        rows.append((p, mean[0], worst[0], mean[1], worst[1], mean[2], worst[2], mean[3], worst[3]))
    return rows


def format_summary(res: dict, policies: list[str], ref: str) -> str:
    head = ("policy", "dW cos mean", "dW cos worst", "dX cos mean", "dX cos worst", "dW relL2 mean",
            "dW relL2 worst", "dX relL2 mean", "dX relL2 worst", "ms/step", "x per-tensor")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary_rows(res, policies, ref):
        ms, ratio = res["ms_per_step"][r[0]], res["overhead_vs_per_tensor"].get(r[0], float("nan"))
        lines.append("| " + " | ".join([r[0], *(f"{v:.5f}" for v in r[1:5]), *(f"{v:.4f}" for v in r[5:9]),
                                        f"{ms:.0f}", f"{ratio:.2f}"]) + " |")
    return "\n".join(lines)


def format_per_layer(res: dict, policies: list[str], ref: str, metric: int = 0) -> str:
    """Layers x policies table of one metric (0: dW cos), with mean and worst rows."""
    lines = ["| layer | " + " | ".join(policies) + " |", "|" + "---|" * (len(policies) + 1)]
    cols = {p: [res["per_layer"][f"{p}|{ref}"][n][metric] for n in res["layers"]] for p in policies}
    for i, n in enumerate(res["layers"]):
        lines.append(f"| {n} | " + " | ".join(f"{cols[p][i]:.5f}" for p in policies) + " |")
    pick = min if metric < 2 else max
    lines.append("| **mean** | " + " | ".join(f"{statistics.fmean(cols[p]):.5f}" for p in policies) + " |")
    lines.append("| **worst** | " + " | ".join(f"{pick(cols[p]):.5f}" for p in policies) + " |")
    return "\n".join(lines)


def test_loss(model: nn.Module, n: int, size: int) -> float:
    """Mean cross-entropy on the first n Fashion-MNIST test images, in eval mode (BatchNorm running stats)."""
    images, labels = load_fashion_mnist("test")
    model.eval()
    with torch.no_grad():
        total = sum(F.cross_entropy(model(normalize_images(images[i:i + 500], size, 3)), labels[i:i + 500],
                                    reduction="sum").item() for i in range(0, n, 500))
    model.train()
    return total / n


def print_fidelity(res: dict, args) -> None:
    m = res["model"]
    for ref, what in REFS.items():
        print(f"\n## {m}: {len(res['layers'])} INT8 layers, {args.steps} steps; gradients vs {what}\n")
        print(format_summary(res, args.policies, ref))
        if args.per_layer:
            print(f"\n{m}: weight-gradient cosine per layer vs {what}\n")
            print(format_per_layer(res, args.policies, ref))
    print(f"\nms/step (best fwd+bwd of the steps): fp32 {res['ms_per_step']['fp32']:.0f}, "
          f"exact-backward twin {res['ms_per_step']['exact']:.0f}")


def train_run(model_name: str, runs: list[str], args) -> dict:
    """Same init, same batches, same optimizer for FP32 and every policy. Compared: the test loss after the
    last step (and the training loss of the last 20% of steps). A run named 'POLICY+dclrs' steps through
    int8fx.DeviationLRScaler. 'fp32, other init' is FP32 again from another init: how far two runs that no
    quantizer separates end up apart, i.e. the noise floor of this comparison."""
    out = {}
    for run in ["fp32", "fp32, other init", *runs]:
        model = build_model(model_name, args.seed + (run == "fp32, other init"))
        policy, _, dclrs = run.partition("+")
        if not run.startswith("fp32"):
            model = int8fx.convert(model, make_config(policy, tuple(args.exclude), args.rounding))
        opt = torch.optim.SGD(model.parameters(), lr=args.train_lr, momentum=0.9)
        if dclrs:
            opt = int8fx.DeviationLRScaler(opt, model)
        losses = []
        torch.manual_seed(args.seed + 1)  # same dropout masks in every run
        t = time.perf_counter()
        for x, y in batches(args.train_steps, args.train_batch, args.size, args.seed + 1):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        tail = statistics.fmean(losses[-max(1, len(losses) // 5):])
        seconds = time.perf_counter() - t
        out[run] = {"train_loss": tail, "first_loss": losses[0], "seconds": seconds,
                    "test_loss": test_loss(model, args.eval_images, args.size)}
        print(f"  train {model_name} {run}: loss {losses[0]:.3f} -> {tail:.3f}, test {out[run]['test_loss']:.3f}",
              file=sys.stderr)
    for r in out.values():
        r["vs_fp32"] = r["test_loss"] / out["fp32"]["test_loss"]
        r["train_vs_fp32"] = r["train_loss"] / out["fp32"]["train_loss"]
    return out


def format_train(res: dict) -> str:
    lines = ["| run | first loss | train loss (last 20% of steps) | / FP32 | test loss | / FP32 | within 10% | seconds |",
             "|" + "---|" * 8]
    for run, r in res.items():
        ok = "yes" if abs(r["vs_fp32"] - 1) <= 0.10 else "NO"
        lines.append(f"| {run} | {r['first_loss']:.3f} | {r['train_loss']:.4f} | {r['train_vs_fp32']:.3f} | "
                     f"{r['test_loss']:.4f} | {r['vs_fp32']:.3f} | {ok} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], policies: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), len(REFS), figsize=(16, 3.8 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        for ax, (ref, what) in zip(row, REFS.items()):
            for p in policies:
                ax.plot([res["per_layer"][f"{p}|{ref}"][n][0] for n in res["layers"]], marker=".", label=p)
            ax.set_title(f"{res['model']}: dW cosine vs {what}", fontsize=9)
            ax.set_xlabel("conv/linear layer (forward order)")
            ax.set_ylabel("cosine (mean over steps)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--steps", type=int, default=6, help="training steps measured (quantizer state carries over); "
                                                          "0: only the training runs")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=32, help="image side (Fashion-MNIST upsampled, 3 channels)")
    ap.add_argument("--lr", type=float, default=0.01, help="SGD (momentum 0.9) learning rate of the FP32 model")
    ap.add_argument("--warmup", type=int, default=50,
                    help="FP32 training steps before measuring: at random init an INT8 forward can be far from FP32 "
                         "(mobilenet_v2: logits cosine 0.65), after 50 steps it is not (0.999)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest",
                    help="gradient rounding (default nearest, unlike Int8Config: a single step's cosine then "
                         "measures the clip policy alone; stochastic rounding adds zero-mean noise that lowers "
                         "one step's cosine but not the expected gradient's)")
    ap.add_argument("--exclude", nargs="*", default=[], help="layer name patterns kept in FP32 (e.g. conv1 fc)")
    ap.add_argument("--train-steps", type=int, default=0, help="also train each policy this many steps vs FP32")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--train-lr", type=float, default=0.01)
    ap.add_argument("--eval-images", type=int, default=2000, help="test images for the training runs' test loss")
    ap.add_argument("--train-runs", nargs="+", default=["per-tensor", "gvq", "mcs", "gvq-mcs", "gvq-mcs-search",
                                                         "dsgc", "gvq-mcs+dclrs", "dsgc+dclrs"])
    ap.add_argument("--per-layer", action="store_true", help="print the layers x policies dW-cosine table")
    ap.add_argument("--plot", metavar="PNG")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# grad_fidelity {datetime.date.today()} | {platform.processor() or platform.machine()} "
          f"{torch.get_num_threads()} threads | torch {torch.__version__} | data fashion-mnist | "
          f"batch {args.batch} size {args.size} warmup {args.warmup} steps {args.steps} lr {args.lr} seed {args.seed}")
    results, trains = [], {}
    for m in args.models:
        if args.steps:
            results.append(fidelity(m, args.policies, args))
            print_fidelity(results[-1], args)
        if args.train_steps:
            trains[m] = train_run(m, args.train_runs, args)
            print(f"\n{m}: {args.train_steps} training steps (batch {args.train_batch}, SGD lr {args.train_lr} "
                  f"momentum 0.9), same init, batches and dropout masks\n")
            print(format_train(trains[m]))
    if args.plot and results:
        plot(results, args.policies, args.plot)
        print(f"\nplot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "fidelity": results, "train": trains}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
