"""The op registry (``fxmerge.ops``): lookup, listing, ATen entries, user-registered ops, and that
no pass outside the registry names a torch layer class or functional op."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_invariant, nontrivial_permutations, randomize_, relative_error
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import fxmerge
from fxmerge import ops
from fxmerge.errors import LoadError, UnsupportedOpError
from fxmerge.passes.dependency import analyze_graph, state_name_map
from fxmerge.passes.units import find_units
from fxmerge.testing import permute_model

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten


# --------------------------------------------------------------------------------------------
# lookup and listing
# --------------------------------------------------------------------------------------------


class MyBatchNorm(nn.BatchNorm2d):
    """A subclass (like timm's BatchNormAct2d): found through its MRO."""


def test_lookup_by_class_subclass_function_method_and_aten_overload() -> None:
    conv = ops.lookup(nn.Conv2d)
    assert conv is ops.lookup(nn.Conv2d(3, 4, 1)) and conv.family == "conv_linear" and conv.layer and conv.consumes
    assert ops.lookup(MyBatchNorm) is ops.lookup(nn.BatchNorm2d)
    assert ops.lookup(MyBatchNorm).running_stats == ("running_mean", "running_var")
    assert ops.lookup(F.linear).layer and ops.lookup(F.linear).family == "conv_linear"
    assert ops.lookup("view").family == "shape" and ops.lookup("relu").family == "elementwise"
    # an OpOverload resolves through its OpOverloadPacket
    assert ops.lookup(aten.linear.default) is ops.lookup(aten.linear) and ops.lookup(aten.linear).layer
    assert ops.lookup(aten.add.Tensor).family == "aten"
    assert ops.lookup(aten.batch_norm.default).running_stats is not None
    assert ops.lookup(nn.Module) is None and ops.lookup("no_such_method") is None and ops.lookup(print) is None
    # torchvision's wrapped functions are matched as objects, once torchvision is imported
    from torchvision.models import swin_transformer
    from torchvision.ops import stochastic_depth

    assert ops.lookup(swin_transformer.shifted_window_attention).family == "torchvision"
    assert ops.lookup(stochastic_depth).family == "torchvision"


class _InPlaceForms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act, self.keep = nn.ReLU(inplace=True), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x + 1
        a += 2  # traced as a new value (operator.add), not a write
        a = a.add_(1).view(-1, 4).transpose(0, 1)
        b = F.relu(a, inplace=True)
        c = self.act(torch.relu_(b[0]))
        return self.keep(torch.tanh(c) @ a)


def test_writes_in_place_and_returns_view_name_pytorchs_in_place_and_view_ops() -> None:
    gm = torch.fx.symbolic_trace(_InPlaceForms())
    modules = dict(gm.named_modules())
    nodes = {node.name: node for node in gm.graph.nodes}
    writes = {name for name, node in nodes.items() if ops.writes_in_place(node, modules)}
    views = {name for name, node in nodes.items() if ops.returns_view(node, modules)}
    assert writes == {"add_", "relu", "relu_", "act"}, writes
    assert views == writes | {"view", "transpose", "getitem"}, views  # an in-place op returns its input
    graph = torch.fx.Graph()  # ATen ops: what their schemas say
    x = graph.placeholder("x")
    aten_nodes = {
        "add_": graph.call_function(aten.add_.Tensor, (x, x)),
        "view": graph.call_function(aten.view.default, (x, [-1])),
        "mm": graph.call_function(aten.mm.default, (x, x)),
    }
    assert [ops.writes_in_place(n, {}) for n in aten_nodes.values()] == [True, False, False]
    assert [ops.returns_view(n, {}) for n in aten_nodes.values()] == [True, True, False]


def test_user_entries_take_precedence_and_unregister_restores() -> None:
    builtin = ops.lookup(nn.LayerNorm)
    entry = ops.register(nn.LayerNorm, ops.elementwise(), name="my layer norm")
    try:
        assert ops.lookup(nn.LayerNorm) is entry and entry.user and entry.family == "user"
        assert ops.rules()[0] is entry
    finally:
        ops.unregister(entry)
    assert ops.lookup(nn.LayerNorm) is builtin

    @ops.register("my_method", layer=True)
    def rule(ctx, node, args, kwargs):
        return ctx.preserve(args[0])

    try:
        assert ops.lookup("my_method").rule is rule and ops.lookup("my_method").layer
    finally:
        ops.unregister("my_method")
    assert ops.lookup("my_method") is None


def test_rules_lists_every_family() -> None:
    entries = ops.rules()
    assert {e.family for e in entries} >= set(ops.FAMILIES)
    for entry in entries:
        assert entry.name and entry.targets
        assert len(repr(entry)) < 120


def test_running_stats_are_found_in_every_form() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)  # used as a module
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x):
            x = self.bn(x)
            x = F.batch_norm(x, self.mean, self.var, training=False)
            return aten.batch_norm.default(x, None, None, self.mean, self.var, False, 0.1, 1e-5, False)

    gm = fxmerge.trace(Functional().eval(), torch.randn(2, 4, 3, 3))
    found = ops.running_stats(gm)
    assert [(s.module, s.mean, s.var) for s in found] == [
        ("bn", "bn.running_mean", "bn.running_var"),
        (None, "mean", "var"),
        (None, "mean", "var"),
    ]


