"""PyTorch 2: the INT8 op as torch.library ops under torch.compile (fullgraph, no recompiles, equal to
eager), torch.export (one node per site), torch.func, and a training step with no host synchronisation.
resnet18/mobilenet_v2 under inductor are `-m slow` (minutes of compilation on a 2-core CPU); their step and
compile times are in benchmarks/RESULTS.md (benchmarks/compile_step.py)."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import int8fx
from int8fx.kernels.windows import DECIDE_AT
from int8fx.nn import Int8Layer

X = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))


def small(policy: str = "gvq-mcs", seed: int = 0, rounding: str = "stochastic") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10))
    return int8fx.convert(net, int8fx.Int8Config(grad_quant=policy, seed=seed, rounding=rounding))


def sites(model: nn.Module) -> list[Int8Layer]:
    return [m for m in model.modules() if isinstance(m, Int8Layer)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_no_graph_breaks():
    explain = torch._dynamo.explain(small())(X)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


class _StdConv(nn.Conv2d):
    """A conv that computes its own weight and calls F.conv2d (timm's StdConv2d, ScaledStdConv2d): int8fx
    runs its forward as rewritten by torch.fx."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("copied", [False, True])
def test_a_rewritten_forward_compiles_in_fullgraph_on_its_first_call(copied):
    """The Python function of a rewritten forward is made from its fx graph when the graph is set (and when
    a copy is unpickled), not at the first call, which may be inside torch.compile: dynamo cannot trace
    the code generation (timm's lcnet_100 and nfnet_l0 failed `fullgraph=True` with "Attempted to inline
    function marked as skipped: Graph.python_code")."""
    torch.manual_seed(0)
    qm = int8fx.convert(nn.Sequential(_StdConv(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 10)))
    assert type(qm[0]).__name__ == "Int8_StdConv"  # rewritten, not a module site
    if copied:
        qm = copy.deepcopy(qm)
    out = torch.compile(qm, fullgraph=True, backend="aot_eager")(X)
    out.sum().backward()
    assert qm[0].weight.grad is not None and torch.isfinite(qm[0].weight.grad).all()


def test_each_int8_op_compiled_equals_eager_bit_for_bit():
    """One site compiled (forward and backward, fullgraph) against the same site in eager mode: output,
    dX, dW, db and the staged quantizer state are identical, step after step; after the first step
    nothing recompiles."""
    torch.manual_seed(0)
    eager = int8fx.convert(nn.Conv2d(3, 8, 3, padding=1))
    compiled_site = copy.deepcopy(eager)
    compiled = torch.compile(compiled_site, fullgraph=True, backend="aot_eager")
    for step in range(3):
        x = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(step))
        dy = torch.randn(4, 8, 9, 9, generator=torch.Generator().manual_seed(10 + step))
        outs = []
        for model, fn in ((eager, eager), (compiled_site, compiled)):
            model.zero_grad()
            xx = x.clone().requires_grad_()
            y = fn(xx)
            y.backward(dy)
            int8fx.commit(model)
            outs.append((y.detach(), xx.grad, model.weight.grad, model.bias.grad, model.state_dict()))
        (y0, dx0, dw0, db0, s0), (y1, dx1, dw1, db1, s1) = outs
        assert torch.equal(y0, y1) and torch.equal(dx0, dx1) and torch.equal(dw0, dw1) and torch.equal(db0, db1)
        assert all(torch.equal(s0[k], s1[k]) for k in s0), step
        torch._dynamo.config.error_on_recompile = True  # from the second step on, any recompile fails
    torch._dynamo.config.error_on_recompile = False


