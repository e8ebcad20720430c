"""Inspect a converted model: which conv/linear sites run in INT8, why others do not, live quantizer state.

`inspect(qm)` gives a Report: a table, a dict, JSON and a picture of the rewritten graph.

One row per conv/linear call site (converted or kept in full precision, with the reason), showing its
shapes, forward granularity, gradient quantizer, the live quantizer state (clip values summarised over
channels, deviation) and the backend it binds to; a summary counts sites and the share of conv/linear
FLOPs that run in INT8.

Shapes and FLOPs need an example input: `inspect(qm, example_inputs)` runs the model once in eval mode
under `no_grad` (BatchNorm statistics and quantizer state are left untouched, every module's training
flag is restored; fused eval paths of attention are turned off so that its projections run through their
INT8 sites as in training). Every INT8 computation is observed at `Int8Layer.int8_functional` (however it
is reached: module call, routed call), and conv/linear *function* calls that run in FP32 are seen by a
`TorchFunctionMode` and named after their site (module hooks tell which module's code made the call).
A site's MACs are `output.numel() * weight[0].numel()` summed over its calls (FLOPs = 2 MACs); elementwise
ops (BatchNorm, activations, pooling) are not counted. Without an example input the shape columns are empty.

The picture is the whole model traced by torch.fx for analysis only (INT8 sites and modules with rewritten
or routed code as leaves); a model that does not trace as a whole is drawn as its largest traceable parts.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from torch.overrides import TorchFunctionMode

from .files import check_writable, write_atomically
from .nn.modules import Int8Layer
from .nn.scope import no_fused_fastpath
from .nn.twins import Rewritten, Routed
from .passes import analysis_graphs, conversion_of, sites_of

REPORT_SCHEMA = "int8fx.report/1"


# --------------------------------------------------------------------------- rows
@dataclass
class LayerRow:
    """One conv/linear site. Clip values are those of the last backward step (zeros before the first)."""

    name: str
    op: str
    source: str
    converted: bool
    reason: str = ""
    owner: str = ""
    grad_quant: str = ""
    backend: str = ""
    weight_shape: tuple = ()
    step: int = 0
    act_clip: float = 0.0
    grad_clip_min: float = 0.0
    grad_clip_median: float = 0.0
    grad_clip_max: float = 0.0
    deviation: float | None = None
    # shapes and cost (filled when inspect() got an example input)
    input_shape: tuple = ()
    output_shape: tuple = ()
    macs: int | None = None
    calls: int = 0
    # quantization details
    fwd_granularity: str = ""
    rounding: str = ""
    backend_choice: str = ""
    device: str = ""
    act_clip_ema: float = 0.0
    grad_clip_x: float = 0.0
    quant_state: dict = field(default_factory=dict)

    @property
    def fwd_granularity_short(self) -> str:
        """The table's cell: "T/C" = X per tensor, W per output channel."""
        if not self.fwd_granularity:
            return "-"
        return "/".join("T" if "tensor" in p else "C" for p in self.fwd_granularity.split(", "))

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in ("weight_shape", "input_shape", "output_shape"):
            d[k] = list(d[k])
        return d


