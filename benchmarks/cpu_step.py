"""Training-step time on CPU: FP32 vs torch.ao FX QAT vs int8fx, measured in the same run.

The same as `int8fx bench` (see int8fx/bench.py for how it measures):
    python benchmarks/cpu_step.py                                   # resnet18, mobilenet_v2; batch 16, 64x64
    python benchmarks/cpu_step.py resnet18 --reps 20 --policy per-tensor dsgc --threads 1
"""
import sys

from int8fx.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