# --------------------------------------------------------------------------------------------
# no layer knowledge outside the registry
# --------------------------------------------------------------------------------------------

# a torch layer class (nn.Conv2d, nn.modules.conv._ConvNd) or a functional op (F.relu,
# torch.nn.functional); nn.Module / nn.Parameter are not layer knowledge
_LAYER_PATTERN = re.compile(r"\bnn\.(?!Modules?\b|Parameter\b)[A-Z]\w*|\bnn\.modules\.|\bF\.[a-z_]\w*|torch\.nn\.functional")

# Remaining uses that the files switched to the registry do not own. Each entry: file -> the exact
# matches allowed there, and why.
_ALLOWED = {
    # nn.ModuleList: a container accepted as the list of models (input validation), not a layer
    "fxmerge/api.py": {"nn.ModuleList"},
    # BatchNorm reset of modules: found as torch's _BatchNorm base class, whose own forward (in
    # train mode, with hooks) accumulates the statistics; the functional and ATen forms come from
    # the registry (ops.batch_norm_schema)
    "fxmerge/passes/repair.py": {"nn.modules."},
}


def test_no_layer_classes_or_functional_ops_outside_the_registry() -> None:
    files = sorted(ROOT.glob("fxmerge/passes/*.py")) + [ROOT / "fxmerge/api.py"] + sorted(ROOT.glob("fxmerge/match/*.py"))
    offenders = []
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in _LAYER_PATTERN.findall(line):
                if match not in _ALLOWED.get(relative, set()):
                    offenders.append(f"{relative}:{number}: {match}")
    assert not offenders, "layer knowledge outside fxmerge/ops:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------------------------
# ATen entries: graphs of ATen ops (what torch.export produces)
# --------------------------------------------------------------------------------------------


