"""Issue #7 item 2: property tests (hypothesis) over randomly generated architectures.

Two kinds of models are drawn:

* **zoo** -- a model of a ``fxmerge.zoo`` family with random hyper-parameters: ResNet (1-3 stages
  of 1-2 blocks, base width 4-16), VGG (1-3 stages of 1-2 convs, widths 4-16, with or without
  BatchNorm), MLP (1-3 hidden layers of 4-16, with or without LayerNorm), ViT (1-2 layers, 1, 2
  or 4 heads of 2-4 channels, patch 2 or 4).
* **program** -- a ``ProgramNet`` built from a drawn list of block specs (``Program``): a conv
  stem, then 1-4 blocks among plain conv, residual block (identity or projection shortcut),
  DenseNet-style channel concat, squeeze-excitation gating, depthwise conv, grouped conv, max
  pool, a standalone norm, ``nn.MultiheadAttention`` over the flattened spatial tokens and a
  timm-style ``scaled_dot_product_attention`` block with head reshapes; every conv block draws
  its norm among none / BatchNorm / GroupNorm / LayerNorm (channels-last); the head is global
  average pooling + Linear or flatten (C*H*W) + a 2-layer MLP. The list of blocks is fixed at
  construction, so ``forward`` is a plain loop that ``torch.fx`` unrolls.

Weights are random everywhere (``conftest.randomize_``: constant inits would hide a parameter
that is not moved), BatchNorm statistics are then those of the calibration batches
(``reset_batchnorm``), as a merge resets BatchNorm on them.

Properties, each checked on every drawn model:

1. **invariance** -- ``random_permute`` keeps the outputs (relative error 1e-4), and the analysis
   has free groups to move; ``conftest.assert_invariant`` (permutations never the identity)
   additionally checks that exactly the tensors carrying a free group of size > 1 changed.
2. **recovery** -- ``merge([m, random_permute(m)], method="permute")`` reproduces ``m``
   (relative error 1e-3).
3. **identity extension** (zoo ResNet / VGG / ViT) -- a shallow model and a deeper sibling of
   independently drawn width: ``align_depth`` + ``extend`` gives a graph of the deep structure that
   computes the shallow model's function (relative error 1e-5) on inputs outside calibration.
4. **Net2Net recovery** -- ``merge([m, net2net_widen(m)], method="zip", width="min", alpha=1.0)``
   reproduces ``m`` (alpha=1.0 here; the default alpha also recovers identical copies since zip
   deduplicates them, see tests/test_width.py); ViTs and programs with nn.MultiheadAttention are not widened (an MHA's
   residual stream is its embed dim = heads x head channels, which Net2Net leaves alone).

Every property runs ``derandomize=True`` (the same examples every run) with a small
``max_examples`` (``EXAMPLES``); set ``FXMERGE_PROPERTY_EXAMPLES=200`` for a longer profile.
"""

from __future__ import annotations

import os

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fxmerge
from fxmerge import zoo
from fxmerge.passes.depth import align_depth, extend
from fxmerge.passes.repair import reset_batchnorm
from fxmerge.passes.units import find_units
from fxmerge.testing import net2net_widen, random_permute

from conftest import assert_invariant, randomize_

IN_CHANNELS = 3
IMAGE = 8
BATCH = 8
CALIBRATION_BATCHES = 4
NUM_OUTPUTS = 5

# ------------------------------------------------------------------------------------ programs

NORMS = ("none", "bn", "gn", "ln")


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]


