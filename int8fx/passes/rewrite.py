"""Turn every conv/linear call site of a model into an INT8 site, in place, changing nothing else.

Three rules, one per way a model reaches a convolution or a linear layer:
  1. **Module sites.** An `nn.Conv1d/2d/3d` / `nn.Linear` (or a subclass that keeps their forward) gets
     its twin class `ModuleSite` (`int8fx.nn.twins`): same object, same parameters and hooks; whoever
     calls it now runs INT8.
  2. **Functional sites in a module's own code.** `trace_own_code` gives the graph of the module's own
     forward (children are leaves), with or without parameters of its own. Each `F.conv*d` / `F.linear`
     node becomes a call of a new `Int8Function` child, or of the module site whose weight it uses,
     whatever the weight is (a parameter, one computed from parameters as in weight standardisation, a
     buffer such as a fixed blur filter, an argument); an opaque (`torch.fx.wrap`-ped) function that
     receives module-site weights is called through `call_routed`. A linear layer written as a product,
     `x @ W` / `torch.mm(x, W)` / `torch.addmm(b, x, W)` with W a 2-D weight computed from parameters and
     x from the input, is first written as the `F.linear(x, W.t(), b)` it is (the same GEMM, the same
     bits), so it becomes a site like any other. The module becomes `Rewritten`: it
     runs that graph, one per training mode and per set of optional arguments passed as None where its
     code depends on them. Code that no graph would replay faithfully (`trace_own_code`'s `unfaithful`)
     is kept as it is, like code torch.fx cannot trace.
  3. **Code torch.fx cannot rewrite.** `nn.MultiheadAttention` (library code calling `F.linear` on its
     projection weights; a module's own call of `F.multi_head_attention_forward` on its Linear children's
     weights is routed like an opaque function), the Transformer layers' fused eval paths, and conv/linear subclasses whose own
     forward cannot be traced (timm's `Conv2dSame`) become `Routed`: their original forward runs with
     the calls on their weights routed to INT8 sites at run time (`int8fx.nn.scope`).
Every conv/linear module and every functional call found ends up in the `Site` list, converted or with
the reason it was not; uses of a conv/linear weight outside a conv/linear call, and products of the input
with a module's own weights in other forms than `x @ W` (`W @ x`, einsum, bmm), are listed too.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..config import Int8Config
from ..nn.modules import (FUNCTIONS_BY_DIMS, SITE_TYPES, TRANSPOSED_BY_DIMS, Int8Function, Int8Layer, ModuleSite,
                          int8_clashes, op_dims, out_channels_of, site_op, type_op)
from ..nn.scope import CONV_ARGS, TRANSPOSED_ARGS, call_routed
from ..nn.twins import Rewritten, Routed, become, is_twin
from .code_scan import function_may_call, may_call_site_ops
from .trace import OpaqueModule, OwnCode, trace_own_code

SITE_FUNCTIONS = {f: f.__name__ for f in FUNCTIONS_BY_DIMS.values()}  # {F.linear: "linear", F.conv1d: ...}
TRANSPOSED_FUNCTIONS = {f: f.__name__ for f in TRANSPOSED_BY_DIMS.values()}
CALL_OPS = {**SITE_FUNCTIONS, **TRANSPOSED_FUNCTIONS}  # the calls in a module's own code that become sites
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}
FUSED_FASTPATH_MODULES = (nn.TransformerEncoderLayer, nn.TransformerEncoder)
MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_METADATA_METHODS = {"size", "dim", "numel", "type", "is_contiguous", "stride"}

FilterFn = Callable[[str, nn.Module], bool]
ROOT = "(root)"  # the name of a site that is the model itself (a bare nn.Conv2d converted)


# the reasons for keeping a site in FP32 that are the user's own choice (every other reason is worth a warning)
EXCLUDED = "excluded by Int8Config.exclude"
FILTERED = "filter_fn returned False"
SCRIPTED = "a TorchScript module: its compiled code cannot be traced or changed"


@dataclass
class Site:
    """One conv/linear call site of the model, converted or not. `source`: "module" (a conv/linear module),
    "function" (a call in a module's own code, rewritten by torch.fx) or "routed" (a call in code torch.fx
    cannot rewrite, routed at run time)."""

    name: str
    op: str
    source: str
    converted: bool
    reason: str = ""
    owner: str = ""  # the module whose code makes the call (its own path for a module site)
    layer: Int8Layer | None = field(default=None, repr=False, compare=False)  # filled by `sites_of`


@dataclass
class Conversion:
    """int8fx's record of a conversion, kept on the converted model as `_int8fx`: plain data (the sites by
    name, not the modules), so deepcopy, pickle and `AveragedModel` carry it along."""

    config: Int8Config
    sites: list[Site]
    opaque: list[OpaqueModule]


def _standard_forward(module: nn.Module) -> bool:
    """Whether a conv/linear module computes what torch's own class does: its forward is torch's, and so is
    a conv's `_conv_forward` (which that forward calls: a subclass may override it alone, e.g. to
    standardise the weight, and a module site, which computes F.conv*d on `weight`, would skip it)."""
    base = next(t for t in SITE_TYPES if isinstance(module, t))
    return type(module).forward is base.forward and (
        getattr(type(module), "_conv_forward", None) is getattr(base, "_conv_forward", None))


def _library_code(module: nn.Module) -> bool:
    """A module whose forward comes from torch itself (Sequential, BatchNorm, ...): no conv/linear calls of
    its own beyond the ones rule 3 knows about. (A conv whose `_conv_forward` is the user's is not.)"""
    def from_torch(fn) -> bool:
        return (getattr(fn, "__module__", "") or "").startswith("torch.")

    cls = type(module)
    return from_torch(cls.forward) and from_torch(getattr(cls, "_conv_forward", cls.forward))


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


class Converter:
    """Applies the three rules to a model (in place) and collects the sites; `run()` returns the record."""

    def __init__(self, root: nn.Module, config: Int8Config, filter_fn: FilterFn | None = None) -> None:
        self.root, self.config, self.filter_fn = root, config, filter_fn
        self.sites: dict[str, Site] = {}
        self.opaque: list[OpaqueModule] = []
        self.index = 0
        self.module_sites: dict[int, tuple[str, Site]] = {}  # id(weight) -> (module path, its site)

    def run(self) -> Conversion:
        modules = list(self.root.named_modules())
        for path, m in modules:
            if site_op(m) is not None and _standard_forward(m):
                self.module_site(path, m)
        for path, m in modules:
            if not isinstance(m, ModuleSite):
                self.own_code(path, m)
        position = {path: i for i, (path, _) in enumerate(modules)}  # report in model order, owners first
        order = sorted(enumerate(self.sites.values()), key=lambda e: (position.get(e[1].owner, len(position)), e[0]))
        return Conversion(self.config, [s for _, s in order], self.opaque)

    # ------------------------------------------------------------------ shared
    def _report(self, site: Site) -> Site:
        self.sites.setdefault(site.name, site)
        return self.sites[site.name]

    def _skip_reason(self, name: str, module: nn.Module) -> str:
        if self.config.excludes(name, module):
            return EXCLUDED
        if self.filter_fn is not None and not self.filter_fn(name, module):
            return FILTERED
        return ""

    def _next_index(self) -> int:
        self.index += 1
        return self.index - 1

    def _new_function_site(self, op: str, out_channels: int, name: str, owner: nn.Module, source: str) -> Int8Function:
        return Int8Function(op, out_channels, config=self.config.for_layer(name, owner), name=name,
                            index=self._next_index(), source=source)

    # ------------------------------------------------------------------ rule 1
    def module_site(self, path: str, m: nn.Module) -> None:
        op = site_op(m)
        reason = self._skip_reason(path, m)
        if not reason and isinstance(m.weight, nn.parameter.UninitializedParameter):
            reason = "lazy module not initialised yet: run one forward before convert()"
        if not reason and m.weight.numel() == 0:
            reason = f"an empty weight {tuple(m.weight.shape)}: nothing to quantize"
        if not reason and int8_clashes(m):
            reason = f"has attributes of its own named {', '.join(int8_clashes(m))}, which INT8 state would overwrite"
        site = self._report(Site(path or ROOT, op, "module", not reason, reason, path))
        self.module_sites[id(m.weight)] = (path, site)
        if reason:
            return
        become(m, ModuleSite)
        m.setup_int8(op=op, out_channels=out_channels_of(m), config=self.config.for_layer(path, m), name=path or ROOT,
                     index=self._next_index(), source="module", owns_params=True)

    # ------------------------------------------------------------------ rules 2 and 3
    def own_code(self, path: str, m: nn.Module) -> None:
        if isinstance(m, nn.MultiheadAttention):
            return self.route_attention(path, m)
        if isinstance(m, FUSED_FASTPATH_MODULES):
            return self._make_routed(m, {}, {})
        if isinstance(m, torch.jit.ScriptModule):
            return self.scripted(path, m)
        if _library_code(m):
            return None
        code = trace_own_code(m)
        if isinstance(code, str):
            return self.untraceable(path, m, code)
        if code.unfaithful and self._has_calls_to_rewrite(m, code):
            return self.untraceable(path, m, code.unfaithful)  # it has calls to rewrite, and cannot be rewritten
        return self.rewrite(path, m, code)  # (code that only cannot be replayed has nothing to change here)

    def _has_calls_to_rewrite(self, m: nn.Module, code: OwnCode) -> bool:
        """Whether rewriting would change the module's code: a conv/linear call, or an opaque function given a
        converted module site's weight (what `rewrite` changes)."""
        return any((n.op == "call_function" and (n.target in CALL_OPS or (
            _is_opaque_function(n.target) and self._routes(m, n)))) or _product_weight(m, n) is not None
            for g in code.graphs.values() for n in g.nodes)

    def _make_routed(self, m: nn.Module, routes: dict[str, str], new_sites: dict[str, Int8Function],
                     derived_op: str | None = None) -> None:
        become(m, Routed)
        for attr, site in new_sites.items():
            m.add_site(attr, site)
        m._int8fx_routes = routes
        m._int8fx_derived_op = derived_op  # calls of this op with a weight of the routed one's shape are routed too
        m._int8fx_quantize = self.config.quantize

    def route_attention(self, path: str, m: nn.MultiheadAttention) -> None:
        """nn.MultiheadAttention calls F.linear on its packed projection weights (new sites) and on
        `out_proj.weight` (a module site, routed to itself)."""
        routes, new = {}, {}
        for pname in MHA_WEIGHTS:
            w = getattr(m, pname, None)
            if not isinstance(w, nn.Parameter):
                continue
            name = _join(path, pname[: -len("_weight")])
            reason = self._skip_reason(name, m)
            self._report(Site(name, "linear", "routed", not reason, reason, path))
            if not reason:
                attr = f"int8_{pname[: -len('_weight')]}"
                new[attr] = self._new_function_site("linear", w.shape[0], name, m, "routed")
                routes[pname] = attr
        out = m.out_proj
        if isinstance(out, ModuleSite):
            routes["out_proj.weight"] = "out_proj"
        self._make_routed(m, routes, new)

    def scripted(self, path: str, m: torch.jit.ScriptModule) -> None:
        """A TorchScript module (torch.jit.script / trace) runs compiled code that fx can neither trace nor change,
        and it is no instance of nn.Conv2d even when scripted from one: a scripted torch conv/linear (known by
        its original class name) is listed as a site in full precision, any other module of the scripted tree
        holding conv/linear-shaped weights as opaque code."""
        op = next((type_op(t) for t in SITE_TYPES if t.__name__ == m.original_name), None)
        if op is not None:
            self._report(Site(path or ROOT, op, "module", False, SCRIPTED, path))
            return
        weights = tuple(n for n, w in m.named_parameters(recurse=False) if 2 <= w.dim() <= 5)
        if weights:
            self.opaque.append(OpaqueModule(path or "(root)", m.original_name, SCRIPTED, weights, True))

    def untraceable(self, path: str, m: nn.Module, reason: str) -> None:
        op = site_op(m)
        if op is None:  # its conv/linear children are module sites; its own code is kept as it is
            if any(p.dim() >= 2 for p in m.parameters(recurse=False)) or any(
                    site_op(c) is not None for c in m.modules() if c is not m):
                # listed because its code could make conv/linear calls that int8fx did not see
                weights = tuple(n for n, w in m.named_parameters(recurse=False) if 2 <= w.dim() <= 5)
                self.opaque.append(OpaqueModule(path or "(root)", type(m).__name__, reason, weights,
                                                may_call_site_ops(m) if weights else True))
            return
        # a conv/linear subclass whose forward fx cannot trace (timm's Conv2dSame): route its weight
        skip = self._skip_reason(path, m)
        self._report(Site(path, op, "routed", not skip, skip, path))
        if not skip:
            site = self._new_function_site(op, out_channels_of(m), path, m, "routed")
            self._make_routed(m, {"weight": f"int8_{op}"}, {f"int8_{op}": site}, derived_op=op)

    def rewrite(self, path: str, m: nn.Module, code: OwnCode) -> None:
        graphs = code.graphs
        m.__dict__.update(code.constants)  # the graphs read them from the module (a weight may be made from one)
        for graph in graphs.values():
            _products_as_linear(m, graph)
        calls = [n for n in next(iter(graphs.values())).nodes if n.op == "call_function" and n.target in CALL_OPS]
        single = site_op(m) is not None and len(calls) == 1  # a conv subclass computing its own weight
        new: dict[tuple, tuple[str, Int8Function, str]] = {}  # call -> (attribute, site, name), shared by all graphs
        changed = False
        for graph in graphs.values():
            derived: set[fx.Node] = set()
            occurrences: dict[tuple, int] = {}
            for node in list(graph.nodes):
                if node.op == "call_function" and node.target in CALL_OPS:
                    changed |= self._rewrite_call(path, m, graph, node, new, single, derived, occurrences)
                elif node.op == "call_function" and _is_opaque_function(node.target):
                    changed |= self._route_call(path, m, graph, node, new)
            self._report_other_weight_uses(path, m, graph, derived)
            self._report_other_products(path, m, graph, derived)
            graph.lint()
        if changed:
            become(m, Rewritten)
            for attr, site, _ in new.values():
                m.add_site(attr, site)
            m._int8fx_graphs = graphs
            m._int8fx_traced_with = code.traced_with
            m._int8fx_optional = code.optional
            m.compile_forwards()
        else:  # the module keeps its own code
            for name in code.constants:
                del m.__dict__[name]

    def _module_site_of(self, m: nn.Module, node) -> tuple[str, Site] | None:
        """(path inside m, site) when `node` reads the weight of a conv/linear module site."""
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            return None
        owner, _, leaf = node.target.rpartition(".")
        if leaf != "weight" or not owner:
            return None
        found = self.module_sites.get(id(_attr(m, node.target)))
        return None if found is None else (owner, found[1])

    def _rewrite_call(self, path, m, graph, node, new, single, derived, occurrences) -> bool:
        op = CALL_OPS[node.target]
        transposed = node.target in TRANSPOSED_FUNCTIONS
        args = {**({} if op == "linear" else _CONV_DEFAULTS), "bias": None,
                **dict(zip(TRANSPOSED_ARGS if transposed else CONV_ARGS, node.args)), **node.kwargs}
        call_args = [args["input"], args["weight"], args["bias"]]  # in `Int8Layer.int8_functional`'s order
        if op != "linear":
            call_args += [args["stride"], args["padding"], args["dilation"], args["groups"]]
        if transposed:
            call_args.append(args["output_padding"])
        derived.update(_ancestors(args["weight"]))
        used = self._module_site_of(m, args["weight"])
        if used is not None and used[1].op != op:  # a tied weight in another kind of call: a site of its own
            used = None
        if used is not None:  # e.g. F.linear(x, self.qkv.weight, bias): that module site computes it
            owner, site = used
            if not site.converted:
                self._report(Site(_join(path, node.name), op, "function", False,
                                  f"uses the weight of {site.name}, which is kept in FP32: {site.reason}", path))
                return False
            with graph.inserting_before(node):
                new_node = graph.call_method("int8_functional", (graph.get_attr(owner), *call_args))
        else:
            key = _call_key(node, args["weight"], occurrences)
            name = new[key][2] if key in new else path if single else _join(path, node.name)
            reason = self._skip_reason(name, m)
            self._report(Site(name, op, "function", not reason, reason, path))
            if reason:
                return False
            if key not in new:
                # a weight computed from the model input (CondConv's per-sample expert mix) has its channel
                # count only at run time: 0 here, and the site sizes its state at the first call
                weight = _static_value(m, args["weight"])
                channels = 0 if weight is None else weight.shape[0]
                if transposed:  # W's dim 1 per group, where the groups are known now
                    channels = weight.shape[1] * args["groups"] if weight is not None and isinstance(
                        args["groups"], int) else 0
                new[key] = (_free_attr(m, f"int8_{node.name}"), self._new_function_site(
                    op, channels, name, m, "function"), name)
            attr = new[key][0]
            with graph.inserting_before(node):
                new_node = graph.call_module(attr, tuple(call_args))
        new_node.meta = dict(node.meta)
        node.replace_all_uses_with(new_node)
        graph.erase_node(node)
        return True

    def _route_call(self, path, m, graph, node, new) -> bool:
        """`fn(..., self.qkv.weight, ...)` with fn opaque to torch.fx: call it through `call_routed`. Where fn's
        code may also use a conv weight in the other kind of conv (a conv's weight in a transposed conv: a tied
        decoder), those calls get a site of their own, as in traced code (`_rewrite_call`)."""
        routes = self._routes(m, node)
        if not routes:
            return False
        for key, owner in list(routes.items()):
            other = OTHER_KIND.get(_attr(m, owner).site_op)
            if other is None or not function_may_call(node.target, re.compile(other)):
                continue
            name = _join(path, f"{node.name}.{other}")
            reason = self._skip_reason(name, m)
            self._report(Site(name, other, "routed", not reason, reason, path))
            if reason:
                continue
            call = ("routed", node.target, owner, other)  # the same call in each of the module's graphs
            if call not in new:  # (channels 0: a transposed conv's need its groups, known when called)
                new[call] = (_free_attr(m, f"int8_{node.name}_{other}"),
                             self._new_function_site(other, 0, name, m, "routed"), name)
            routes[(key, other)] = new[call][0]
        fn_attr = f"_int8fx_fn_{node.name}"  # the function itself: a graph argument cannot hold one
        m.__dict__[fn_attr] = node.target
        with graph.inserting_before(node):
            table = {k: graph.get_attr(owner) for k, owner in routes.items()}
            new_node = graph.call_function(call_routed, (graph.get_attr(fn_attr), table, *node.args), dict(node.kwargs))
        new_node.meta = dict(node.meta)
        node.replace_all_uses_with(new_node)
        graph.erase_node(node)
        return True

    def _routes(self, m: nn.Module, node: fx.Node) -> dict:
        """{argument position or keyword: path of the converted module site} for the module-site weights
        that the call `node` receives."""
        routes = {}
        for key, a in list(enumerate(node.args)) + list(node.kwargs.items()):
            used = self._module_site_of(m, a)
            if used is not None and used[1].converted:
                routes[key] = used[0]
        return routes

    def _report_other_weight_uses(self, path, m, graph, derived) -> None:
        """A conv/linear weight that the module's code uses outside a conv/linear call (`x @ w.t()`) is not a
        site int8fx converts: say so rather than let it pass unnoticed."""
        for node in graph.nodes:
            if node.op != "get_attr" or self._module_site_of(m, node) is None:
                continue
            for user in node.users:
                if user in derived or _is_site_call(user) or _is_metadata_use(user):
                    continue
                what = getattr(user.target, "__name__", str(user.target))
                self._report(Site(_join(path, user.name), what, "function", False,
                                  f"computes with {_join(path, node.target)} outside a conv/linear call "
                                  f"({what}); int8fx converts F.conv*d / F.linear calls only", path))

    def _report_other_products(self, path, m, graph, derived) -> None:
        """A product of the input with the module's own weights in another form than `x @ W` (`W @ x`, an
        einsum, a bmm) is a linear layer int8fx does not convert: listed, as an unconverted site, rather
        than left to run in FP32 unnoticed."""
        for node in graph.nodes:
            if node.op not in ("call_function", "call_method") or node in derived or not (
                    node.target in _OTHER_PRODUCTS or node.target in _PRODUCTS or node.target in _PRODUCT_METHODS):
                continue
            operands = [a for a in node.args if isinstance(a, fx.Node)]
            learned = sorted({p for a in operands if not _from_input(a) for p in _parameters_in(m, a)})
            if learned and any(_from_input(a) for a in operands):
                what = getattr(node.target, "__name__", str(node.target))
                self._report(Site(_join(path, node.name), what, "function", False,
                                  f"a product of the input with {', '.join(_join(path, t) for t in learned)} in "
                                  f"another form than x @ W ({what}); int8fx converts F.conv*d / F.linear calls "
                                  "and x @ W products", path))


# ---------------------------------------------------------------------------------------------- helpers
_PRODUCTS = {operator.matmul, torch.matmul, torch.mm}  # (and torch.addmm, with its bias)
_PRODUCT_METHODS = {"matmul", "mm", "__matmul__"}
_OTHER_PRODUCTS = {torch.bmm, torch.einsum, torch.tensordot, torch.baddbmm}  # listed, not converted


def _from_input(node: fx.Node) -> bool:
    return any(n.op == "placeholder" for n in _ancestors(node))


def _parameters_in(m: nn.Module, node: fx.Node) -> set[str]:
    """The parameters of `m` (attribute paths) that `node` is computed from."""
    return {n.target for n in _ancestors(node) if n.op == "get_attr" and isinstance(_attr_or_none(m, n.target),
                                                                                     nn.Parameter)}


def _product_operands(node: fx.Node) -> tuple | None:
    """(x, W, bias or None) of `x @ W`, `torch.matmul/mm(x, W)`, `x.matmul/mm(W)`, `torch.addmm(b, x, W)`."""
    if node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    if len(node.args) == 2 and ((node.op == "call_function" and node.target in _PRODUCTS) or (
            node.op == "call_method" and node.target in _PRODUCT_METHODS)):
        return node.args[0], node.args[1], None
    if len(node.args) == 3 and node.op == "call_function" and node.target is torch.addmm:
        return node.args[1], node.args[2], node.args[0]
    return None


def _product_weight(m: nn.Module, node: fx.Node) -> fx.Node | None:
    """The right operand of a product (`_product_operands`) when it is computed from parameters of `m` and
    not from the input: a linear layer's weight, transposed (a product on a buffer, a fixed transform, is
    left alone)."""
    operands = _product_operands(node)
    if operands is None:
        return None
    w = operands[1]
    return w if _parameters_in(m, w) and not _from_input(w) else None


def _products_as_linear(m: nn.Module, graph: fx.Graph) -> None:
    """Write each `x @ W` (`_product_weight`) whose W is 2-D and whose x comes from the input as the
    `F.linear(x, W.t(), b)` it computes, which rule 2 then makes a site. Both call the same GEMM on the
    same operands (checked bit for bit on CPU for 2-, 3- and 4-d inputs, contiguous or not), so a
    conversion with `quantize=False` still equals the original."""
    weights = set().union(*(_ancestors(_call_weight(n)) for n in graph.nodes
                            if n.op == "call_function" and n.target in CALL_OPS))
    for node in list(graph.nodes):
        w = _product_weight(m, node)
        if w is None or node in weights:
            continue  # (a product that computes a conv/linear weight, as CondConv's expert mix, is part of it)
        x, _, b = _product_operands(node)
        weight = _static_value(m, w)
        if weight is None or weight.dim() != 2 or not _from_input(x):
            continue  # a batched weight, one computed from the input, or a product of weights
        if b is not None:
            bias = _static_value(m, b)
            if bias is None or tuple(bias.shape) != (weight.shape[1],):
                continue  # addmm's bias broadcast over rows is F.linear's only
        with graph.inserting_before(node):
            transposed = graph.call_method("t", (w,))
        # the node itself becomes the call, so the site keeps the name of the user's op ("matmul", "addmm")
        node.op, node.target = "call_function", F.linear
        node.args, node.kwargs = (x, transposed, *(() if b is None else (b,))), {}


def _call_weight(node: fx.Node):
    """The weight argument of a conv/linear call node (positional or keyword)."""
    return node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)


