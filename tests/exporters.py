"""The ONNX exporters a test can ask for on this torch. torch 2.5's torch.export-based exporter takes no ONNX
translation for INT8 sites (`int8fx.onnx.torch_export.dynamo_writes_int8_sites`), and int8fx refuses it there
with a clear error (tested in test_onnx.py), so tests of that exporter skip on such a torch."""
from __future__ import annotations

import pytest

from int8fx.onnx.torch_export import dynamo_writes_int8_sites

needs_dynamo_exporter = pytest.mark.skipif(
    not dynamo_writes_int8_sites(),
    reason="this torch's torch.export-based exporter takes no translation for INT8 sites (torch < 2.6)")


def exporters(*params):
    """pytest params for parametrize: any that is, or holds, "dynamo" skips where that exporter is refused."""
    def mark(p):
        if isinstance(p, type(pytest.param(None))):
            return pytest.param(*p.values, marks=(*p.marks, needs_dynamo_exporter), id=p.id) if _dynamo(p.values) else p
        return pytest.param(p, marks=needs_dynamo_exporter) if _dynamo((p,)) else p
    return [mark(p) for p in params]


def _dynamo(values) -> bool:
    return any(v == "dynamo" or (isinstance(v, tuple) and "dynamo" in v) for v in values)