@dataclass
class Report:
    layers: list[LayerRow]
    opaque: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    shapes_from: str | None = None  # how shapes were obtained, None when no example input was given
    model_name: str = ""
    backend_note: str = ""  # what "auto" chose on this machine and why (int8fx.kernels.probe)
    _model: Any = field(default=None, repr=False, compare=False)

    @property
    def converted(self) -> list[LayerRow]:
        return [r for r in self.layers if r.converted]

    @property
    def skipped(self) -> list[LayerRow]:
        return [r for r in self.layers if not r.converted]

    @property
    def summary(self) -> dict:
        by_op: dict[str, dict] = {}
        for r in self.layers:
            e = by_op.setdefault(r.op or "?", {"sites": 0, "converted": 0})
            e["sites"] += 1
            e["converted"] += int(r.converted)
        known = self.shapes_from is not None
        total = sum(r.macs for r in self.layers if r.macs is not None) if known else None
        int8 = sum(r.macs for r in self.converted if r.macs is not None) if known else None
        return {
            "sites": len(self.layers),
            "converted": len(self.converted),
            "skipped": len(self.skipped),
            "opaque_modules": len(self.opaque),
            "by_op": by_op,
            "macs_total": total,
            "macs_int8": int8,
            "int8_flop_percent": (100.0 * int8 / total if total else None) if known else None,
            # sites the example forward never reached (their cost is unknown and not in the totals)
            "unobserved_sites": [r.name for r in self.layers if r.macs is None] if known else [],
            "shapes_from": self.shapes_from,
        }

    def to_dict(self) -> dict:
        return {
            "schema": REPORT_SCHEMA,
            "model": self.model_name,
            "summary": self.summary,
            "layers": [r.to_dict() for r in self.layers],
            "opaque_modules": [dict(o.__dict__) for o in self.opaque],
            "config": self.config,
            "backend_note": self.backend_note,
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_atomically((text + "\n").encode(), path)
        return text

    # ------------------------------------------------------------------ text
    def __rich__(self):
        from rich.console import Group

        return Group(*self._renderables())

    def render(self, width: int | None = None, color: bool = False) -> str:
        """The table as text, `width` columns wide at most (default: the terminal's, 120 when unknown)."""
        from rich.console import Console

        width = width or shutil.get_terminal_size((120, 24)).columns
        buf = io.StringIO()
        console = Console(file=buf, width=width, color_system="standard" if color else None, force_terminal=color,
                          legacy_windows=False, soft_wrap=False, emoji=False, highlight=False)
        for part in self._renderables():
            console.print(part)
        return "\n".join(line.rstrip() for line in buf.getvalue().rstrip("\n").splitlines())

    def __str__(self) -> str:
        return self.render()

    def _renderables(self) -> list:
        from rich import box
        from rich.table import Table
        from rich.text import Text

        s = self.summary
        title = f"{self.model_name + ': ' if self.model_name else ''}{s['converted']}/{s['sites']} conv/linear sites in INT8"
        if s["int8_flop_percent"] is not None:
            title += (f", {_macs(s['macs_int8'])} of {_macs(s['macs_total'])} MACs "
                      f"({s['int8_flop_percent']:.1f}% of conv/linear FLOPs)")
            if s["unobserved_sites"]:
                title += (f"; {len(s['unobserved_sites'])} sites not seen running on the example input (not reached, "
                          "or inside TorchScript)")
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), title_justify="left",
                      caption=("INT8 X/W: granularity of the forward quantizers (T per tensor, C per output channel); "
                               "dY clip: clip of the output gradient per channel at the last step, min/median/max; "
                               "dev: cosine distance of the quantized dY (DCLRS)"),
                      caption_justify="left")
        shapes = self.shapes_from is not None
        table.add_column("site", no_wrap=True, overflow="fold")
        table.add_column("op", no_wrap=True)
        if shapes:
            table.add_column("input", no_wrap=True, overflow="fold")
        table.add_column("weight", no_wrap=True, overflow="fold")
        if shapes:
            table.add_column("MACs", justify="right", no_wrap=True)
        table.add_column("INT8 X/W", no_wrap=True)
        table.add_column("dY quant", no_wrap=True, overflow="fold")
        table.add_column("dY clip min/med/max", no_wrap=True, overflow="fold")
        table.add_column("dev", justify="right", no_wrap=True)
        table.add_column("backend", no_wrap=True, overflow="fold")
        for r in self.layers:
            cells = [Text(r.name, style="" if r.converted else "bold red"), r.op]
            if shapes:
                cells.append(_shape(r.input_shape))
            cells.append(_shape(r.weight_shape))
            if shapes:
                cells.append(_macs(r.macs) if r.macs is not None else "-")
            if r.converted:
                clips = f"{_g(r.grad_clip_min)}/{_g(r.grad_clip_median)}/{_g(r.grad_clip_max)}" if r.step else "-"
                cells += [Text(f"yes {r.fwd_granularity_short}", style="green"), r.grad_quant, clips,
                          _g(r.deviation) if r.deviation is not None else "-", r.backend]
            else:
                cells += [Text("no*", style="bold red"), "-", "-", "-", "-"]
            table.add_row(*cells)
        parts: list = [table]
        if self.skipped:
            lines = Text(f"* kept in full precision ({len(self.skipped)}):\n", style="bold")
            for r in self.skipped:
                lines.append(f"  {r.name} ({r.op}, {r.source}): {r.reason}\n")
            parts.append(lines)
        if self.opaque:
            lines = Text(f"own code not rewritable (torch.fx cannot trace it, or a graph would not replay it), "
                         f"kept as it is (its conv/linear modules are still converted; conv/linear calls its own "
                         f"code makes on its weights stay FP32) ({len(self.opaque)}):\n", style="bold")
            for o in self.opaque:
                own = (f" (its own weights: {', '.join(o.weights)}"
                       f"{'' if o.may_call else '; its code names no conv/linear function'})"
                       if o.weights else "")
                lines.append(f"  {o.name} ({o.type}){own}: {o.reason}\n")
            parts.append(lines)
        if self.backend_note:
            parts.append(Text(self.backend_note, style="dim"))
        if not shapes:
            parts.append(Text("shapes and FLOPs: pass an example input (inspect(qm, x) or --input-shape)", style="dim"))
        return parts

    # ------------------------------------------------------------------ picture
    def save_graph(self, path: str | os.PathLike, format: str | None = None) -> str:
        """Write the rewritten graph as SVG/PNG/PDF (needs graphviz's `dot`) or as Graphviz source (.dot).

        INT8 sites are green, conv/linear sites kept in full precision red (their tooltip holds the reason),
        other nodes grey. A model that did not trace as a whole gets one cluster per traced part.
        Returns the path written.
        """
        if self._model is None:
            raise ValueError("save_graph() needs the report of a live model (int8fx.inspect(qm)), not one read from JSON")
        fmt = graph_format(path, format)
        dot = graph_dot(self._model, self)
        data = dot.to_string().encode() if fmt in ("dot", "gv") else dot.create(prog="dot", format=fmt)
        write_atomically(data, path)
        return os.fspath(path)