def _attr_or_none(module: nn.Module, target: str):
    try:
        return _attr(module, target)
    except AttributeError:
        return None


def _call_key(node: fx.Node, weight, occurrences: dict) -> tuple:
    """Which call of the module's code `node` is, the same in each of its graphs (training modes, optional
    arguments given or not), so that they share its site: the k-th call of its op on the same weight
    attribute, or, for a weight the code computes, by node name. (Node names are numbered in order of
    appearance: a call that one graph skips renumbers the calls after it.)"""
    base = (node.target, weight.target) if isinstance(weight, fx.Node) and weight.op == "get_attr" else (node.name,)
    occurrences[base] = occurrences.get(base, 0) + 1
    return (*base, occurrences[base])


# the other kind of conv that a conv's weight can be used in (and back): a tied decoder's transposed conv
OTHER_KIND = {**{f"conv{d}d": f"conv_transpose{d}d" for d in (1, 2, 3)},
              **{f"conv_transpose{d}d": f"conv{d}d" for d in (1, 2, 3)}}


# torch functions that torch.fx records as one call and whose body calls F.linear on weights it is given: CLIP's
# attention pooling (open_clip's ModifiedResNet) passes its q/k/v/c projections' weights to the first
ROUTABLE_TORCH_FUNCTIONS = (F.multi_head_attention_forward,)