class AtenNet(nn.Module):
    """Every ATen entry the functional rules cover, called directly (fx records the OpOverloads)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        p = lambda *shape: nn.Parameter(torch.randn(*shape, generator=g) * 0.5)  # noqa: E731
        self.table = p(10, 8)
        self.ln_w, self.ln_b = p(8), p(8)
        self.w1, self.b1 = p(16, 8), p(16)
        self.w2, self.b2 = p(8, 16), p(8)
        self.conv_w, self.conv_b = p(8, 8, 3), p(8)
        self.conv2_w = p(8, 4, 1, 1)
        self.conv3_w = p(8, 8, 1, 1, 1)
        self.bn_w, self.bn_b = p(8), p(8)
        self.register_buffer("running_mean", torch.randn(8, generator=g) * 0.1)
        self.register_buffer("running_var", torch.rand(8, generator=g) + 0.5)
        self.gn_w, self.gn_b = p(8), p(8)
        self.head_w, self.head_b = p(3, 16), p(3)

    def forward(self, tokens):
        x = aten.embedding.default(self.table, tokens)  # (N, L, 8)
        h = aten.layer_norm.default(x, [8], self.ln_w, self.ln_b, 1e-5, False)
        h = aten.gelu.default(aten.linear.default(h, self.w1, self.b1))
        h = aten.dropout.default(aten.silu.default(h), 0.1, False)
        x = aten.add.Tensor(x, aten.linear.default(h, self.w2, self.b2))
        y = aten.conv1d.default(aten.transpose.int(x, 1, 2), self.conv_w, self.conv_b, [1], [1])  # (N, 8, L)
        y = aten.batch_norm.default(y, self.bn_w, self.bn_b, self.running_mean, self.running_var, False, 0.1, 1e-5, False)
        y = aten.relu.default(aten.group_norm.default(y, 2, self.gn_w, self.gn_b, 1e-5, False))
        y = aten._native_batch_norm_legit_no_training.default(y, self.bn_w, None, self.running_mean, self.running_var, 0.1, 1e-5)[0]
        z = aten.unsqueeze.default(y, 3)  # (N, 8, L, 1)
        z = aten.conv2d.default(z, self.conv2_w, None, [1, 1], [0, 0], [1, 1], 2)  # grouped
        z = aten.conv3d.default(aten.unsqueeze.default(z, 4), self.conv3_w)
        y = aten.mul.Tensor(y, aten.squeeze.dim(aten.squeeze.dim(z, 4), 3))
        x = aten.sub.Tensor(x, aten.div.Tensor(aten.permute.default(y, [0, 2, 1]), 2.0))
        n, length = tokens.shape
        q = aten.transpose.int(aten.view.default(x, [n, length, 2, 4]), 1, 2)
        a = aten.scaled_dot_product_attention.default(q, q, q)
        a = aten.reshape.default(aten.transpose.int(a, 1, 2), [n, length, 8])
        x = aten.cat.default([x, a], -1)  # (N, L, 16)
        x = aten.flatten.using_ints(aten.mean.dim(x, [1], True), 1)
        return aten.linear.default(x, self.head_w, self.head_b)


def test_aten_entries_analyse_an_aten_graph() -> None:
    model = AtenNet().eval()
    tokens = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(1))
    gm = fxmerge.trace(model, tokens)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
    assert len(targets) >= 19
    for target in targets:
        assert ops.lookup(target) is not None and ops.lookup(target).family == "aten", target
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analysis = fxmerge.analyze(model, tokens)
    randomize_(model, seed=2)
    assert_invariant(model, tokens, analysis)
    # the residual stream (the table's columns; refined into 2 heads x 4 by the view) is free and
    # couples the LayerNorm, w2 rows, conv in/out and every norm vector
    stream = [g for g in analysis.groups if any(r.param == "table" and r.axis == 1 for r in g.producers)]
    assert stream and not any(g.fixed for g in stream)
    params = {r.param for g in stream for r in g.producers + g.consumers}
    assert {"ln_w", "b2", "running_mean", "running_var", "gn_w", "conv_b", "conv2_w", "conv3_w"} <= params
    assert any(g.size == 16 and not g.fixed for g in analysis.groups)  # the MLP's hidden units
    assert [s.node for s in ops.running_stats(gm)] == ["batch_norm_default", "_native_batch_norm_legit_no_training_default"]
    assert {(s.mean, s.var) for s in ops.running_stats(gm)} == {("running_mean", "running_var")}


def test_torch_export_graph_is_analysed() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.norm = nn.LayerNorm(8)
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            x = self.emb(tokens)
            x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
            return self.head(x.mean(1))

    model = randomize_(Encoder().eval(), seed=3)
    tokens = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(4))
    gm = torch.export.export(model, (tokens,), strict=False).module()
    ShapeProp(gm).propagate(tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's own guard module has no rule (it reads only the input)
        analysis = analyze_graph(gm, state_name_map(gm))
    free = {g.size for g in analysis.free_groups}
    assert free == {8, 16}, analysis.summary()
    twin = permute_model(gm, analysis, nontrivial_permutations(analysis))
    assert not torch.equal(twin.state_dict()["fc1.weight"], gm.state_dict()["fc1.weight"])
    assert relative_error(gm(tokens), twin(tokens)) < 1e-5


# --------------------------------------------------------------------------------------------
# a user-registered op: RMSNorm
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2, -1) + eps) * weight, over the last dim (user code, not fxmerge's)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps  # same-named attributes: what saving a leaf of this class reads
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ResidualMLP(nn.Module):
    """tokens (N, L, 6) -> stem -> 2 x [x + fc2(gelu(fc1(rms(x))))] -> rms -> head."""

    def __init__(self, dim: int = 12, hidden: int = 20) -> None:
        super().__init__()
        self.stem = nn.Linear(6, dim)
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in range(2))
        self.fc1 = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(2))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(2))
        self.final = RMSNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.stem(x)
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            x = x + fc2(F.gelu(fc1(norm(x))))
        return self.head(self.final(x))


def _stream(analysis):
    (group,) = [g for g in analysis.groups if any(r.param == "stem.weight" and r.axis == 0 for r in g.producers)]
    return group


@pytest.fixture
def rms_registered():
    entry = fxmerge.ops.register(RMSNorm, fxmerge.ops.norm(dims=-1, params=("weight",)))
    yield entry
    fxmerge.ops.unregister(entry)


def _rms_model_and_data():
    torch.manual_seed(0)
    model = randomize_(ResidualMLP().eval(), seed=5)
    generator = torch.Generator().manual_seed(6)
    calibration = [torch.randn(8, 5, 6, generator=generator) for _ in range(8)]
    return model, calibration


def test_user_registered_rmsnorm_is_permutable_and_merges(rms_registered) -> None:
    model, calibration = _rms_model_and_data()
    x = calibration[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analysis = fxmerge.analyze(model, x)
    # a registered module class is a leaf whose rule the analysis follows
    assert any(n.op == "call_module" and n.target == "final" for n in analysis.graph_module.graph.nodes)
    stream = _stream(analysis)
    assert not stream.fixed and stream.size == 12
    assert {"norms.0.weight", "norms.1.weight", "final.weight"} <= {r.param for r in stream.producers}
    twin = fxmerge.testing.random_permute(model, x, seed=0)
    assert not torch.equal(twin.final.weight, model.final.weight)
    assert relative_error(model(x), twin(x)) < 1e-5
    result = fxmerge.merge([model, twin], calibration, method="permute", quiet=True)
    with torch.no_grad():
        errors = [relative_error(model(b), result.module(b)) for b in calibration]
    assert max(errors) < 1e-4, errors


def test_user_registered_rmsnorm_merge_saves_and_loads(rms_registered, tmp_path) -> None:
    """The merged module keeps the user's RMSNorm leaves: ``fxmerge.load`` rebuilds them only when
    it is given the class, and otherwise says which class it needs and how to pass it."""
    model, calibration = _rms_model_and_data()
    twin = fxmerge.testing.random_permute(model, calibration[0], seed=0)
    result = fxmerge.merge([model, twin], calibration, method="zip", quiet=True)
    result.save(tmp_path / "merged")
    with pytest.raises(LoadError, match=r"RMSNorm.*modules=\["):
        fxmerge.load(tmp_path / "merged")
    loaded = fxmerge.load(tmp_path / "merged", modules=[RMSNorm])
    assert isinstance(loaded.get_submodule("final"), RMSNorm)
    with torch.no_grad():
        assert torch.equal(loaded(calibration[0]), result.module(calibration[0]))
        assert relative_error(model(calibration[0]), loaded(calibration[0])) < 1e-4


def test_unregistered_rmsnorm_leaf_fails_closed_and_still_merges() -> None:
    model, calibration = _rms_model_and_data()
    x = calibration[0]
    with pytest.warns(UserWarning) as record:
        analysis = fxmerge.analyze(model, x, leaf_modules=[RMSNorm])
    messages = [str(w.message) for w in record]
    for name in ("norms.0", "norms.1", "final"):  # one warning per RMSNorm, naming the module
        assert any(f"(call_module {name}): no rule for module type RMSNorm" in m for m in messages), messages
    stream = _stream(analysis)
    assert stream.fixed and "unsupported op" in stream.reason
    assert any(not g.fixed and g.size == 20 for g in analysis.groups)  # the hidden units stay free
    with pytest.raises(UnsupportedOpError, match="RMSNorm"):
        fxmerge.analyze(model, x, leaf_modules=[RMSNorm], strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = fxmerge.testing.random_permute(model, x, seed=0, leaf_modules=[RMSNorm])
        result = fxmerge.merge([model, twin], calibration, method="permute", quiet=True, leaf_modules=[RMSNorm])
    assert relative_error(model(x), twin(x)) < 1e-5
    with torch.no_grad():
        errors = [relative_error(model(b), result.module(b)) for b in calibration]
    assert max(errors) < 1e-4, errors


def test_templates_linear_and_elementwise_for_user_modules() -> None:
    class Dense(nn.Module):
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
            self.offset = nn.Parameter(torch.randn(n_out) * 0.1)

        def forward(self, x):
            return x @ self.kernel.T + self.offset

    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    model = nn.Sequential(Dense(5, 7), Swish(), Dense(7, 6), Swish(), Dense(6, 2)).eval()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(7))
    entries = [ops.register(Dense, ops.linear(weight="kernel", bias="offset")), ops.register(Swish, ops.elementwise())]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            analysis = fxmerge.analyze(model, x)
        assert sorted(g.size for g in analysis.free_groups) == [6, 7]
        assert analysis.coverage() == 1.0
        assert_invariant(model, x, analysis)
        units = find_units(analysis.graph_module)
        assert [len(u.layers) for u in units] == [1, 1, 1]  # the linear template is a layer
    finally:
        ops.unregister(*entries)
    # unregistered and kept as leaves: every op fails closed, and coverage says so
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        closed = fxmerge.analyze(model, x, leaf_modules=[Dense, Swish])
    assert not closed.free_groups and closed.coverage() == 0.0


def test_analysis_writes_leaf_layouts_on_node_meta() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    analysis = fxmerge.analyze(model, torch.randn(2, 3, 6, 6))
    nodes = {n.name: n for n in analysis.graph_module.graph.nodes}
    assert analysis.node_layouts and all(nodes[k].meta["fxmerge_layouts"] == v for k, v in analysis.node_layouts.items())
    conv = analysis.space_ids[next(g.name for g in analysis.free_groups)]
    # (N, C, H, W) at the conv: C carries the conv's group; after the flatten C x 16 positions
    assert nodes["_0"].meta["fxmerge_layouts"][1] == ((conv,),)
    (piece,) = nodes["_3"].meta["fxmerge_layouts"][1]
    assert piece[0] == conv and piece[1:] == (fxmerge.groups.Opaque(16),)