GRAPH_FORMATS = ("svg", "png", "pdf", "dot", "gv")


def graph_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The picture's format (`format`, else the path's suffix, else svg), or ValueError before any work: a
    format Graphviz cannot write, or one it needs `dot` for where `dot` is not installed."""
    fmt = (format or os.path.splitext(os.fspath(path))[1].lstrip(".") or "svg").lower()
    if fmt not in GRAPH_FORMATS:
        raise ValueError(f"cannot draw the graph as .{fmt}: use .svg, .png, .pdf or .dot (Graphviz source)")
    if fmt not in ("dot", "gv") and shutil.which("dot") is None:
        raise ValueError(f"drawing the graph as .{fmt} needs Graphviz's `dot` program (apt-get install graphviz); "
                         "or save it as .dot")
    return fmt


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def _g(v) -> str:
    """Compact float: 3 significant digits, exponent without padding (1.2e-05 -> 1.2e-5)."""
    if v is None:
        return "-"
    s = f"{v:.2g}"
    if "e" in s:
        m, e = s.split("e")
        s = f"{m}e{int(e)}"
    return s


def _macs(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


# --------------------------------------------------------------------------- shapes
def _add_call(record: dict, name: str, x, weight, out, transposed: bool = False) -> None:
    """Count one call of site `name`. MACs: each output (each input, for a transposed conv) is a dot
    product with one weight slice."""
    rec = record.setdefault(name, {"calls": 0, "macs": 0})
    rec["calls"] += 1
    if isinstance(x, Tensor) and "input" not in rec:
        rec["input"] = tuple(x.shape)
    if isinstance(weight, Tensor) and "weight" not in rec:
        rec["weight"] = tuple(weight.shape)
    if isinstance(out, Tensor):
        rec.setdefault("output", tuple(out.shape))
        if isinstance(weight, Tensor):
            rec["macs"] += (x.numel() if transposed and isinstance(x, Tensor) else out.numel()) * weight[0].numel()


class _FP32Calls(TorchFunctionMode):
    """Sees every conv/linear *function* call that runs in floating point (INT8 sites call none) and names it
    after its site: a module site kept in FP32 is the innermost running module itself; a call in a module's
    own code is that module's next FP32 functional site, in code order."""

    def __init__(self, sites, stack: list, record: dict) -> None:
        super().__init__()
        self.stack, self.record, self.count = stack, record, {}
        self.module_sites = {s.name for s in sites if s.source == "module" and not s.converted}
        self.functional: dict[str, list[str]] = {}
        for s in sites:
            if not s.converted and s.source != "module":
                self.functional.setdefault(s.owner, []).append(s.name)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        transposed = func in _transposed_functions()
        if (transposed or func in _site_functions()) and self.stack and self.stack[-1] is not None:
            owner = self.stack[-1]
            if owner in self.module_sites:
                name = owner
            else:
                k = self.count[owner] = self.count.get(owner, -1) + 1
                names = self.functional.get(owner, [])
                name = names[k] if k < len(names) else None
            if name is not None:
                bound = dict(zip(("input", "weight"), args), **(kwargs or {}))
                _add_call(self.record, name, bound.get("input"), bound.get("weight"), out, transposed)
        return out





