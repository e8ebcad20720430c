"""What an ONNX graph needs to know about each INT8 site, found by running the model.

An ONNX graph holds constants where int8fx computes at run time: one activation scale per site, and the
INT8 weights of each site. `calibrate` runs the eval-mode model on the calibration batches and records,
per site, the absmax of its input, the weight and bias it was called with and its geometry. `static_sites`
turns that into each site's static parameters:

  * activation clip, by `calibration`: "eval" (default) takes the clip the eval-mode model itself uses
    (`Int8Layer.eval_act_clip()`: a trained layer's running clip `act_clip_ema`), else the calibration
    absmax; "inputs" always the calibration absmax; "ema" `act_clip_ema` wherever training set one.
  * weights: int8fx's own `quantize_per_channel` of the weight the site computes with, so the INT8 values
    in the file are the ones the model computes with.

A site whose weight is computed from the model input (timm's CondConv mixes experts per sample) has no
static INT8 weight: `find_input_dependent` spots it by running the model once more on a different input,
and the export writes that site in float and says so in the metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from torch import Tensor

from ..kernels.im2col import GemmSpec
from ..nn import transposed
from ..nn.modules import Int8Layer, call_spec
from ..nn.scope import no_fused_fastpath
from ..observe import device_of, eval_mode, observe_int8_calls, to_device
from ..quant.core import absmax, quantize_per_channel, scale_from_clip

CALIBRATIONS = ("eval", "inputs", "ema")


@dataclass
class SiteCalibration:
    """What one eval-mode pass over the calibration batches saw of one site."""

    absmax: Tensor            # of its inputs, over all batches (fp32 scalar)
    calls: int
    weight: Tensor            # of the first call (functional sites get it as an argument)
    bias: Tensor | None
    input_shape: tuple
    spec: GemmSpec | None     # conv geometry with explicit zero padding; None for linear
    weight_varies: bool = False  # set by find_input_dependent
    input_varies: bool = True    # False: every call's input is the same whatever the model's input (a
                                 # relative-position MLP on fixed coordinates); set by find_input_dependent


@dataclass
class StaticSite:
    """A site's constants in an ONNX graph."""

    name: str
    layer: Int8Layer
    w_int8: Tensor            # int8, the weight's shape
    w_scale: Tensor           # fp32 [out channels]
    bias: Tensor | None       # fp32
    clip: float
    clip_source: str          # "act_clip_ema" | "calibration"
    x_scale: float            # the graph's activation scale (fp32 value)
    cal: SiteCalibration

    @property
    def dims(self) -> int:
        return self.layer.dims


def calibrate(qmodel: nn.Module, batches: Iterable[tuple]) -> dict[str, SiteCalibration]:
    """Run `qmodel` in eval mode on each batch; one record per INT8 site that was called."""
    seen: dict[str, SiteCalibration] = {}

    def record(mod, x, weight, bias, out, geometry):
        rec = seen.get(mod.site_name)
        if rec is None:
            spec = call_spec(mod, weight, geometry) if mod.dims else None
            rec = seen[mod.site_name] = SiteCalibration(
                torch.zeros((), dtype=torch.float32), 0, weight.detach().cpu(),
                None if bias is None else bias.detach().cpu(), tuple(x.shape), spec)
        rec.absmax = torch.maximum(rec.absmax, absmax(x).cpu())
        rec.calls += 1

    device = device_of(qmodel)
    with observe_int8_calls(qmodel, record), eval_mode(qmodel), no_fused_fastpath():
        for batch in batches:
            qmodel(*to_device(batch, device))
    return seen


def find_input_dependent(qmodel: nn.Module, args: tuple, cal: dict[str, SiteCalibration]) -> None:
    """Mark the sites whose weight changes with the model input, and those whose input does not: two more
    eval forwards, on seeded random inputs of the same shapes, comparing the weights each site was called
    with to calibration's, and the inputs of the two forwards' calls (by their sums: a site reading the
    model's input in any way sees other values)."""
    g = torch.Generator().manual_seed(12345)
    seen: dict[str, list] = {}

    def compare(mod, x, weight, bias, out, geometry):
        rec = cal.get(mod.site_name)
        if rec is not None and not rec.weight_varies:
            w = weight.detach().cpu()
            rec.weight_varies = w.shape != rec.weight.shape or not torch.equal(w, rec.weight)
        xd = x.detach().double()
        seen.setdefault(mod.site_name, []).append((tuple(x.shape), float(xd.sum()), float(xd.square().sum())))

    device = device_of(qmodel)
    fingerprints = []
    for _ in range(2):
        other = tuple(torch.randn(a.shape, generator=g).to(a.dtype) * (a.float().std() + 1) + a.float().mean()
                      if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
        seen = {}
        with observe_int8_calls(qmodel, compare), eval_mode(qmodel), no_fused_fastpath():
            qmodel(*to_device(other, device))
        fingerprints.append(seen)
    for name, rec in cal.items():
        rec.input_varies = fingerprints[0].get(name) != fingerprints[1].get(name) or name not in fingerprints[0]


def static_sites(sites, cal: dict[str, SiteCalibration], calibration: str) -> dict[str, StaticSite]:
    """The static parameters of every converted site that calibration reached and whose weight is static."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    out = {}
    for site in sites:
        rec = cal.get(site.name) if site.converted else None
        if rec is None or rec.weight_varies:
            continue
        layer = site.layer
        clip, source = float(rec.absmax), "calibration"
        use_ema = calibration == "ema" or (calibration == "eval" and layer.eval_act_clip() is not None)
        if use_ema and float(layer.act_clip_ema) > 0:
            clip, source = float(layer.act_clip_ema), "act_clip_ema"
        w_q, s_w = weight_codes(rec.weight, layer.is_transposed, rec.spec.groups if rec.spec is not None else 1)
        s_x = float(scale_from_clip(torch.tensor(clip, dtype=torch.float32)))
        # QuantizeLinear divides by its scale: a site whose input was all zeros gets the smallest normal fp32
        # scale, which maps 0 to 0 (as int8fx's zero scale does) without a division by zero.
        s_x = s_x if s_x > 0 else torch.finfo(torch.float32).tiny
        out[site.name] = StaticSite(site.name, layer, w_q, s_w,
                                    None if rec.bias is None else rec.bias.float(), clip, source, s_x, rec)
    return out


def weight_codes(weight: Tensor, is_transposed: bool, groups: int) -> tuple[Tensor, Tensor]:
    """(int8 codes in the weight's shape, fp32 scale per output channel): the INT8 weight a site computes
    with, as its forward quantizes it (W's axis 0, or axis 1 of a transposed conv's W [C_in, C_out/g, *k])."""
    w = weight.detach().float()
    if is_transposed:  # (int8fx.nn.transposed)
        w_q, s_w = transposed.weight_operand(w, groups, torch.float32)
    else:
        w_q, s_w = quantize_per_channel(w.reshape(w.shape[0], -1), 0)
    return w_q.to(torch.int8).reshape(w.shape), s_w.float()
