"""Issue #6 item 2: saving and loading merged models as data — no pickle, no code from the folder.

Round trips (``save_module`` then ``load_module``) must give the same module: bit-identical outputs
and state_dict (names, dtypes, values), the same module classes at the same paths, the same graph,
shape meta kept, eval mode — for merged zoo ResNet/VGG/ViT, a partial-zipping result (ChannelMap +
tails), an ``output="concat"`` result, a depth-heterogeneous merge (its report), torchvision's
resnet18 traced by ``fxmerge.trace``, and a model using every supported layer class.

Module classes outside torch.nn (a user's RMSNorm defined in this file, timm's BatchNormAct2d kept
as a leaf) are saved by name with their constructor arguments and rebuilt only when the loader is
given the class (``load_module(dir, modules=[...])``); parameters and buffers that ``get_attr``
reads under fx's plain containers round-trip and stay buffers.

Refusals: a flipped byte, edited files (even with their sha256 updated in the manifest: targets and
classes outside the allowlists, getattr/call_method escapes, code smuggled into names that fx
writes into its generated code), unknown versions, missing files — each a ``LoadError`` — and a
sentinel proves that nothing named in the folder ever ran. Saving what cannot be stored as data
(custom classes that cannot be rebuilt from their attributes, lambdas, modified layers, hooks) is a
``SaveError``; loading a custom class the caller did not pass is a ``LoadError`` naming the fix.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxmerge
from fxmerge import zoo
import fxmerge.passes.repair
from fxmerge.errors import ConfigError, LoadError, SaveError
from fxmerge.io import load_module, load_report, save_module
from fxmerge.passes.tails import ChannelMap

from conftest import rehash


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _batches(shape: tuple[int, ...], count: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def _resnet(seed: int, blocks: tuple[int, ...] = (1, 1, 1)) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.resnet(blocks, in_channels=1, image_size=8).eval()


def _vgg(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.vgg(batch_norm=True, in_channels=1, image_size=8).eval()


def _vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = zoo.vit(patch_size=2, num_layers=2, in_channels=1, image_size=8).eval()
    with torch.no_grad():  # the class token / position embedding start at zero: make them count
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


DIGITS = (8, 1, 8, 8)


def _merged(name: str) -> fxmerge.MergeResult:
    batches = _batches(DIGITS)
    if name == "resnet":
        return fxmerge.merge([_resnet(0), _resnet(1)], batches, method="zip", quiet=True)
    if name == "vgg":
        return fxmerge.merge([_vgg(0), _vgg(1)], batches, method="zip", quiet=True)
    if name == "vit":
        return fxmerge.merge([_vit(0), _vit(1)], batches, method="zip", quiet=True)
    if name == "partial":
        return fxmerge.merge([_resnet(0), _resnet(1)], batches, method="zip", stop_at=1, quiet=True)
    if name == "concat":
        return fxmerge.merge([_vit(0), _vit(1)], batches, method="zip", output="concat", quiet=True)
    if name == "depth":
        return fxmerge.merge([_resnet(0, (2, 2, 2)), _resnet(1)], batches, method="zip", quiet=True)
    raise KeyError(name)


@pytest.fixture(scope="module")
def merged(one_thread: None) -> Callable[[str], fxmerge.MergeResult]:
    cache: dict[str, fxmerge.MergeResult] = {}

    def get(name: str) -> fxmerge.MergeResult:
        if name not in cache:
            cache[name] = _merged(name)
        return cache[name]

    return get


def _run(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(*inputs)


def assert_same_module(original: torch.fx.GraphModule, loaded: torch.fx.GraphModule, *inputs: torch.Tensor) -> None:
    assert isinstance(loaded, torch.fx.GraphModule)
    assert not any(m.training for m in loaded.modules()), "loaded modules must be in eval mode"
    original.eval()
    out, out2 = _run(original, *inputs), _run(loaded, *inputs)
    assert out.abs().max() > 0
    assert torch.equal(out, out2), f"outputs differ by {(out - out2).abs().max():.3e}"
    sa, sb = original.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert {p: type(m) for p, m in original.named_modules() if p} == {p: type(m) for p, m in loaded.named_modules() if p}
    assert [(n.name, n.op, n.target) for n in original.graph.nodes] == [
        (n.name, n.op, n.target) for n in loaded.graph.nodes
    ]
    for a, b in zip(original.graph.nodes, loaded.graph.nodes):
        meta, meta2 = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
        if isinstance(meta, torch.fx.passes.shape_prop.TensorMetadata):
            assert meta2 == meta, f"tensor_meta of {a.name} not kept"
    assert type(loaded).__name__ == type(original).__name__


def roundtrip(gm: torch.fx.GraphModule, directory: Path, **kwargs) -> torch.fx.GraphModule:
    save_module(gm, directory, **kwargs)
    assert sorted(os.listdir(directory)) == sorted(
        ["graph.json", "manifest.json", "weights.safetensors"] + (["report.json"] if kwargs.get("report") else [])
    )
    return load_module(directory)


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", ["resnet", "vgg", "vit", "partial", "concat"])
def test_merged_models_round_trip_exactly(merged, tmp_path: Path, name: str) -> None:
    result = merged(name)
    loaded = roundtrip(result.module, tmp_path / name)
    assert_same_module(result.module, loaded, _batches(DIGITS, seed=7)[0])
    classes = {type(m) for m in loaded.modules()}
    if name == "vit" or name == "concat":
        assert nn.MultiheadAttention in classes
        assert any(n.op == "get_attr" for n in loaded.graph.nodes)  # class token, position embedding
    if name == "partial":
        assert ChannelMap in classes
        assert any(path.startswith("tail1.") for path, _ in loaded.named_modules())
    if name == "concat":
        assert _run(loaded, _batches(DIGITS)[0]).shape[-1] == 20


def test_merge_result_save_writes_report_and_fxmerge_load_reads_it(merged, tmp_path: Path) -> None:
    result = merged("depth")
    assert result.alignment is not None
    result.save(tmp_path)
    loaded = fxmerge.load(tmp_path)
    assert_same_module(result.module, loaded, _batches(DIGITS, seed=3)[0])
    report = load_report(tmp_path)
    assert report == json.loads((tmp_path / "report.json").read_text()) == result.to_dict()
    assert report["config"] == json.loads(json.dumps(result.config.as_dict()))
    assert [g["name"] for g in report["groups"]] == [g.name for g in result.groups]
    assert report["groups"][0]["sizes"] == list(result.groups[0].sizes)
    assert set(report["timings"]) == set(result.timings)
    (alignment,) = report["alignment"]
    expected = result.alignment[0]
    assert alignment["model"] == expected.model
    assert alignment["deep_units"] == list(expected.deep_units)
    assert alignment["shallow_units"] == list(expected.shallow_units)
    assert alignment["cka"] == expected.cka.tolist()
    assert alignment["segments"] == [list(s) for s in expected.segments]
    assert alignment["objective_value"] == pytest.approx(expected.objective_value)
    # a module saved without a report has none (and a stale one is removed)
    save_module(result.module, tmp_path)
    assert load_report(tmp_path) is None and not (tmp_path / "report.json").exists()


def test_torchvision_resnet18_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    gm = fxmerge.trace(torchvision.models.resnet18(num_classes=10).eval(), x)
    assert_same_module(gm, roundtrip(gm, tmp_path), x)


class Layers(nn.Module):
    """Every layer class the format promises to rebuild, with non-default constructor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.gconv = nn.Conv2d(8, 8, 3, padding="same", groups=4, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(8, momentum=None)
        self.deconv = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 8, eps=1e-3)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.avg = nn.AvgPool2d(2, count_include_pad=False)
        self.adapt = nn.AdaptiveAvgPool2d((2, 2))
        self.acts = nn.ModuleList([
            nn.ReLU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish(), nn.LeakyReLU(0.2), nn.Sigmoid(),
            nn.Identity(), nn.Dropout(0.3), nn.Tanh(),
        ])
        self.conv1d = nn.Conv1d(8, 16, 1)
        self.bn1d = nn.BatchNorm1d(16, eps=1e-4)
        self.emb = nn.Embedding(12, 16, padding_idx=0)
        self.ln = nn.LayerNorm(16, bias=False)
        self.key = nn.Linear(16, 12)
        self.value = nn.Linear(16, 10, bias=False)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True, kdim=12, vdim=10, add_bias_kv=True)
        self.flatten = nn.Flatten(1)
        self.head = nn.Linear(64, 5)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.gconv(self.conv(x)))
        h = self.gn(self.deconv(h))
        h = self.adapt(self.avg(self.pool(h)))
        for act in self.acts:
            h = act(h)
        h = self.bn1d(self.conv1d(h.flatten(2)))
        h = self.ln(h.transpose(1, 2) + self.emb(tokens))
        attended, _ = self.mha(h, self.key(h), self.value(h), need_weights=False)
        return self.softmax(self.head(self.flatten(attended + h)))