def _site_functions():
    from .passes.rewrite import SITE_FUNCTIONS

    return SITE_FUNCTIONS


def _transposed_functions():
    from .passes.rewrite import TRANSPOSED_FUNCTIONS

    return TRANSPOSED_FUNCTIONS


def record_shapes(qmodel: nn.Module, example_inputs, sites) -> dict[str, dict]:
    """{site name: {"input", "weight", "output" shapes, "calls", "macs"}} from one eval-mode forward."""
    from .observe import as_args as _as_args, device_of as _device_of, eval_mode, observe_int8_calls
    from .observe import to_device as _to

    record: dict[str, dict] = {}
    stack: list = []  # path of each running module; None inside INT8 sites (observed by their own hook)
    handles = []
    for name, mod in qmodel.named_modules():
        if isinstance(mod, torch.jit.ScriptModule):  # (cannot be hooked; its compiled calls are not seen either)
            continue
        path = None if isinstance(mod, Int8Layer) else name
        handles.append(mod.register_forward_pre_hook(lambda m, a, path=path: stack.append(path)))
        handles.append(mod.register_forward_hook(lambda m, a, out: stack.pop() and None, always_call=True))
    int8_calls = observe_int8_calls(qmodel, lambda m, x, w, b, out, geometry: _add_call(record, m.site_name, x, w, out,
                                                                                        m.is_transposed))
    try:
        with int8_calls, eval_mode(qmodel), no_fused_fastpath(), _FP32Calls(sites, stack, record):
            qmodel(*_to(_as_args(example_inputs), _device_of(qmodel)))
    finally:
        for h in handles:
            h.remove()
    return record


# --------------------------------------------------------------------------- inspect
def _summ(t: Tensor) -> Any:
    t = t.detach().cpu()
    if t.numel() == 0:  # a site that learns its channel count at its first call, before that call
        return {"shape": list(t.shape)}
    if t.numel() == 1:
        return t.item()
    if t.dtype == torch.bool or not t.dtype.is_floating_point:
        vals, counts = torch.unique(t.reshape(-1), return_counts=True)
        if len(vals) <= 8:
            return {"counts": {str(v.item()): int(c) for v, c in zip(vals, counts)}, "shape": list(t.shape)}
        t = t.double()
    f = t.reshape(-1).double()
    return {"min": f.min().item(), "median": f.median().item(), "max": f.max().item(), "shape": list(t.shape)}


