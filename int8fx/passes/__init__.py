"""The conversion pipeline: rewrite (find every conv/linear site, make it INT8 in place) -> lower (bind
backends). `convert` is their composition; `to_float` undoes it."""
from __future__ import annotations

import copy
import difflib
import fnmatch
import warnings
from dataclasses import replace

import torch
import torch.nn as nn

from ..config import Int8Config
from ..nn.modules import QUANT_STATE_KEY, Int8Layer, site_op
from ..nn.twins import is_twin, revert
from .lower import lower
from .rewrite import EXCLUDED, FILTERED, ROOT, Conversion, FilterFn, Site, rewrite
from .analysis import analysis_graphs
from .trace import OpaqueModule, trace_own_code

RECORD = "_int8fx"
REPLACED = "replaced after int8fx.convert by a plain {}: runs in full precision"
ADDED = "added after int8fx.convert: runs in full precision"
AFTER_CONVERT = ("; make such changes before int8fx.convert, or convert again: int8fx.convert(model) keeps the "
                 "trained state of every other site")


def convert(model: nn.Module, config: Int8Config | None = None, *, inplace: bool = False,
            filter_fn: FilterFn | None = None) -> nn.Module:
    """Make every conv/linear site of `model` train in INT8; return the converted model.

    The result is the user's model: same class, same module tree, same forward code, same train/eval
    behaviour; only conv/linear sites compute differently (see `int8fx.passes.rewrite` for the rules).
    inplace: convert `model` itself (optimizers and hooks made before keep working) instead of a copy.
    filter_fn: `(site name, module) -> bool`, False keeps that site in FP32 (as `Int8Config.exclude` does by
        name pattern or type); for a call in a module's own code, `module` is the module making the call.
    `int8fx.inspect(result)` lists every site and reason.

    A model converted before converts again as it is now, with the config it was converted with: a head
    replaced since (`reset_classifier`) or a conv added becomes a site, and every site that was there keeps
    its trained state (clips, gradient-quantizer statistics, step counts: `_reconvert`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("convert() needs the model's Python code, and this is a TorchScript module "
                        "(torch.jit.script / torch.jit.trace): convert the nn.Module before scripting it")
    config = Int8Config() if config is None else config
    if not isinstance(config, Int8Config):
        raise TypeError(f"config must be an Int8Config, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (name, module) -> bool, got {type(filter_fn).__name__}")
    holder, record = _record_holder(model)
    if record is not None or any(is_twin(m) for m in model.modules()):
        return _reconvert(model, holder, record, config, inplace=inplace, filter_fn=filter_fn)
    work = model if inplace else _copy(model, "convert")
    record = rewrite(work, config, filter_fn)
    lower(work, config.backend)
    setattr(work, RECORD, record)  # a plain attribute: not in state_dict, carried by deepcopy and pickle
    _warn_unintended_fp32(record)
    _warn_unmatched_patterns(record, config, work)
    return work


def _reconvert(model: nn.Module, holder: nn.Module | None, record: Conversion | None, config: Int8Config | None,
               *, inplace: bool, filter_fn: FilterFn | None) -> nn.Module:
    """Convert a converted model again, as it is now. Its int8fx state is a set of buffers keyed by module
    path (`QUANT_STATE_KEY`), and a conversion names its sites deterministically, so the state saved
    before `to_float` loads back into the sites that are still there; a new site starts fresh. Only the
    same config can carry it (another gradient policy has other statistics), and a `filter_fn` is not
    recorded, so one used before must be passed again."""
    if holder is not model:
        raise ValueError("this model is already converted by int8fx, or holds a converted model "
                         "(int8fx.to_float gives back the float model; convert the converted model itself to "
                         "convert it again)")
    if config is not None and config != record.config:
        raise ValueError("this model was converted with another Int8Config; converting again keeps its trained "
                         "state, which belongs to that config: convert int8fx.to_float(model) to start afresh "
                         "with a new one")
    if filter_fn is None and any(FILTERED in s.reason for s in record.sites):
        raise ValueError("this model was converted with a filter_fn, which int8fx does not keep: pass it again "
                         "to convert the model again")
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if QUANT_STATE_KEY.search(k)}
    work = to_float(model, inplace=inplace)
    work = convert(work, record.config, inplace=True, filter_fn=filter_fn)
    live = work.state_dict()
    work.load_state_dict({k: v for k, v in state.items() if k in live}, strict=False)
    return work


def _copy(model: nn.Module, caller: str) -> nn.Module:
    """A deep copy of `model`, or an error that says how to go on where torch cannot copy it (a pruned
    module's weight is a computed tensor, which deepcopy refuses)."""
    try:
        work = copy.deepcopy(model)
    except RuntimeError as e:
        raise RuntimeError(f"int8fx.{caller} works on a copy of the model (inplace=False), and torch cannot copy "
                           f"this one ({str(e).splitlines()[0][:200]}); pass inplace=True to change the model "
                           "itself") from e
    _scripted_parameters_as_leaves(work)
    return work


def _scripted_parameters_as_leaves(model: nn.Module) -> None:
    """torch's deepcopy of a TorchScript submodule gives it its parameters as clones (non-leaf tensors, grad_fn
    CloneBackward): they never get a .grad and an optimizer refuses them, so a copy would not train where the
    user's model did. They become parameters again, with the same values and requires_grad."""
    for m in model.modules():
        if isinstance(m, torch.jit.ScriptModule):
            for name, p in list(m.named_parameters(recurse=False)):
                if not p.is_leaf:
                    setattr(m, name, nn.Parameter(p.detach(), requires_grad=p.requires_grad))


def _warn_unintended_fp32(record: Conversion) -> None:
    """Say so where a site stays in FP32 for a reason other than the user's own exclusion (an uninitialised
    lazy module, a TorchScript submodule, ...), or may (a module whose code cannot be traced faithfully, with
    weights of its own that its code could pass to F.conv*d / F.linear): a model that silently trained in
    FP32 would look like an INT8 result."""
    kept = [f"{s.name}: {s.reason}" for s in record.sites
            if not s.converted and EXCLUDED not in s.reason and FILTERED not in s.reason]
    unseen = [f"{o.name} ({o.type}) uses its own {', '.join(o.weights)} in code int8fx cannot rewrite ({o.reason})"
              for o in record.opaque if o.weights and o.may_call]
    said = [f"{len(items)} {what} ({'; '.join(items[:4])}{'; ...' if len(items) > 4 else ''})"
            for items, what in ((kept, "conv/linear site(s) stay in full precision"),
                                (unseen, "module(s) may make F.conv*d / F.linear calls int8fx cannot see, which stay "
                                         "in full precision"))
            if items]
    if said:
        warnings.warn(f"int8fx.convert: {'; '.join(said)}; int8fx.inspect(model) lists every site", stacklevel=3)


def _warn_unmatched_patterns(record: Conversion, config: Int8Config, model: nn.Module) -> None:
    """Say so where an `exclude` or `overrides` pattern matches no site: a name mistyped
    (`"layer4.conv*"` for `"layer4.*"`) would otherwise leave the layers it meant in INT8, or on the
    default policy, without a word."""
    modules = dict(model.named_modules())
    owners = [modules.get(s.owner) for s in record.sites]
    names = [s.name for s in record.sites]

    def matches(pattern) -> bool:
        if isinstance(pattern, str):
            return any(fnmatch.fnmatchcase(n, pattern) for n in names)
        return any(isinstance(m, pattern) for m in owners)

    unmatched = [(field, p) for field, patterns in (("exclude", config.exclude), ("overrides", config.overrides))
                 for p in patterns if not matches(p)]
    if not unmatched:
        return
    said = []
    for field, p in unmatched:
        close = difflib.get_close_matches(p, names, n=3) if isinstance(p, str) else []
        what = repr(p) if isinstance(p, str) else p.__name__
        said.append(f"{field} {what}" + (f" (close: {', '.join(close)})" if close else ""))
    warnings.warn(f"int8fx.convert: Int8Config patterns that match no conv/linear site change nothing: "
                  f"{'; '.join(said)}. int8fx.inspect(model) lists the site names ('*' matches dots too)",
                  stacklevel=3)


def to_float(qmodel: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The float model back from a converted one: the original classes, the trained parameters (and the
    model's own buffers), without int8fx's state. A copy unless `inplace`."""
    if conversion_of(qmodel) is None and not any(is_twin(m) for m in qmodel.modules()):
        raise ValueError("to_float() needs a model returned by int8fx.convert()")
    work = qmodel if inplace else _copy(qmodel, "to_float")
    for m in list(work.modules()):
        revert(m)
        m.__dict__.pop(RECORD, None)
    return work


def conversion_of(model: nn.Module) -> Conversion | None:
    """The conversion record of `model`, or of the first submodule that has one (a converted model wrapped
    in `AveragedModel`, DDP, ...)."""
    return _record_holder(model)[1]


def _record_holder(model: nn.Module) -> tuple[nn.Module | None, Conversion | None]:
    """The module that carries the conversion record (site names are paths below it), and the record."""
    for m in model.modules():
        record = m.__dict__.get(RECORD)
        if record is not None:
            return m, record
    return None, None


def sites_of(model: nn.Module) -> list[Site]:
    """Every site of a converted model, in conversion order, each converted one with its live `layer`.

    The list is the model as it is now, not as `convert` left it, because users change models after
    conversion (timm's `reset_classifier`, `model.fc = nn.Linear(...)` for fine-tuning, MobileOne's
    re-parameterisation before deployment), and a report or export that still called a replaced head INT8
    would be wrong where it matters most. A converted site whose module was replaced by a plain one is
    reported in full precision (`REPLACED`), one whose module is gone is left out (it computes nothing), a
    conv/linear module added since is reported in full precision (`ADDED`), and a module converted on its
    own (`int8fx.convert(nn.Linear(...))`) and assigned in is a site named by its place in this model.
    """
    holder, record = _record_holder(model)
    if record is None:
        raise ValueError("this model was not converted by int8fx.convert()")
    live = dict(holder.named_modules())
    layers = {m.site_name: m for m in live.values() if isinstance(m, Int8Layer)}
    sites = []
    for s in record.sites:
        layer = layers.pop(s.name, None) if s.converted else None
        if s.converted and layer is None:
            if s.owner not in live or any(isinstance(m, Int8Layer) for m in live[s.owner].modules()):
                continue  # removed (it computes nothing), or replaced by a module converted on its own (below)
            s = replace(s, converted=False, reason=REPLACED.format(type(live[s.owner]).__name__) + AFTER_CONVERT)
        sites.append(replace(s, layer=layer))
    known = {s.name for s in record.sites} | {s.owner for s in record.sites}
    for path, m in live.items():
        if isinstance(m, Int8Layer) and layers.get(m.site_name) is m:  # converted on its own, assigned in
            m.site_name = path or ROOT  # the name calibration and export key it by
            sites.append(Site(m.site_name, m.site_op, m.source, True, "", path, m))
        elif not isinstance(m, Int8Layer) and site_op(m) is not None and (path or ROOT) not in known:
            sites.append(Site(path or ROOT, site_op(m), "module", False, ADDED + AFTER_CONVERT, path))
    return sites


__all__ = ["Conversion", "OpaqueModule", "Site", "analysis_graphs", "conversion_of", "convert", "lower", "rewrite",
           "sites_of", "to_float", "trace_own_code"]