def _layers() -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = Layers()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor) * 0.3)
    inputs = (torch.randn(2, 3, 8, 8), torch.randint(0, 12, (2, 4)))
    return torch.fx.symbolic_trace(model.eval()), inputs


def test_every_supported_layer_round_trips(tmp_path: Path) -> None:
    gm, inputs = _layers()
    loaded = roundtrip(gm, tmp_path)
    assert_same_module(gm, loaded, *inputs)
    mha = loaded.get_submodule("mha")
    assert (mha.kdim, mha.vdim, mha.batch_first, mha.bias_k is not None) == (12, 10, True, True)
    assert loaded.get_submodule("deconv").groups == 2 and loaded.get_submodule("ln").bias is None
    assert loaded.get_submodule("emb").padding_idx == 0 and loaded.get_submodule("bn").momentum is None


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied parameters
        self.act = nn.ReLU()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.act(self.head(self.act(self.proj(self.emb(idx)))))  # one module, two call sites


def test_dtype_ties_aliases_frozen_and_plain_tensor_attributes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(Tied().double().eval())
    gm.proj.bias.requires_grad_(False)
    gm.alias = gm.act  # one module object at two paths
    gm.scale = torch.arange(10, dtype=torch.float64)  # a plain tensor attribute, not a buffer
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fx only looks for modules/parameters/buffers
        scale = gm.graph.get_attr("scale")
        scaled = gm.graph.call_function(torch.mul, (output.args[0], scale))
        again = gm.graph.call_module("alias", (scaled,))
    output.args = (again,)
    gm.recompile()
    idx = torch.tensor([[1, 2, 3], [4, 5, 9]])

    loaded = roundtrip(gm, tmp_path)
    assert_same_module(gm, loaded, idx)
    assert loaded.head.weight is loaded.emb.weight
    assert loaded.alias is loaded.act
    assert not loaded.proj.bias.requires_grad and loaded.proj.weight.requires_grad
    assert "scale" not in dict(loaded.named_buffers()) and loaded.scale.dtype == torch.float64
    graph = json.loads((tmp_path / "graph.json").read_text())
    assert graph["tensors"]["tied"] == {"head.weight": "emb.weight"}
    assert graph["tensors"]["attributes"] == ["scale"]