def inspect(qmodel: nn.Module, example_inputs=None, name: str = "") -> Report:
    """Report on a model returned by `int8fx.convert`. With `example_inputs` (a tensor or tuple of
    tensors), also shapes and FLOPs (see the module docstring for how)."""
    from .kernels import resolve_backend
    from .observe import device_of as _device_of

    record = conversion_of(qmodel)
    if record is None:
        raise ValueError("inspect() needs a model returned by int8fx.convert()")
    sites = sites_of(qmodel)
    shapes = record_shapes(qmodel, example_inputs, sites) if example_inputs is not None else {}
    rows = []
    for s in sites:
        row = LayerRow(s.name, s.op, s.source, s.converted, s.reason, s.owner)
        layer: Int8Layer | None = s.layer
        if layer is not None:
            q = layer.grad_quantizer
            clips = q.last_clip_w.detach().float().cpu()
            row.grad_quant = q.policy
            row.backend_choice = layer.backend_choice
            row.device = _device_of(layer).type
            try:
                row.backend = resolve_backend(layer.backend_choice, _device_of(layer)).name
            except RuntimeError:
                row.backend = f"{layer.backend_choice} (unavailable)"
            row.weight_shape = tuple(layer.weight.shape) if layer.owns_params else ()
            row.step = int(layer.step)
            row.act_clip = float(layer.act_clip)
            row.act_clip_ema = float(layer.act_clip_ema)
            row.grad_clip_x = float(q.last_clip_x)
            row.rounding = layer.config.rounding
            row.fwd_granularity = "X per-tensor, W per-channel"
            if clips.numel():
                row.grad_clip_min, row.grad_clip_median, row.grad_clip_max = (
                    float(clips.min()), float(clips.median()), float(clips.max()))
            row.deviation = float(layer.deviation) if layer.tracks_deviation else None
            row.quant_state = {n: _summ(b) for n, b in q.named_buffers() if b is not None}
        else:
            mod = _get(qmodel, s.name)
            w = getattr(mod, "weight", None) if mod is not None else None
            if isinstance(w, Tensor) and not nn.parameter.is_lazy(w):  # a lazy weight has no shape yet
                row.weight_shape = tuple(w.shape)
        rec = shapes.get(s.name)
        if rec:
            row.input_shape = rec.get("input", ())
            row.output_shape = rec.get("output", ())
            row.weight_shape = row.weight_shape or rec.get("weight", ())
            row.calls = rec["calls"]
            row.macs = rec["macs"] if "weight" in rec else None
        rows.append(row)
    cfg = record.config
    how = None
    if example_inputs is not None:
        from .observe import as_args as _as_args

        ins = ", ".join("x".join(map(str, a.shape)) for a in _as_args(example_inputs) if isinstance(a, Tensor))
        how = f"one eval-mode forward on an example input {ins} (INT8 site calls + FP32 conv/linear calls)"
    return Report(rows, list(record.opaque), cfg.to_dict() if cfg else {}, how,
                  name or type(qmodel).__name__, _backend_note(rows), qmodel)


def _backend_note(rows: list[LayerRow]) -> str:
    """One line on what backend "auto" runs on this CPU and why, when a CPU site asks for "auto"."""
    from .kernels import cpu_report

    if not any(r.backend_choice == "auto" and r.device == "cpu" for r in rows):
        return ""
    return f"backend auto on this CPU: {cpu_report()}"


def _get(root: nn.Module, name: str):
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


# --------------------------------------------------------------------------- graph picture
_INT8_FILL, _SKIP_FILL, _OTHER_FILL, _MIXED_FILL = "#8fd694", "#f28b82", "#eeeeee", "#f2d082"


def graph_dot(qmodel: nn.Module, report: Report):
    """A pydot graph of every traced part of `qmodel`, INT8 sites highlighted (see Report.save_graph)."""
    try:
        import pydot
        from torch.fx.passes.graph_drawer import FxGraphDrawer
    except ImportError as e:  # pragma: no cover - pydot is a dev dependency
        raise RuntimeError(f"save_graph() needs pydot ({e}); pip install pydot") from e
    parts, _ = analysis_graphs(qmodel)
    if not parts:
        raise ValueError("this model has no traced graph to draw (nothing of it was traceable by torch.fx)")
    skipped = {r.name: r for r in report.skipped}
    out = pydot.Dot("int8fx", graph_type="digraph", rankdir="TB", fontname="Helvetica")
    legend = pydot.Cluster("legend", label="legend", fontsize="10")
    for key, fill, text in (("legend_int8", _INT8_FILL, "INT8 conv/linear"),
                            ("legend_fp", _SKIP_FILL, "conv/linear kept in FP32"),
                            ("legend_other", _OTHER_FILL, "other op (floating point)")):
        legend.add_node(pydot.Node(key, label=text, shape="box", style="filled", fillcolor=fill, fontsize="10"))
    out.add_subgraph(legend)
    for i, (prefix, gm) in enumerate(parts):
        drawer = FxGraphDrawer(gm, f"part{i}", ignore_getattr=True, ignore_parameters_and_buffers=True)
        g = drawer.get_dot_graph()
        target = out if len(parts) == 1 else pydot.Cluster(f"part{i}", label=prefix or "(root)")
        tag = "" if len(parts) == 1 else f"p{i}_"
        styles = {node.name: _node_style(gm, node, prefix, skipped) for node in gm.graph.nodes}
        for n in g.get_nodes():
            name = n.get_name().strip('"')
            if name in ("node", "edge", "graph"):
                continue
            attrs = dict(n.get_attributes())
            style = dict(styles.get(name, {"fillcolor": _OTHER_FILL}))
            note = style.pop("_note", None)
            label = attrs.get("label", "")
            quoted = label.startswith('"')
            body = label[1:-1] if quoted else label
            if note and body.endswith("}"):  # a record label "{a|b}": add a field
                body = body[:-1] + "|" + note + "}"
                attrs["label"] = f'"{body}"' if quoted else body
            attrs.update(style="filled", **style)
            attrs.pop("color", None)
            target.add_node(pydot.Node(tag + name, **attrs))
        for e in g.get_edges():
            target.add_edge(pydot.Edge(tag + e.get_source().strip('"'), tag + e.get_destination().strip('"')))
        if target is not out:
            out.add_subgraph(target)
    return out


