"""Whether a file with a symbolic batch can compute what the model computes at every batch size.

torch's exporters trace one forward: code that branches on the batch size (`if x.shape[0] == 1`) is
recorded on the example's branch, and torch.export assumes a symbolic size is not 1 without a guard. A
file exported from an example of 4 then runs the batch-4 branch at batch 1 as well, silently (both
exporters, torch 2.14); from an example of 1, the dynamo exporter fixes the batch at 1 without a word.

The check runs the export copy in eager mode, its sites as float convs on the dequantized INT8 weights
(smooth functions, so batch sizes differ only by float summation order), on the first input alone and
in a batch: where the first row's output is not the same, no single traced graph is right at both sizes.
A model whose rows interact (batch statistics in eval mode, a mean over the batch) is not refused for it:
an output row that changes when the other rows change is left out, as its traced ops follow the batch.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from ..nn.scope import no_fused_fastpath
from .errors import OnnxExportError

# largest difference, relative to the output's absmax, that float summation order explains (seen: 1e-7)
TOLERANCE = 1e-3


def refuse_batch_dependent_code(em: torch.nn.Module, args: tuple) -> None:
    """Raise `OnnxExportError` if `em` computes its first input row differently alone than in a batch.

    The batch is dimension 0 of every tensor argument with the first tensor's size there (as in
    `torch_export._dynamic_shapes`); a model without such an argument (a detector's list of images) is not
    checked. The batch compared is the example's, or for an example of one, the example twice."""
    first = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim()), None)
    if not first:  # (no tensor with a batch, or an empty one)
        return
    batched = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == first for a in args]

    def rows(others):
        return tuple(torch.cat([a[:1], others(a[1:] if first > 1 else a)]) if b else a for a, b in zip(args, batched))

    alone = tuple(a[:1] if b else a for a, b in zip(args, batched))
    in_batch = rows(lambda r: r)
    others_changed = rows(lambda r: r.flip(-1) if r.dim() > 1 else r.flip(0))
    try:
        with torch.no_grad(), no_fused_fastpath():
            outs = [tree_flatten(em(*x)) for x in (in_batch, others_changed, alone)]
    except Exception:  # (code that cannot run an input alone, or other rows: no comparison to make)
        return
    (batch_out, spec), (changed_out, _), (alone_out, alone_spec) = outs
    if spec != alone_spec:  # (e.g. one dict per image: nothing to line up)
        return
    n = len(in_batch[batched.index(True)])
    for i, (b, c, a) in enumerate(zip(batch_out, changed_out, alone_out)):
        if not (isinstance(b, torch.Tensor) and b.dim() and b.shape[0] == n):
            continue
        if not _close(b[:1], c[:1]):  # this output's first row reads the other rows: batch-coupled
            continue
        if a.numel() == b[:1].numel() and _close(a.reshape(-1), b[:1].reshape(-1)):
            continue  # (a shape-only difference, as a squeeze() of the batch, is not a wrong number)
        gap = _gap(a, b[:1])
        how = (f"shapes {tuple(a.shape)} and {tuple(b[:1].shape)}" if gap is None else f"{gap:.2g} of its range apart")
        raise OnnxExportError(
            f"the model computes an input differently alone than in a batch of {n} (output {i}: {how}): its code "
            "depends on the batch size (e.g. `if x.shape[0] == 1`), and a file with a symbolic batch computes the "
            "traced branch at every size. Export with dynamic_batch=False (`int8fx export --static-batch`) and an "
            "example of the batch size the file will run")


def _gap(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.shape != b.shape:
        return None
    a, b = torch.nan_to_num(a.double()), torch.nan_to_num(b.double())  # (inf and NaN where both have them)
    scale = max(b.abs().max().item(), a.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() / scale


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return bool(torch.equal(a, b))
    gap = _gap(a, b)
    return gap is not None and gap <= TOLERANCE