def test_loaded_module_compiles(merged, tmp_path: Path) -> None:
    result = merged("partial")
    loaded = roundtrip(result.module, tmp_path)
    x = _batches(DIGITS, seed=5)[0]
    eager = _run(loaded, x)
    with torch.no_grad():
        compiled = torch.compile(loaded, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- refusals


@pytest.fixture()
def saved(merged, tmp_path: Path) -> Path:
    result = merged("vit")
    result.save(tmp_path)
    return tmp_path


def _edit(directory: Path, name: str, edit: Callable[[dict], None]) -> None:
    """Edit a JSON file of a saved folder and update the manifest's hashes, as an attacker would."""
    path = directory / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    rehash(directory, name)


def _node(graph: dict, op: str, target: str | None = None) -> dict:
    return next(n for n in graph["nodes"] if n["op"] == op and (target is None or n["target"] == target))


def test_a_flipped_byte_is_detected(saved: Path) -> None:
    path = saved / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(LoadError, match=r"tampered or corrupted: .*weights\.safetensors"):
        load_module(saved)


def test_an_edited_graph_without_a_new_hash_is_detected(saved: Path) -> None:
    path = saved / "graph.json"
    path.write_text(path.read_text().replace("_operator.add", "_operator.sub", 1))
    with pytest.raises(LoadError, match=r"tampered or corrupted: .*graph\.json"):
        load_module(saved)


@pytest.fixture()
def sentinel(tmp_path_factory, monkeypatch) -> Iterator[tuple[Path, list]]:
    """A file that any executed payload would create, and a record of calls to the usual culprits."""
    path = tmp_path_factory.mktemp("sentinel") / "pwned"
    calls: list = []
    for owner, name in [(os, "system"), (subprocess, "run"), (subprocess, "Popen"), (builtins, "exec"), (builtins, "eval")]:
        original = getattr(owner, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, args))
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    yield path, calls


def _refuse(directory: Path, sentinel: tuple[Path, list], match: str) -> None:
    path, calls = sentinel
    with pytest.raises(LoadError, match=match):
        load_module(directory)
    assert not path.exists(), "a payload from the folder ran"
    assert not [c for c in calls if str(path) in repr(c)], f"a payload reached {calls}"