def _train(model, steps, compiled=False):
    fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(100 + step))
        y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(200 + step))
        opt.zero_grad()
        F.cross_entropy(fn(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_compiled_training_agrees_with_eager_within_the_seed_to_seed_spread():
    """The whole compiled step (BatchNorm, ReLU, pooling decomposed by AOTAutograd around the opaque INT8
    ops) against eager: after 4 SGD steps the parameters differ less than two eager runs whose stochastic
    rounding seeds differ."""
    eager, eager_seed1 = _train(small(seed=0), 4), _train(small(seed=1), 4)
    compiled = _train(small(seed=0), 4, compiled=True)
    spread = (eager - eager_seed1).norm()
    assert spread > 0
    assert (compiled - eager).norm() < spread / 10


@pytest.mark.parametrize("train", [True, False])
def test_torch_export_gives_one_int8fx_node_per_site(train):
    qm = small().train(train)
    ep = torch.export.export(qm, (X,))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "int8fx.gemm" in str(n.target)]
    assert len(nodes) == len(sites(qm)) == 3
    assert all(str(n.target) == "int8fx.gemm.default" for n in nodes)  # forward op only: no decomposition
    out = ep.module()(X)
    assert out.shape == (8, 10)


SYNC_METHODS = ("__bool__", "item", "tolist", "cpu", "numpy", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_syncs():
    """Count every Python-level read of a tensor value on the host (what waits for a GPU)."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            calls.append(name)
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("policy", ["gvq-mcs", "dsgc", "per-tensor"])
def test_a_training_step_reads_nothing_on_the_host(policy):
    """Forward, backward and an optimizer step with DCLRS: not one host read of a tensor value (finiteness,
    clips, step counters, DSGC's period and the rounding keys all stay on the device)."""
    warm = small(policy)  # compiles the fused passes first: tracing wraps Python floats in tensors and reads
    F.cross_entropy(warm(X), Y).backward()  # them back (`item`), which is no host read of the step's data
    qm = small(policy)
    opt = int8fx.DeviationLRScaler(torch.optim.SGD(qm.parameters(), lr=0.1, momentum=0.9), qm)
    for step in range(3):  # includes a DSGC search step and reuse steps (period 10: search at 0)
        with count_host_syncs() as calls:
            opt.zero_grad()
            loss = F.cross_entropy(qm(X), Y)
            loss.backward()
            opt.step()
        assert calls == [], (step, calls)
    assert all(int(m.step) == 3 for m in sites(qm))


@pytest.mark.cuda
def test_a_cuda_training_step_never_synchronises():
    qm = small().cuda()
    opt = int8fx.DeviationLRScaler(torch.optim.SGD(qm.parameters(), lr=0.1, momentum=0.9), qm)
    x, y = X.cuda(), Y.cuda()
    for _ in range(DECIDE_AT):  # warm-up: allocator, kernel caches, and the im2col variant measured once per shape
        opt.zero_grad()
        F.cross_entropy(qm(x), y).backward()
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(qm(x), y).backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _resnet_step(policy: str):
    """resnet18 at 32 px, batch 16, converted, on the GPU (tensors big enough for the compiled passes and the
    per-shape im2col choice), with SGD momentum under DCLRS, and its training step. Without its max pooling,
    whose CUDA backward adds with atomics in no fixed order: two eager runs would differ in the last bits."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.maxpool = nn.Identity()
    qm = int8fx.convert(net, int8fx.Int8Config(grad_quant=policy, rounding="stochastic")).cuda()
    opt = int8fx.DeviationLRScaler(torch.optim.SGD(qm.parameters(), lr=0.05, momentum=0.9), qm)

    def step(x, y):
        loss = F.cross_entropy(qm(x), y)
        loss.backward()
        opt.step()
        return loss
    return qm, opt, step


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["gvq-mcs", "dsgc"])
def test_a_cuda_training_step_captured_in_a_cuda_graph_replays_the_eager_steps(policy):
    """A whole INT8 training step (forward, backward, optimizer step) captured with `torch.cuda.graph` after
    a few eager warm-up steps (PyTorch's recipe) computes, replay after replay, the steps eager mode
    computes: the same losses, weights and quantizer state, bit for bit. What it takes: no host sync, no
    host-side per-step state (the rounding keys, DSGC's periods, the state commit are device tensors), and
    the per-shape choices made by the warm-up (`int8fx.WARMUP_STEPS`)."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(16, 3, 32, 32, generator=g).cuda() for _ in range(int8fx.WARMUP_STEPS + 3)]
    ys = [torch.randint(0, 10, (16,), generator=g).cuda() for _ in xs]
    warm = int8fx.WARMUP_STEPS
    # a first model takes the process's per-shape steps (the exact-shape variants of the compiled passes,
    # the im2col choice) so that both runs below use the same kernels from their first step: a compiled
    # reduction's variants may sum in different orders (int8fx.fusing), which is not what this test is about
    _, warm_opt, warm_step = _resnet_step(policy)
    for x, y in zip(xs[:warm], ys[:warm]):
        warm_opt.zero_grad(set_to_none=True)
        warm_step(x, y)
    eager, eager_opt, eager_step = _resnet_step(policy)
    want = []
    for x, y in zip(xs, ys):
        eager_opt.zero_grad(set_to_none=True)
        want.append(eager_step(x, y).detach().clone())

    qm, opt, step = _resnet_step(policy)
    static_x, static_y = xs[0].clone(), ys[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in zip(xs[:warm], ys[:warm]):
            opt.zero_grad(set_to_none=True)
            step(x, y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step(static_x, static_y)
    got = []
    for x, y in zip(xs[warm:], ys[warm:]):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        got.append(static_loss.detach().clone())
    assert torch.equal(torch.stack(got), torch.stack(want[warm:]))
    for (name, a), b in zip(qm.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(int(m.step) == len(xs) for m in sites(qm))


_FIRST_CALL_TRACED = """
import torch, torch.nn as nn, int8fx
from int8fx.kernels import probe
qm = int8fx.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)))
x = torch.randn(2, 3, 8, 8)
if "{how}" == "export":
    n = sum("int8fx" in str(node.target) for node in torch.export.export(qm.train(), (x,)).graph.nodes)
else:
    torch.compile(qm, fullgraph=True, backend="aot_eager")(x).sum().backward()
    n = 2
print(n, probe.cpu_choice().backend, torch._C._get_mkldnn_enabled())
"""


@pytest.mark.parametrize("how", ["export", "compile"])
def test_a_fresh_process_can_trace_before_it_runs_a_step(how):
    """torch.export or torch.compile as a process's first INT8 call: the op's fake implementation asks which
    backend runs (`backend="auto"`), and the one-time CPU probes then ran inside the trace: on fake tensors
    (export failed: "Pending unbacked symbols") and with oneDNN off (`torch._int_mm` measured 0.05x the fp32
    GEMM: "auto" took the slow reference for the process). They run outside it now (`fusing.outside_traces`)
    and choose what a process that starts with an eager step chooses."""
    import subprocess
    import sys

    from int8fx.kernels import probe

    out = subprocess.run([sys.executable, "-c", _FIRST_CALL_TRACED.format(how=how)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", probe.cpu_choice().backend, "True"]


def test_torch_func_grad_with_functional_call_and_buffers():
    """torch.func.grad over functional_call: the same gradients as autograd, and the state the step computes
    goes to the buffers passed in, not to the module's own."""
    from torch.func import functional_call, grad

    qm = small(rounding="nearest")
    ref = copy.deepcopy(qm)
    params = {k: v.detach() for k, v in qm.named_parameters()}
    buffers = {k: v.clone() for k, v in qm.named_buffers()}

    def loss(p, b):  # the buffers are an input: torch.func forbids mutating captured tensors
        return F.cross_entropy(functional_call(qm, (p, b), (X,)), Y)

    g = grad(loss)(params, buffers)
    F.cross_entropy(ref(X), Y).backward()
    for k, v in ref.named_parameters():
        assert torch.equal(g[k], v.grad), k
    assert int(buffers["0.pending.step"]) == 1 and float(buffers["0.pending.act_clip"]) > 0
    assert int(qm[0].pending.get("step")) == 0 and float(qm[0].pending.get("act_clip")) == 0


def test_the_weight_gradient_does_not_depend_on_whether_the_input_needs_one():
    """dX and dW draw from separate streams: turning dX off (the first layer's input) leaves dW unchanged."""
    a, b = small(), small()
    a(X.clone().requires_grad_()).sum().backward()
    b(X).sum().backward()
    assert torch.equal(a[0].weight.grad, b[0].weight.grad)


def test_the_ops_signatures_are_ones_the_oldest_supported_torch_infers_a_schema_from():
    """torch 2.5 infers a custom op's schema from `typing.List[...]` annotations only: a `list[Tensor]` one
    made `import int8fx` itself fail there (found running the suite on torch 2.5.1; this torch accepts both,
    so the spelling is what is checked)."""
    import inspect

    from int8fx.nn.functional import gemm_backward_op, gemm_op
    from int8fx.onnx.qdq_op import qdq_gemm

    for op in (gemm_op, gemm_backward_op, qdq_gemm):
        signature = inspect.signature(op._init_fn)
        spelled = [str(p.annotation) for p in signature.parameters.values()] + [str(signature.return_annotation)]
        assert not [a for a in spelled if "list[" in a], (op, spelled)


def test_exactness_holds_under_reduced_precision_fp32_matmuls():
    """The reference GEMM reads no global precision setting: TF32/bf16-reduced fp32 matmuls hold the INT8
    operands and the fp32 sums exactly, so the result is the same."""
    a, b = small(rounding="nearest"), small(rounding="nearest")
    a(X).sum().backward()
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        b(X).sum().backward()
    finally:
        torch.set_float32_matmul_precision(prev)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def _resnet_or_mobilenet(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return int8fx.convert(torchvision.models.get_model(name, num_classes=10))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_inductor_trains_resnet18_and_mobilenet_v2_with_no_graph_break_or_recompile(name):
    qm = _resnet_or_mobilenet(name)
    x = torch.randn(4, 3, 32, 32)
    assert torch._dynamo.explain(qm)(x).graph_break_count == 0
    compiled = torch.compile(qm, fullgraph=True)
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    y = torch.randint(0, 10, (4,))
    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
        torch._dynamo.config.error_on_recompile = True
    torch._dynamo.config.error_on_recompile = False
    assert all(int(m.step) == 3 for m in sites(qm))


def test_opcheck_the_library_ops(monkeypatch):
    """torch.library.opcheck on every site's real call (a grouped conv, a plain conv, a linear): schema, fake
    implementations (shapes, dtypes, strides) and the autograd registration agree with the real op."""
    import int8fx.nn.modules as modules

    calls = []
    real = modules.int8_gemm
    monkeypatch.setattr(modules, "int8_gemm", lambda *args: calls.append(args) or real(*args))
    small()(X)
    assert len(calls) == 3
    for args in calls:
        args = (args[0].detach().requires_grad_(),) + args[1:]
        torch.library.opcheck(torch.ops.int8fx.gemm.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
