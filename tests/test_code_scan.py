"""int8fx.passes.code_scan: whether an untraceable module's own code might call a conv/linear function on
weights of its own, which convert then warns about. Every way code can reach F.conv*d / F.linear must say
"may"; code that names none (a vision transformer's root) must not."""
from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import int8fx
from int8fx.passes.code_scan import function_may_call, may_call_site_ops


def _project(x, w):
    return F.linear(x, w)


def _indirect(x, w):
    return _project(x, w)


class _Base(nn.Module):
    def mix(self, x):
        return F.conv1d(x, self.w)


class ViTLike(nn.Module):
    """A transformer root as timm writes it: a class token and position embeddings of its own, blocks as
    children, and control flow on the input that torch.fx cannot trace."""

    def __init__(self, d: int = 8, tokens: int = 4):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, d) * 0.02)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)
        self.use_conv_stem = False  # a flag whose name looks like a conv: read, never called

    def _pos_embed(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed if x.shape[1] == self.pos_embed.shape[1] else x

    def forward(self, x):
        x = self._pos_embed(x)
        if x.norm() > 0:  # data-dependent: not traceable
            x = self.proj(x)
        return self.head(x[:, 0])


def _module(forward, w_shape=(3, 3), base=nn.Module, **attrs):
    cls = type("Custom", (base,), {"forward": forward})
    m = cls()
    m.w = nn.Parameter(torch.randn(*w_shape))
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


@pytest.mark.parametrize("case", ["direct", "helper two calls deep", "string", "format string", "partial",
                                  "callable object",
                                  "base-class method", "closure", "instance attribute", "conv method"])
def test_every_way_to_a_conv_or_linear_call_counts(case):
    class Obj:
        def __call__(self, x, w):
            return F.linear(x, w)

    def closure_maker():
        op = F.linear

        def forward(self, x):
            return op(x, self.w)
        return forward

    base = nn.Module
    attrs = {}
    if case == "direct":
        def forward(self, x):
            return F.linear(x, self.w)
    elif case == "helper two calls deep":
        def forward(self, x):
            return _indirect(x, self.w)
    elif case == "string":
        def forward(self, x):
            return getattr(F, "linear")(x, self.w)
    elif case == "format string":
        def forward(self, x):
            return getattr(F, "conv%dd" % 1)(x, self.w)
    elif case == "partial":
        attrs["op"] = functools.partial(F.linear)

        def forward(self, x):
            return self.op(x, self.w)
    elif case == "callable object":
        attrs["op"] = Obj()

        def forward(self, x):
            return self.op(x, self.w)
    elif case == "base-class method":
        base = _Base

        def forward(self, x):
            return self.mix(x)
    elif case == "closure":
        forward = closure_maker()
    elif case == "instance attribute":  # a builtin stored under another name: judged by its own name
        attrs["op"] = torch.nn.functional.linear

        def forward(self, x):
            return self.op(x, self.w)
    else:
        def forward(self, x):
            return self._conv_forward(x, self.w, None)
    assert may_call_site_ops(_module(forward, base=base, **attrs)), case


def test_code_without_conv_or_linear_calls_is_told_apart():
    assert not may_call_site_ops(ViTLike())

    def forward(self, x):
        return self.op(x, self.w)

    assert not may_call_site_ops(_module(forward, op=torch.matmul))  # a matmul is no site int8fx converts


def test_resampling_modes_are_no_linear_calls():
    """Position embeddings resized to the input (timm's qwen3_vit, naflexvit) name "bilinear" or "linear"
    as the mode of F.interpolate / F.grid_sample; code that also looks a function up by name still counts."""
    def interpolate(self, x):
        return x + F.interpolate(self.w[None, None], size=x.shape[-2:], mode="bilinear")

    def grid_sample(self, x):
        grid = torch.zeros(1, *x.shape[-2:], 2)
        return x + F.grid_sample(self.w[None, None], grid, mode="bilinear", align_corners=False)

    def looked_up(self, x):
        return getattr(F, "linear")(F.interpolate(x, scale_factor=2, mode="linear"), self.w)

    assert not may_call_site_ops(_module(interpolate)) and not may_call_site_ops(_module(grid_sample))
    assert may_call_site_ops(_module(looked_up))


def test_a_vit_like_root_is_not_warned_about_and_a_branchy_conv_still_is():
    """convert warned "1 module(s) may make F.conv*d / F.linear calls int8fx cannot see" for every ViT-like
    model, whose root cannot be traced and owns a class token and position embeddings. Its code names no
    conv/linear function: no warning now, its Linear children converted, and inspect says why."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = int8fx.convert(ViTLike())
    report = int8fx.inspect(qm)
    assert [s.converted for s in report.layers] == [True, True]
    assert "(its own weights: cls_token, pos_embed; its code names no conv/linear function)" in str(report)
    x = torch.randn(2, 4, 8)
    assert qm(x).shape == (2, 3)

    def forward(self, x):
        return _indirect(x, self.w) if x.norm() > 0 else x

    with pytest.warns(UserWarning, match=r"may make F.conv\*d / F.linear calls .* uses its own w in code"):
        int8fx.convert(_module(forward))


def _upsample(z, w):
    return _deeper(z, w)


def _deeper(z, w):
    return F.conv_transpose2d(z, w, stride=2)


def _plain(z, w):
    return F.conv2d(z, w) + torch.relu(z).mean()


def test_a_function_scan_finds_the_op_it_is_asked_about_calls_deep():
    """`function_may_call` (for functions torch.fx does not enter): the op's name two calls deep is found;
    a function that names other ops only is told apart."""
    transposed = re.compile("conv_transpose2d")
    assert function_may_call(_upsample, transposed)
    assert not function_may_call(_plain, transposed)
    assert function_may_call(_plain, re.compile("conv2d"))