@pytest.mark.parametrize(
    "target",
    ["os.system", "builtins.exec", "builtins.eval", "subprocess.run", "posix.system", "torch.load",
     "torch.hub.load", "torch.from_file", "_operator.attrgetter", "operator.methodcaller", "importlib.import_module",
     "builtins.__import__", "torch.fx.graph_module.GraphModule"],
)
def test_call_function_targets_outside_the_allowlist_are_refused(saved: Path, sentinel, target: str) -> None:
    path, _ = sentinel
    code = f"open({str(path)!r}, 'w').close()"
    payload = code if "exec" in target or "eval" in target else f"touch {path}"

    def edit(graph: dict) -> None:
        node = _node(graph, "call_function", "_operator.add")
        node["target"] = target
        node["args"] = [payload]

    _edit(saved, "graph.json", edit)
    _refuse(saved, sentinel, r"call_function target .* is not allowed")


def test_module_classes_outside_the_allowlist_are_refused(saved: Path, sentinel) -> None:
    path, _ = sentinel

    def edit(graph: dict) -> None:
        graph["modules"][0]["class"] = "subprocess.Popen"
        graph["modules"][0]["args"] = {"args": ["touch", str(path)]}

    _edit(saved, "graph.json", edit)
    _refuse(saved, sentinel, r"class 'subprocess.Popen', which is not allowed")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # the road from a tensor to __globals__, then exec via call_method "__call__"
        (lambda g: _node(g, "call_function", "builtins.getattr")["args"].__setitem__(1, "__class__"), "getattr reads only"),
        (lambda g: _node(g, "call_method").__setitem__("target", "__call__"), "call_method '__call__' is not allowed"),
        (lambda g: _node(g, "call_method").__setitem__("target", "register_hook"), "is not allowed"),
        # names that fx pastes into the Python code it generates
        (lambda g: _node(g, "placeholder").__setitem__("target", "x=__import__('os').system('touch PWNED')"),
         "malformed placeholder target"),
        (lambda g: _node(g, "call_method")["kwargs"].__setitem__("x=exec('1'),y", 1), "keyword argument names"),
        (lambda g: _node(g, "call_method").__setitem__("name", "a=1;import os"), "bad or repeated name"),
        (lambda g: _node(g, "call_module").__setitem__("target", 'conv_proj")+exec("1'), "not a module of the tree"),
        (lambda g: g["modules"][0].__setitem__("path", 'x"+exec("1")+"'), "malformed module path"),
        (lambda g: _node(g, "get_attr").__setitem__("target", "forward"), "not a saved tensor or module"),
        (lambda g: g["modules"][0]["args"].__setitem__("padding_mode", {"function": "os.system"}), "is not allowed"),
        (lambda g: g.__setitem__("class_name", "X(object): pass\nimport os\nclass Y"), "malformed class_name"),
        (lambda g: g["nodes"].pop(), "no output node"),
    ],
    ids=["getattr-dunder", "call-dunder", "hook-method", "placeholder-code", "kwarg-code", "node-name", "module-target",
         "module-path", "get_attr-method", "constructor-function", "class-name", "no-output"],
)
def test_escapes_and_code_injection_are_refused(saved: Path, sentinel, edit, match: str) -> None:
    _edit(saved, "graph.json", edit)
    _refuse(saved, sentinel, match)


def test_unknown_format_or_newer_version_is_refused(saved: Path) -> None:
    _edit(saved, "manifest.json", lambda m: m.__setitem__("format_version", "2.0"))
    with pytest.raises(LoadError, match=r"format version 2.0 is not readable"):
        load_module(saved)
    _edit(saved, "manifest.json", lambda m: m.__setitem__("format_version", "1.7"))  # a newer minor is fine
    load_module(saved)
    _edit(saved, "manifest.json", lambda m: m.__setitem__("format", "pickle"))
    with pytest.raises(LoadError, match=r"unknown format 'pickle'"):
        load_module(saved)


@pytest.mark.parametrize("name", ["manifest.json", "graph.json", "weights.safetensors"])
def test_a_missing_file_is_named(saved: Path, name: str) -> None:
    (saved / name).unlink()
    with pytest.raises(LoadError, match=name.replace(".", r"\.") + " is missing"):
        load_module(saved)


def test_weights_that_do_not_fit_the_graph_are_refused(saved: Path) -> None:
    def drop(graph: dict) -> None:
        graph["tensors"]["parameters"].remove("conv_proj.bias")

    _edit(saved, "graph.json", drop)
    with pytest.raises(LoadError, match="conv_proj.bias"):
        load_module(saved)


