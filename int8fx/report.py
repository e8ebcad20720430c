"""`inspect(qm)`: what the compiler did to a model, as a table, a dict and JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch.nn as nn

from .nn.modules import Int8Layer


@dataclass
class LayerRow:
    name: str
    op: str
    source: str
    converted: bool
    reason: str = ""
    grad_quant: str = ""
    backend: str = ""
    weight_shape: tuple = ()
    step: int = 0
    act_clip: float = 0.0
    grad_clip_min: float = 0.0
    grad_clip_median: float = 0.0
    grad_clip_max: float = 0.0
    deviation: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__, weight_shape=list(self.weight_shape))


@dataclass
class Report:
    layers: list[LayerRow]
    opaque: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def converted(self) -> list[LayerRow]:
        return [r for r in self.layers if r.converted]

    @property
    def skipped(self) -> list[LayerRow]:
        return [r for r in self.layers if not r.converted]

    def to_dict(self) -> dict:
        return {
            "summary": {"sites": len(self.layers), "converted": len(self.converted), "skipped": len(self.skipped)},
            "layers": [r.to_dict() for r in self.layers],
            "opaque_modules": [o.__dict__ for o in self.opaque],
            "config": self.config,
        }

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def __str__(self) -> str:
        head = ("name", "op", "src", "conv", "grad quant", "weight", "clip min/med/max", "reason")
        rows = [head]
        for r in self.layers:
            clips = f"{r.grad_clip_min:.2g}/{r.grad_clip_median:.2g}/{r.grad_clip_max:.2g}" if r.step else "-"
            rows.append((r.name, r.op, r.source.split(" ")[0][:4], "yes" if r.converted else "NO", r.grad_quant,
                         "x".join(map(str, r.weight_shape)), clips, r.reason[:60]))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-" * min(120, len(lines[0])))
        lines.append(f"{len(self.converted)}/{len(self.layers)} conv/linear sites converted to INT8")
        for o in self.opaque:
            lines.append(f"untraceable: {o.name} ({o.type}): {o.reason}")
        return "\n".join(lines)


def inspect(qmodel: nn.Module) -> Report:
    sites = getattr(qmodel, "_int8fx_sites", None)
    if sites is None:
        raise ValueError("inspect() needs a model returned by int8fx.convert()")
    rows = []
    for s in sites:
        row = LayerRow(s.name, s.op, s.source, s.converted, s.reason)
        layer: Int8Layer | None = s.layer
        if layer is not None:
            q = layer.grad_quantizer
            clips = q.last_clip_w.detach().float().cpu()
            row.grad_quant = q.policy
            row.backend = layer.backend_choice
            row.weight_shape = tuple(layer.weight.shape) if layer.owns_params else ()
            row.step = int(layer.step)
            row.act_clip = float(layer.act_clip)
            if clips.numel():
                row.grad_clip_min, row.grad_clip_median, row.grad_clip_max = (
                    float(clips.min()), float(clips.median()), float(clips.max()))
            row.deviation = float(layer.deviation) if layer.tracks_deviation else None
        rows.append(row)
    cfg = getattr(qmodel, "_int8fx_config", None)
    return Report(rows, list(getattr(qmodel, "_int8fx_opaque", [])), cfg.to_dict() if cfg else {})