def _is_opaque_function(target) -> bool:
    """A function the tracer did not enter and that is not a torch/python builtin (e.g. torch.fx.wrap-ped), or
    a torch function that calls F.linear on weights it is given (`ROUTABLE_TORCH_FUNCTIONS`)."""
    if any(target is f for f in ROUTABLE_TORCH_FUNCTIONS):
        return True
    mod = (getattr(target, "__module__", None) or "").split(".")[0]
    return callable(target) and mod not in ("torch", "_operator", "operator", "builtins", "math", "int8fx")


def _is_site_call(node: fx.Node) -> bool:
    return (node.op == "call_module" and str(node.target).startswith("int8_")) or node.target in (
        "int8_functional", call_routed)


def _is_metadata_use(node: fx.Node) -> bool:
    """Reading a weight's shape, dtype or device computes nothing with its values."""
    return (node.op == "call_function" and node.target is getattr) or (
        node.op == "call_method" and node.target in _METADATA_METHODS)


def _ancestors(node) -> set[fx.Node]:
    """`node` and every node it is computed from."""
    seen, todo = set(), [node] if isinstance(node, fx.Node) else []
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _attr(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _free_attr(m: nn.Module, attr: str) -> str:
    name, k = attr, 1
    while hasattr(m, name):
        name, k = f"{attr}_{k}", k + 1
    return name


def _static_value(m: nn.Module, arg):
    """Evaluate a weight argument that depends only on parameters/buffers (get_attr and pure ops on them,
    including child modules); None when it depends on the model input."""
    if isinstance(arg, torch.Tensor):
        return arg
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr":
        obj = _attr(m, arg.target)
        return obj.detach() if isinstance(obj, torch.Tensor) else None
    if arg.op not in ("call_function", "call_method", "call_module"):
        return None
    vals = []
    for a in arg.args:
        v = _static_value(m, a) if isinstance(a, fx.Node) else a
        if isinstance(a, fx.Node) and v is None:
            return None
        vals.append(v)
    kwargs = {}
    for k, a in arg.kwargs.items():
        kwargs[k] = _static_value(m, a) if isinstance(a, fx.Node) else a
        if isinstance(a, fx.Node) and kwargs[k] is None:
            return None
    with torch.no_grad():
        if arg.op == "call_function":
            out = arg.target(*vals, **kwargs)
        elif arg.op == "call_method":
            out = getattr(vals[0], arg.target)(*vals[1:], **kwargs)
        else:
            out = m.get_submodule(arg.target)(*vals, **kwargs)
    return out if isinstance(out, torch.Tensor) else None


def rewrite(model: nn.Module, config: Int8Config, filter_fn: FilterFn | None = None) -> Conversion:
    """Apply the three rules to `model` in place; the record of every site found."""
    if any(is_twin(m) for m in model.modules()):
        raise ValueError("this model is already converted by int8fx (int8fx.to_float gives back the float model)")
    return Converter(model, config, filter_fn).run()


__all__ = ["Conversion", "Converter", "SITE_FUNCTIONS", "Site", "op_dims", "rewrite"]