# ------------------------------------------------------------------------------------------ saving


CONSTRUCTED: list[str] = []  # every Custom / MyRMSNorm construction, to prove an untrusted one never runs


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        CONSTRUCTED.append("Custom")
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 2


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Custom()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class MyRMSNorm(nn.Module):
    """A user's layer, defined here (outside torch.nn and fxmerge)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        CONSTRUCTED.append("MyRMSNorm")
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class WithNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.norm = MyRMSNorm(6, eps=1e-3)
        self.block = Custom()
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.head(self.norm(self.linear(x))))


def _with_norms() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = WithNorms().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    return fxmerge.trace(model, torch.randn(2, 4), leaf_modules=[MyRMSNorm, Custom])


def test_user_module_classes_load_only_when_trusted(tmp_path: Path, sentinel) -> None:
    gm = _with_norms()
    save_module(gm, tmp_path)
    graph = json.loads((tmp_path / "graph.json").read_text())
    classes = {r["path"]: r["class"] for r in graph["modules"]}
    assert classes["norm"].endswith("test_io.MyRMSNorm") and classes["block"].endswith("test_io.Custom")
    assert next(r for r in graph["modules"] if r["path"] == "norm")["args"] == {"dim": 6, "eps": 1e-3}
    CONSTRUCTED.clear()
    with pytest.raises(LoadError, match=r"module 'norm' has class '.*MyRMSNorm', which is not allowed.*"
                       r"fxmerge.load\(directory, modules=\[MyRMSNorm\]\)"):
        load_module(tmp_path)
    with pytest.raises(LoadError, match=r"module 'block' has class '.*Custom'.*modules=\[Custom\]"):
        load_module(tmp_path, modules=[MyRMSNorm])  # trusting one class does not trust the other
    assert CONSTRUCTED == ["MyRMSNorm"]  # Custom never ran
    loaded = fxmerge.load(tmp_path, modules=[MyRMSNorm, Custom])
    assert_same_module(gm, loaded, torch.randn(3, 4))
    assert loaded.norm.eps == 1e-3 and type(loaded.norm) is MyRMSNorm
    # tampering: a trusted class's record renamed to an untrusted one is refused
    _edit(tmp_path, "graph.json", lambda g: g["modules"][1].__setitem__("class", "subprocess.Popen"))
    _refuse(tmp_path, sentinel, r"class 'subprocess.Popen', which is not allowed")


def test_trust_takes_module_classes_only(tmp_path: Path) -> None:
    save_module(_with_norms(), tmp_path)
    with pytest.raises(ConfigError, match="nn.Module subclasses"):
        load_module(tmp_path, modules=["tests.test_io.MyRMSNorm"])


def test_timm_batchnormact_leaf_round_trips_when_trusted(tmp_path: Path) -> None:
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.SiLU), nn.Conv2d(8, 8, 1),
        BatchNormAct2d(8, apply_act=False, eps=1e-3),
    ).eval()
    batches = _batches((4, 3, 8, 8))
    fxmerge.passes.repair.reset_batchnorm(model, batches, quiet=True)  # statistics that are not 0/1
    gm = fxmerge.trace(model, batches[0], leaf_modules=[BatchNormAct2d])
    assert sum(isinstance(m, BatchNormAct2d) for m in gm.modules()) == 2
    save_module(gm, tmp_path)
    with pytest.raises(LoadError, match=r"BatchNormAct2d.*modules=\[BatchNormAct2d\]"):
        load_module(tmp_path)
    loaded = load_module(tmp_path, modules=[BatchNormAct2d])
    assert_same_module(gm, loaded, batches[1])
    assert type(loaded.get_submodule("1.act")) is nn.SiLU and type(loaded.get_submodule("3.act")) is nn.Identity


class _FunctionalNorm(nn.Module):
    """F.batch_norm on its own buffers: traced into, it leaves get_attr buffers under fx containers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels))
        self.register_buffer("running_mean", torch.randn(channels))
        self.register_buffer("running_var", torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5)


