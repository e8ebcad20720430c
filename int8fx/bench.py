"""`int8fx bench`: time a training step of FP32, torch.ao FX QAT and int8fx on this machine, in one run.

FX QAT (`prepare_qat_fx`: fake-quant forward, FP32 backward) is what most users reach for today; int8fx runs
real INT8 GEMMs in the forward and both backward GEMMs. Variants are interleaved (A B C A B C ...) so that
load from other processes hits all of them alike, and both wall time and process CPU time are reported:
on a shared machine the CPU time is the steadier of the two.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cli import bad_input, positive_int
from .config import Int8Config
from .passes import convert


def fx_qat(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """torch.ao's FX quantization-aware training preparation of a copy of `model` (x86 qconfig)."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (example,))


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def compare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, policies=("gvq-mcs",), reps: int = 10,
            with_fx_qat: bool = True, roundings: tuple = (), backends: tuple = ("auto",)) -> dict:
    """{variant: {"wall": s, "cpu": s}} medians of `reps` interleaved training steps. One int8fx variant
    per policy, gradient rounding (`roundings`, default: the library's) and backend (default "auto"); the
    rounding and backend are named in the variant only when several are timed."""
    model = model.train()
    variants = {"fp32": model}
    if with_fx_qat:
        variants["fx-qat"] = fx_qat(model, x)
    roundings = tuple(roundings) or (Int8Config().rounding,)
    variants.update({f"int8fx {p}" + (f" {r}" if len(roundings) > 1 else "") + (f" [{b}]" if len(backends) > 1 else ""):
                     convert(model, Int8Config(grad_quant=p, rounding=r, backend=b)).train()
                     for b in backends for p in policies for r in roundings})
    steps = {k: _step_fn(m, x, y) for k, m in variants.items()}
    from .fusing import STATIC_AFTER

    for s in steps.values():  # warm-up: allocator, oneDNN primitive caches, exact-shape variants (int8fx.fusing)
        for _ in range(max(2, STATIC_AFTER)):
            s()
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    for _ in range(reps):
        for k, s in steps.items():
            t, c = time.perf_counter(), time.process_time()
            s()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k])} for k in steps}


def header(batch: int, size: int, reps: int) -> str:
    """Date, CPU model and ISA flags, what backend "auto" measured and chose, torch, threads, sizes."""
    from .fusing import compile_status
    from .kernels import cpu_report

    compiled, failed = compile_status()
    fusing = "compiled" if compiled and not failed else ("eager (INT8FX_COMPILE=0)" if not compiled
                                                         else f"compiled except {', '.join(failed)}")
    return (f"# {time.strftime('%Y-%m-%d')}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
            f"batch {batch} at {size}x{size} (smallcnn: 1x28x28 at its own batch)  median of {reps}\n"
            f"# CPU {cpu_report()}\n# fused passes: {fusing}")


def table(name: str, r: dict) -> list[str]:
    base, ref = r["fp32"], r.get("fx-qat", r["fp32"])
    return [f"| {name} | {k} | {v['wall'] * 1e3:.0f} | {v['cpu'] * 1e3:.0f} | {v['wall'] / base['wall']:.2f}x | "
            f"{v['cpu'] / base['cpu']:.2f}x | {v['cpu'] / ref['cpu']:.2f}x |" for k, v in r.items()]


TABLE_HEAD = ["| model | variant | wall ms | CPU ms | wall / FP32 | CPU / FP32 | CPU / FX QAT |",
              "|---|---|---|---|---|---|---|"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .quant import grad_quantizer_names

    parser.add_argument("models", nargs="*", default=["resnet18", "mobilenet_v2", "smallcnn"], metavar="NAME",
                        help="torchvision model names (random init, 10 classes, 3 x size x size inputs) or int8fx's "
                             "own zoo models (1x28x28, e.g. smallcnn: the quick preset's); default: resnet18 "
                             "mobilenet_v2 smallcnn")
    parser.add_argument("--batch", type=positive_int, default=16, help="batch size of torchvision models (default 16)")
    parser.add_argument("--zoo-batch", type=positive_int, default=128,
                        help="batch size of int8fx's own models (default 128, the quick preset's)")
    parser.add_argument("--size", type=positive_int, default=64, help="input height and width (default 64)")
    parser.add_argument("--reps", type=positive_int, default=10, help="timed steps per variant (default 10)")
    parser.add_argument("--policy", nargs="+", default=[Int8Config().grad_quant, "per-tensor"],
                        choices=grad_quantizer_names(), help="gradient policies to time, one int8fx row each")
    parser.add_argument("--rounding", nargs="+", default=[], choices=("stochastic", "nearest"),
                        help="gradient rounding(s) to time (default: the library's, stochastic)")
    parser.add_argument("--backend", nargs="+", default=["auto"], choices=("auto", "torch", "reference"),
                        help="GEMM backend(s) of the int8fx rows (default auto: what the probe picked, see the "
                             "header); 'reference' times the path a CPU without int8 dot products runs")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-fx-qat", action="store_true", help="skip the torch.ao FX QAT baseline")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and input in channels-last memory format (every variant, FP32 too), "
                             "PyTorch's recommended layout for CNNs on CPU: int8fx's pipeline then needs no "
                             "layout copies")


def _model_and_input(name: str, args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    """int8fx's own zoo models as the training presets build them (1x28x28, `--zoo-batch`); anything else
    from torchvision (3 x size x size, `--batch`)."""
    import torchvision

    from .train.recipe import Recipe
    from .zoo import OWN_MODELS, build_model

    torch.manual_seed(0)
    if name.lower() in OWN_MODELS:
        width = Recipe().width if name.lower() == Recipe().model else None
        zm = build_model(name, width=width)
        return zm.module, torch.randn(args.zoo_batch, zm.channels, zm.size, zm.size)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    return model, torch.randn(args.batch, 3, args.size, args.size)


def run(args: argparse.Namespace) -> int:
    from .zoo import check_model_name

    try:  # (every bad input before the first timing)
        for name in args.models:
            check_model_name(name)
        models = [(name, *_model_and_input(name, args)) for name in args.models]
        for name, model, x in models:
            _preflight(name, model, x)
    except ValueError as e:
        return bad_input("bench", e)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(header(args.batch, args.size, args.reps))
    print("\n".join(TABLE_HEAD))
    for name, model, x in models:
        if args.channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (x.shape[0],))
        r = compare(model, x, y, args.policy, args.reps, not args.no_fx_qat, tuple(args.rounding), tuple(args.backend))
        print("\n".join(table(name, r)), flush=True)
    return 0


def _preflight(name: str, model: nn.Module, x: torch.Tensor) -> None:
    """One eval-mode forward: an input size the model cannot take is a bad input, said in one line."""
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    except Exception as e:  # the model's own error says what it wanted
        raise ValueError(f"{name} cannot run on an input of shape {tuple(x.shape)}: {e}") from None
    finally:
        model.train()