def _node_style(gm: fx.GraphModule, node: fx.Node, prefix: str, skipped: dict[str, "LayerRow"]) -> dict:
    """Fill colour, tooltip and an extra label line for one node of an analysis graph."""
    if node.op == "call_module":
        mod = _get(gm, node.target)
        full = _join(prefix, node.target)
        if isinstance(mod, Int8Layer):
            return {"fillcolor": _INT8_FILL, "tooltip": f"INT8: {mod.site_name}",
                    "_note": f"INT8 X per-tensor, W per-channel\\ndY: {mod.grad_quantizer.policy}"}
        if isinstance(mod, (Rewritten, Routed)):
            inside = sorted(m.site_name for m in mod.modules() if isinstance(m, Int8Layer))
            fp32 = [r.name for r in skipped.values() if r.name.startswith(full)]
            fill = _INT8_FILL if inside and not fp32 else _SKIP_FILL if fp32 and not inside else _MIXED_FILL
            return {"fillcolor": fill, "tooltip": f"INT8 sites inside: {', '.join(inside) or '-'}; "
                                                  f"FP32: {', '.join(fp32) or '-'}",
                    "_note": f"{len(inside)} INT8 / {len(fp32)} FP32 sites inside"}
        row = skipped.get(full) or skipped.get(node.target)
        if row is not None:
            return {"fillcolor": _SKIP_FILL, "tooltip": f"FP32: {row.reason}", "_note": "FP32 (kept)"}
    elif node.op == "call_function" and node.target in _site_functions():
        owner = _join(prefix, _owner(node))
        reasons = sorted({r.reason for r in skipped.values() if r.source != "module" and r.owner == owner})
        return {"fillcolor": _SKIP_FILL, "tooltip": f"FP32: {'; '.join(reasons)}", "_note": "FP32 (kept)"}
    return {"fillcolor": _OTHER_FILL}


def _owner(node: fx.Node) -> str:
    """Path (inside the traced part) of the module whose code made this node."""
    stack = node.meta.get("nn_module_stack")
    if isinstance(stack, dict) and stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        return path if isinstance(path, str) else ""
    return ""


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


# --------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    from .cli import positive_int
    from .modelspec import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the full report (every field, every site) as JSON")
    parser.add_argument("--graph", metavar="PATH",
                        help="also draw the rewritten graph, INT8 sites in green, FP32 sites in red: .svg, .png, "
                             ".pdf (need Graphviz `dot`) or .dot")
    parser.add_argument("--width", type=positive_int, default=None,
                        help="table width in columns (default: the terminal's width, 120 when not a terminal)")


def run(args) -> int:
    from .cli import bad_input
    from .modelspec import load_converted

    try:  # (every bad input, output paths included, before the work)
        for path in filter(None, (args.json, args.graph)):
            check_writable(path)
        if args.graph:
            graph_format(args.graph)
        qm, example, label = load_converted(args)
    except ValueError as e:  # (ModelSpecError, OutputPathError, ConfigError)
        return bad_input("inspect", e)
    rep = inspect(qm, example, name=label)
    print(rep.render(width=args.width))
    if args.json:
        rep.to_json(args.json)
        print(f"report written to {args.json}")
    if args.graph:
        rep.save_graph(args.graph)
        print(f"graph written to {args.graph}")
    return 0