def test_get_attr_parameters_and_buffers_round_trip_and_stay_buffers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), _FunctionalNorm(5), nn.ReLU(), nn.Conv2d(5, 5, 1), _FunctionalNorm(5))
    gm = fxmerge.trace(model.eval(), torch.randn(2, 3, 8, 8))
    assert type(gm.get_submodule("1")) is nn.Module  # fx's plain container
    loaded = roundtrip(gm, tmp_path)
    assert_same_module(gm, loaded, torch.randn(2, 3, 8, 8))
    assert dict(loaded.named_buffers()).keys() == dict(gm.named_buffers()).keys() == {
        "1.running_mean", "1.running_var", "4.running_mean", "4.running_var"}
    assert {n for n, _ in loaded.named_parameters()} == {n for n, _ in gm.named_parameters()}
    # the loaded model's batch norms are still resettable, to the same statistics
    batches = _batches((4, 3, 8, 8))
    fxmerge.passes.repair.reset_batchnorm(gm, batches, quiet=True)
    fxmerge.passes.repair.reset_batchnorm(loaded, batches, quiet=True)
    for key, value in gm.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


class _Scaled(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.f = factor  # not stored under its constructor argument's name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.f


class _PlainTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.tensor(2.0)  # neither parameter nor buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _Renamed(MyRMSNorm):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.mode = torch.float64  # an attribute set after construction, checked by its encoding


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (_Scaled(3.0), r"module 'block' \(_Scaled\): constructor argument 'factor' has no same-named attribute.*"
                       r"test_io._Scaled\) is saved as its constructor arguments"),
        (_PlainTensor(), r"attribute 'scale' is a tensor that is neither a parameter nor a buffer.*register_buffer"),
    ],
    ids=["unreadable-argument", "plain-tensor"],
)
def test_saving_a_custom_module_that_cannot_be_rebuilt_is_refused(tmp_path: Path, module: nn.Module, match: str) -> None:
    outer = nn.Sequential()
    outer.add_module("block", module)
    gm = fxmerge.trace(outer.eval(), torch.randn(2, 4), leaf_modules=[type(module)])
    with pytest.raises(SaveError, match=match):
        save_module(gm, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_custom_module_modified_after_construction_is_refused(tmp_path: Path) -> None:
    outer = nn.Sequential()
    outer.add_module("norm", _Renamed(4))
    gm = fxmerge.trace(outer.eval(), torch.randn(2, 4), leaf_modules=[_Renamed])
    save_module(gm, tmp_path / "ok")  # an encodable attribute equal to the rebuilt one's
    gm.get_submodule("norm").mode = torch.float16
    with pytest.raises(SaveError, match=r"module 'norm' \(_Renamed\): rebuilding it .* gives different attributes"):
        save_module(gm, tmp_path / "out")


def test_a_custom_module_class_traced_through_saves_without_trust(tmp_path: Path) -> None:
    gm = fxmerge.trace(Outer().eval(), torch.randn(2, 4))  # its code becomes graph nodes
    x = torch.randn(3, 4)
    assert_same_module(gm, roundtrip(gm, tmp_path / "ok"), x)


def test_saving_a_lambda_target_is_refused(tmp_path: Path) -> None:
    gm = torch.fx.symbolic_trace(nn.Linear(4, 4))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        node = gm.graph.call_function(lambda t: t * 2, (output.args[0],))
    output.args = (node,)
    gm.recompile()
    with pytest.raises(SaveError, match=r"call_function target .* is not in the allowlist"):
        save_module(gm, tmp_path)


def test_saving_a_layer_modified_after_construction_is_refused(tmp_path: Path) -> None:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    gm.get_submodule("0").in_channels = 4  # its weight says 3
    with pytest.raises(SaveError, match=r"module '0' \(Conv2d\): rebuilding it"):
        save_module(gm, tmp_path)


def test_saving_a_module_with_hooks_is_refused(tmp_path: Path) -> None:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    gm.get_submodule("0").register_forward_hook(lambda module, args, out: out * 0)
    with pytest.raises(SaveError, match="hooks"):
        save_module(gm, tmp_path)


def test_io_never_unpickles_imports_or_evaluates() -> None:
    import fxmerge.io

    tree = ast.parse(Path(fxmerge.io.__file__).read_text())
    forbidden_modules = {"pickle", "dill", "marshal", "shelve", "importlib", "cloudpickle", "joblib"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & forbidden_modules
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in forbidden_modules
        elif isinstance(node, ast.Name):
            assert node.id not in {"eval", "exec", "compile", "__import__"}, f"line {node.lineno}: {node.id}"
        elif isinstance(node, ast.Attribute):
            assert node.attr not in {"load", "loads", "import_module", "__import__"} or (
                isinstance(node.value, ast.Name) and node.value.id == "json"
            ) or ast.unparse(node) == "safetensors.torch.load", f"line {node.lineno}: {ast.unparse(node)}"