class Norm(nn.Module):
    """none / BatchNorm2d / GroupNorm / LayerNorm over channels (channels-last, ConvNeXt-style)."""

    def __init__(self, kind: str, channels: int, groups: int = 1) -> None:
        super().__init__()
        self.kind = kind
        if kind == "bn":
            self.norm = nn.BatchNorm2d(channels)
        elif kind == "gn":
            self.norm = nn.GroupNorm(groups, channels)
        elif kind == "ln":
            self.norm = nn.LayerNorm(channels)
        else:
            self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "ln":
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm(x)


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, gn_groups: int, groups: int = 1, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups)
        self.norm = Norm(norm, cout, gn_groups)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.norm(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, gn_groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = Norm(norm, cout, gn_groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = Norm(norm, cout, gn_groups)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class Dense(nn.Module):
    """DenseNet-style: the input concatenated with ``growth`` new channels."""

    def __init__(self, cin: int, growth: int, norm: str, gn_groups: int) -> None:
        super().__init__()
        self.block = ConvBlock(cin, growth, norm, gn_groups)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.block(x)], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * gate[:, :, None, None]


class Depthwise(nn.Module):
    def __init__(self, channels: int, norm: str, gn_groups: int) -> None:
        super().__init__()
        self.block = ConvBlock(channels, channels, norm, gn_groups, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Pool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2)


class MHABlock(nn.Module):
    """Pre-norm nn.MultiheadAttention over the H*W tokens, residual, back to (N, C, H, W)."""

    def __init__(self, channels: int, heads: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        h = self.norm(tokens)
        a, _ = self.attn(h, h, h, need_weights=False)
        tokens = tokens + a
        return tokens.transpose(1, 2).unflatten(2, (self.size, self.size))


class SDPABlock(nn.Module):
    """timm-style attention with separate q/k/v projections to heads x head_dim channels."""

    def __init__(self, channels: int, heads: int, head_dim: int, size: int) -> None:
        super().__init__()
        self.heads, self.size = heads, size
        inner = heads * head_dim
        self.q, self.k, self.v = nn.Linear(channels, inner), nn.Linear(channels, inner), nn.Linear(channels, inner)
        self.proj = nn.Linear(inner, channels)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        b, length = tokens.shape[0], tokens.shape[1]
        q, k, v = (lin(tokens).view(b, length, self.heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        tokens = tokens + self.proj(a)
        return tokens.transpose(1, 2).unflatten(2, (self.size, self.size))


@dataclass(frozen=True)
class Block:
    """One drawn block: ``kind`` and its integer / string options (see ``ProgramNet``)."""

    kind: str
    out: int = 0
    norm: str = "none"
    gn_groups: int = 1
    groups: int = 1
    hidden: int = 0
    heads: int = 1

    def __repr__(self) -> str:
        fields = [f"{k}={v!r}" for k, v in vars(self).items() if k != "kind" and v != Block.__dataclass_fields__[k].default]
        return f"Block({self.kind!r}{', ' if fields else ''}{', '.join(fields)})"


@dataclass(frozen=True)
class Program:
    stem: int
    stem_norm: str
    stem_gn_groups: int
    blocks: tuple[Block, ...]
    head: str  # "pool" | "flatten"
    head_hidden: int


class ProgramNet(nn.Module):
    """stem conv -> blocks -> head, from a ``Program``; the blocks are a fixed ModuleList."""

    def __init__(self, program: Program, in_channels: int = IN_CHANNELS, image: int = IMAGE) -> None:
        super().__init__()
        self.program = program
        self.stem = ConvBlock(in_channels, program.stem, program.stem_norm, program.stem_gn_groups)
        channels, size = program.stem, image
        blocks: list[nn.Module] = []
        for spec in program.blocks:
            if spec.kind == "conv":
                blocks.append(ConvBlock(channels, spec.out, spec.norm, spec.gn_groups))
                channels = spec.out
            elif spec.kind == "grouped":
                blocks.append(ConvBlock(channels, spec.out, spec.norm, spec.gn_groups, groups=spec.groups))
                channels = spec.out
            elif spec.kind == "residual":
                blocks.append(Residual(channels, spec.out, spec.norm, spec.gn_groups))
                channels = spec.out
            elif spec.kind == "dense":
                blocks.append(Dense(channels, spec.out, spec.norm, spec.gn_groups))
                channels += spec.out
            elif spec.kind == "se":
                blocks.append(SqueezeExcite(channels, spec.hidden))
            elif spec.kind == "depthwise":
                blocks.append(Depthwise(channels, spec.norm, spec.gn_groups))
            elif spec.kind == "norm":
                blocks.append(Norm(spec.norm, channels, spec.gn_groups))
            elif spec.kind == "pool":
                blocks.append(Pool())
                size //= 2
            elif spec.kind == "mha":
                blocks.append(MHABlock(channels, spec.heads, size))
            elif spec.kind == "sdpa":
                blocks.append(SDPABlock(channels, spec.heads, spec.hidden, size))
            else:
                raise ValueError(spec.kind)
        self.blocks = nn.ModuleList(blocks)
        self.flatten = nn.Flatten()
        if program.head == "pool":
            self.head = nn.Linear(channels, NUM_OUTPUTS)
        else:
            self.head = nn.Sequential(
                nn.Linear(channels * size * size, program.head_hidden), nn.ReLU(), nn.Linear(program.head_hidden, NUM_OUTPUTS)
            )
        self.pool = program.head == "pool"

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        if self.pool:
            return self.head(x.mean((2, 3)))
        return self.head(self.flatten(x))


@st.composite
def _norm(draw, channels: int) -> tuple[str, int]:
    kind = draw(st.sampled_from(NORMS))
    groups = draw(st.sampled_from(_divisors(channels, 4))) if kind == "gn" else 1
    return kind, groups


BLOCK_KINDS = ("conv", "residual", "dense", "se", "depthwise", "grouped", "norm", "pool", "mha", "sdpa")


@st.composite
def programs(draw, kinds: tuple[str, ...] = BLOCK_KINDS, max_blocks: int = 4) -> Program:
    stem = draw(st.integers(4, 12))
    stem_norm, stem_groups = draw(_norm(stem))
    channels, size = stem, IMAGE
    blocks: list[Block] = []
    for _ in range(draw(st.integers(1, max_blocks))):
        allowed = [k for k in kinds if not (k == "pool" and size < 4) and not (k == "dense" and channels > 16)]
        kind = draw(st.sampled_from(allowed))
        if kind in ("conv", "residual"):
            out = draw(st.integers(4, 12))
            norm, groups = draw(_norm(out))
            blocks.append(Block(kind, out=out, norm=norm, gn_groups=groups))
            channels = out
        elif kind == "grouped":
            groups = draw(st.sampled_from([g for g in _divisors(channels, 4) if g > 1] or [1]))
            out = groups * draw(st.integers(2, 4))
            norm, gn_groups = draw(_norm(out))
            blocks.append(Block(kind, out=out, norm=norm, gn_groups=gn_groups, groups=groups))
            channels = out
        elif kind == "dense":
            growth = draw(st.integers(2, 6))
            norm, groups = draw(_norm(growth))
            blocks.append(Block(kind, out=growth, norm=norm, gn_groups=groups))
            channels += growth
        elif kind == "se":
            blocks.append(Block(kind, hidden=draw(st.integers(2, 6))))
        elif kind == "depthwise":
            norm, groups = draw(_norm(channels))
            blocks.append(Block(kind, norm=norm, gn_groups=groups))
        elif kind == "norm":
            norm, groups = draw(_norm(channels))
            blocks.append(Block(kind, norm=norm, gn_groups=groups))
        elif kind == "pool":
            blocks.append(Block(kind))
            size //= 2
        elif kind == "mha":
            blocks.append(Block(kind, heads=draw(st.sampled_from(_divisors(channels, 4)))))
        elif kind == "sdpa":
            blocks.append(Block(kind, heads=draw(st.sampled_from((1, 2, 4))), hidden=draw(st.integers(2, 4))))
    head = draw(st.sampled_from(("pool", "flatten")))
    hidden = draw(st.integers(4, 12)) if head == "flatten" else 0
    return Program(stem, stem_norm, stem_groups, tuple(blocks), head, hidden)


# ------------------------------------------------------------------------------ zoo families


@dataclass(frozen=True)
class ZooSpec:
    """A zoo factory name and its keyword arguments (a sorted tuple, so the spec is hashable)."""

    family: str
    options: tuple[tuple[str, object], ...]

    def build(self) -> nn.Module:
        return zoo.FAMILIES[self.family](
            **dict(self.options), in_channels=IN_CHANNELS, image_size=IMAGE, num_outputs=NUM_OUTPUTS
        )

    def __repr__(self) -> str:
        return f"zoo.{self.family}({', '.join(f'{k}={v!r}' for k, v in self.options)})"


def _spec(family: str, **options: object) -> ZooSpec:
    return ZooSpec(family, tuple(sorted(options.items())))


WIDTHS = st.integers(4, 16)


@st.composite
def resnets(draw, blocks: tuple[int, ...] | None = None) -> ZooSpec:
    if blocks is None:
        blocks = tuple(draw(st.lists(st.integers(1, 2), min_size=1, max_size=3)))
    return _spec("resnet", blocks_per_stage=blocks, width=draw(WIDTHS))


@st.composite
def vggs(draw, convs: tuple[int, ...] | None = None, batch_norm: bool | None = None) -> ZooSpec:
    if convs is None:
        convs = tuple(draw(st.lists(st.integers(1, 2), min_size=1, max_size=3)))
    if batch_norm is None:
        batch_norm = draw(st.booleans())
    widths = tuple(draw(st.lists(WIDTHS, min_size=len(convs), max_size=len(convs))))
    return _spec("vgg", cfg=zoo.vgg_cfg(convs, widths), batch_norm=batch_norm, hidden=draw(WIDTHS))


@st.composite
def mlps(draw) -> ZooSpec:
    hidden = tuple(draw(st.lists(WIDTHS, min_size=1, max_size=3)))
    return _spec("mlp", hidden=hidden, layernorm=draw(st.booleans()))


@st.composite
def vits(draw, layers: int | None = None, heads: int | None = None) -> ZooSpec:
    if layers is None:
        layers = draw(st.integers(1, 2))
    if heads is None:
        heads = draw(st.sampled_from((1, 2, 4)))
    return _spec(
        "vit",
        patch_size=draw(st.sampled_from((2, 4))),
        num_layers=layers,
        num_heads=heads,
        hidden_dim=heads * draw(st.integers(2, 4)),
        mlp_dim=draw(WIDTHS),
    )


def zoo_models(families: tuple[str, ...] = ("resnet", "vgg", "mlp", "vit")) -> st.SearchStrategy[ZooSpec]:
    strategies = {"resnet": resnets(), "vgg": vggs(), "mlp": mlps(), "vit": vits()}
    return st.one_of(*(strategies[f] for f in families))


@st.composite
def deeper_pairs(draw) -> tuple[ZooSpec, ZooSpec, str]:
    """(shallow, deeper sibling, depth objective): same stage structure, more blocks / convs /
    layers, widths drawn independently (the extension takes the shallow model's widths)."""
    family = draw(st.sampled_from(("resnet", "vgg", "vit")))
    objective = draw(st.sampled_from(("lma", "sma")))
    if family == "vit":
        layers = draw(st.integers(1, 2))
        heads = draw(st.sampled_from((1, 2, 4)))
        shallow = draw(vits(layers, heads))
        deep = draw(vits(layers + draw(st.integers(1, 2)), heads))
        # the patch size fixes the token count, which a unit's shape change includes
        deep = _spec("vit", **{**dict(deep.options), "patch_size": dict(shallow.options)["patch_size"]})
        return shallow, deep, objective
    stages = tuple(draw(st.lists(st.integers(1, 2), min_size=1, max_size=3)))
    extra = tuple(draw(st.lists(st.integers(0, 2), min_size=len(stages), max_size=len(stages))))
    if not any(extra):
        extra = (1,) + extra[1:]
    deeper = tuple(a + b for a, b in zip(stages, extra))
    if family == "resnet":
        return draw(resnets(stages)), draw(resnets(deeper)), objective
    # siblings of one family: with and without BatchNorm are different structures
    batch_norm = draw(st.booleans())
    return draw(vggs(stages, batch_norm)), draw(vggs(deeper, batch_norm)), objective


# ----------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calibration() -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(BATCH, IN_CHANNELS, IMAGE, IMAGE, generator=generator) for _ in range(CALIBRATION_BATCHES)]


def test_input() -> Tensor:
    """Inputs outside the calibration data (another generator, scale and offset)."""
    generator = torch.Generator().manual_seed(1000)
    return 1.3 * torch.randn(2 * BATCH, IN_CHANNELS, IMAGE, IMAGE, generator=generator) + 0.2


test_input.__test__ = False  # not a pytest test


Spec = ZooSpec | Program


def build(spec: Spec, seed: int = 0, batches: list[Tensor] | None = None) -> nn.Module:
    """The model of ``spec`` with random weights everywhere, then BatchNorm statistics of the
    calibration batches; eval mode."""
    torch.manual_seed(seed)
    model = spec.build() if isinstance(spec, ZooSpec) else ProgramNet(spec)
    randomize_(model.eval(), seed + 1)
    reset_batchnorm(model, calibration() if batches is None else batches, quiet=True)
    return model.eval()


def output(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all(), "output is not finite"
    return y


def max_relative(y: Tensor, y2: Tensor) -> float:
    return ((y - y2).abs().max() / y.abs().max().clamp_min(1e-12)).item()


def norm_relative(y: Tensor, y2: Tensor) -> float:
    return ((y - y2).norm() / y.norm().clamp_min(1e-12)).item()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def has_attention_module(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


# -------------------------------------------------------------------------------- properties


def check_invariance(spec: Spec) -> None:
    """random_permute keeps the function; exactly the tensors carrying a free group change."""
    batches = calibration()
    model, x = build(spec, batches=batches), test_input()
    with warnings.catch_warnings():
        # every op the generators use is supported: a fail-closed warning is a coverage gap
        warnings.simplefilter("error")
        analysis = fxmerge.analyze(model, batches[0])
    assert analysis.free_groups, "nothing to permute: the property would prove nothing"
    y = output(model, x)
    assert y.abs().max() > 0
    twin = random_permute(model, batches[0], seed=1).eval()
    err = max_relative(y, output(twin, x))
    assert err <= 1e-4, f"random_permute changed the outputs: {err:.2e}"
    assert_invariant(model, x, analysis, seed=2, rtol=1e-4)


def check_recovery(spec: Spec) -> None:
    """merge([m, permuted m], method="permute") gives m back."""
    batches = calibration()
    model = build(spec, batches=batches)
    twin = random_permute(model, batches[0], seed=1).eval()
    result = fxmerge.merge([model, twin], batches, method="permute", quiet=True)
    assert all(g.width == g.sizes[0] for g in result.groups)
    for x in (batches[0], test_input()):
        err = norm_relative(output(model, x), output(result.module, x))
        assert err < 1e-3, f"merged model differs from m: {err:.2e}"


def check_extension(pair: tuple[ZooSpec, ZooSpec, str]) -> None:
    """align_depth + extend: the deep structure computing the shallow function."""
    shallow_spec, deep_spec, objective = pair
    batches = calibration()
    shallow, deep = build(shallow_spec, 0, batches), build(deep_spec, 1, batches)
    shallow_gm, deep_gm = fxmerge.trace(shallow, batches[0]), fxmerge.trace(deep, batches[0])
    deep_units, shallow_units = find_units(deep_gm), find_units(shallow_gm)
    assert len(deep_units) > len(shallow_units)
    alignment = align_depth(deep_gm, shallow_gm, batches, objective, 1, quiet=True)
    assert len(alignment.segments) == len(shallow_units)
    assert [j for s in alignment.segments for j in s] == list(range(len(deep_units)))
    extended = extend(shallow_gm, deep_gm, alignment, batches[0])
    assert [(n.op, str(n.target)) for n in extended.graph.nodes] == [(n.op, str(n.target)) for n in deep_gm.graph.nodes]
    x = test_input()
    expected = output(shallow, x)
    assert expected.abs().max() > 0
    err = max_relative(expected, output(extended, x))
    assert err <= 1e-5, f"the extension differs from the shallow model: {err:.2e}"


def check_net2net(spec: Spec) -> None:
    """zip(width="min", alpha=1) of [m, Net2Net-widened m] gives m back."""
    batches = calibration()
    model = build(spec, batches=batches)
    wide = net2net_widen(model, batches[0], 2)
    assert params(wide) > params(model), "nothing was widened"
    x = test_input()
    y = output(model, x)
    err = max_relative(y, output(wide, x))
    assert err <= 1e-5, f"the Net2Net widening changed the function: {err:.2e}"
    result = fxmerge.merge([model, wide], batches, method="zip", width="min", alpha=1.0, quiet=True)
    assert params(result.module) == params(model)
    for x in (batches[0], x):
        err = norm_relative(output(model, x), output(result.module, x))
        assert err < 1e-3, f"merged model differs from m: {err:.2e}"


# ---------------------------------------------------------------------------------- the tests

ALL_MODELS = st.one_of(zoo_models(), programs())
# Net2Net leaves attention head channels alone, so an nn.MultiheadAttention (embed dim = heads x
# head channels = its residual stream) cannot be widened: no ViTs, no "mha" blocks.
WIDENABLE = st.one_of(zoo_models(("resnet", "vgg", "mlp")), programs(tuple(k for k in BLOCK_KINDS if k != "mha")))

EXAMPLES = {"invariance": 25, "recovery": 20, "extension": 15, "net2net": 20}
if os.environ.get("FXMERGE_PROPERTY_EXAMPLES"):  # the longer profile, outside the timed suite
    EXAMPLES = dict.fromkeys(EXAMPLES, int(os.environ["FXMERGE_PROPERTY_EXAMPLES"]))


def _settings(name: str) -> settings:
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@_settings("invariance")
@given(spec=ALL_MODELS)
def test_random_permute_is_invariant(spec: Spec) -> None:
    check_invariance(spec)


@_settings("recovery")
@given(spec=ALL_MODELS)
def test_permute_merge_recovers_the_model(spec: Spec) -> None:
    check_recovery(spec)


@_settings("extension")
@given(pair=deeper_pairs())
def test_identity_extension_is_exact(pair: tuple[ZooSpec, ZooSpec, str]) -> None:
    check_extension(pair)


@_settings("net2net")
@given(spec=WIDENABLE)
def test_zip_recovers_the_model_from_its_net2net_widening(spec: Spec) -> None:
    check_net2net(spec)
