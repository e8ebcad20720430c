"""Train a small CNN on Fashion-MNIST in FP32 and in INT8, and compare test accuracy.

Copy this file and change the model, the data or the policy: the INT8 part is one line,
`int8fx.convert(model, int8fx.Int8Config(...))`; the result trains like any nn.Module.
`int8fx train` does the same with progress bars, several policies and seeds, plots and a JSON.

    python examples/train.py                       # 1 epoch on 10k images, about 2-4 min on 2 CPU cores
    python examples/train.py --policy dsgc --epochs 2 --device cuda
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F

import int8fx
from int8fx.data import load_fashion_mnist, normalize_images
from int8fx.zoo import build_model


def train(model, x, y, epochs, device, lr=0.1, batch_size=128, seed=0):
    """SGD with Nesterov momentum, linear warmup then cosine decay; same batches for every model."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = int(epochs * (len(y) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    order = torch.randperm(len(y), generator=g)
    for step in range(steps):
        i = step * batch_size % (len(y) - batch_size + 1)
        idx = order[i:i + batch_size]
        loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"  step {step + 1:4d}/{steps}  loss {loss.item():.3f}")


@torch.no_grad()
def accuracy(model, x, y, device):
    model.eval()
    correct = sum((model(x[i:i + 1000].to(device)).argmax(1).cpu() == y[i:i + 1000]).sum().item()
                  for i in range(0, len(y), 1000))
    return 100.0 * correct / len(y)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smallcnn", help="smallcnn | resnet20 | mobilenetv2")
    p.add_argument("--policy", default="gvq-mcs", help=f"one of {int8fx.quant.grad_quantizer_names()}")
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--train-images", type=int, default=10_000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", help="folder with the Fashion-MNIST IDX files (default: the Debian package's)")
    args = p.parse_args()

    images, labels = load_fashion_mnist("train", args.data)
    x, y = normalize_images(images[:args.train_images]), labels[:args.train_images]
    test_images, test_y = load_fashion_mnist("test", args.data)
    test_x = normalize_images(test_images)  # all 10,000 held-out images

    torch.manual_seed(0)
    fp32 = build_model(args.model, width=16 if args.model == "smallcnn" else None).module
    int8 = int8fx.convert(fp32, int8fx.Int8Config(grad_quant=args.policy))  # a copy; fp32 is untouched
    for name, model in (("fp32", copy.deepcopy(fp32)), (f"int8 {args.policy}", int8)):
        model.to(args.device)
        print(f"{name}:")
        t = time.perf_counter()
        train(model, x, y, args.epochs, args.device)
        print(f"{name}: test top-1 {accuracy(model, test_x, test_y, args.device):.2f}% "
              f"({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
