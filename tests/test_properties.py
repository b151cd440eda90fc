"""Issue #7 item 2: property tests (hypothesis) over randomly generated architectures.

Two kinds of models are drawn:

* **zoo** -- a ``fxmerge.zoo`` model with random hyper-parameters on 3x8x8 inputs: ResNet (1-3
  stages of 1-2 blocks, base width 4-16), VGG (1-3 stages of 1-2 convs, widths 4-16, with or
  without BatchNorm, hidden 4-16), MLP (1-3 hidden layers of 4-16, with or without LayerNorm),
  ViT (1-2 layers, 1, 2 or 4 heads of 2-4 channels, MLP 4-16, patch 2 or 4).
* **program** -- a ``ProgramNet`` built from a drawn ``Program`` on 3x7x7 inputs: a conv stem,
  then 2-5 blocks among plain conv, residual block (identity or 1x1 projection shortcut),
  DenseNet-style channel concat, squeeze-excitation gating, depthwise conv, grouped conv (2-4
  groups), max pool, a standalone norm, ``nn.MultiheadAttention`` over the flattened spatial
  tokens (heads dividing the channels) and a timm-style ``scaled_dot_product_attention`` block
  (separate q/k/v projections to 1, 2 or 4 heads of 2-4 channels, ``view``/``transpose`` head
  reshapes); every conv block draws its norm among none / BatchNorm / GroupNorm (1-4 groups) /
  LayerNorm (channels-last, ConvNeXt-style); the head is global average pooling + Linear or
  flatten (C*H*W) + a 2-layer MLP. The block list is fixed at construction (an
  ``nn.ModuleList`` and a plain loop in ``forward``, which ``torch.fx`` unrolls).

Weights are random everywhere (``conftest.randomize_``: constant inits would hide a parameter
that is not moved), then BatchNorm statistics are those of the calibration batches
(``reset_batchnorm``), as a merge resets BatchNorm on them.

Properties, each checked on every drawn model:

1. **invariance** -- ``random_permute`` keeps the outputs on fresh inputs (relative error 1e-4);
   ``conftest.assert_invariant`` (permutations never the identity) also checks that exactly the
   tensors carrying a free group of size > 1 change; no fail-closed warning is raised (every op
   of the generators has a rule), and a model with nothing to permute must have a reason for
   every fixed group.
2. **recovery** -- ``merge([m, random_permute(m)], method="permute")`` reproduces ``m``
   (relative error 1e-3, on calibration and on fresh inputs).
3. **identity extension** (zoo ResNet / VGG / ViT) -- a shallow model and a deeper sibling of
   independent widths: ``align_depth`` + ``extend`` gives a graph node for node like the deep one that
   computes the shallow model's function on fresh inputs (relative error 1e-5).
4. **Net2Net recovery** -- ``merge([m, net2net_widen(m)], method="zip", width="min")`` at the
   DEFAULT alpha reproduces ``m`` (relative error 1e-3). This holds since zip does not decay a
   merge of two identical features (tests/test_width.py); on 80 examples alpha=0.5 and alpha=1.0
   passed and failed on exactly the same ones. No ViTs and no "mha" blocks here: an
   nn.MultiheadAttention's residual stream is its embed dim = heads x head channels, which
   Net2Net cannot widen alone.

The program generator avoids a channel count equal to a spatial size (programs: 7x7 inputs, even
channel counts), a coincidence on which units used to differ between widths (fixed: channel dims
come from the analysis; the regression test at the end covers it).

Every property runs ``derandomize=True`` (the same examples every run) with 12-30 examples;
``benchmarks/properties.py`` runs the same checks on the same strategies with a long profile
(so does this file with ``FXMERGE_PROPERTY_EXAMPLES=200`` in the environment).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
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
from fxmerge.testing import net2net_groups, net2net_widen, random_permute

from conftest import assert_invariant, randomize_

IN_CHANNELS = 3
ZOO_IMAGE = 8  # zoo models: 8x8 (three 2x poolings of VGG, patches of 2 or 4 for ViT)
# Programs: 7x7 inputs (pooled to 3x3, 1x1) and even channel counts, so that a channel count never
# equals a spatial size -- see test_channels_last_norm_units_do_not_depend_on_width_coincidence
PROGRAM_IMAGE = 7
BATCH = 8
CALIBRATION_BATCHES = 4
NUM_OUTPUTS = 3

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

    def __init__(self, program: Program, in_channels: int = IN_CHANNELS, image: int = PROGRAM_IMAGE) -> None:
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


EVEN = st.sampled_from((4, 6, 8, 10, 12))
BLOCK_KINDS = ("conv", "residual", "dense", "se", "depthwise", "grouped", "norm", "pool", "mha", "sdpa")


@st.composite
def programs(draw, kinds: tuple[str, ...] = BLOCK_KINDS, min_blocks: int = 2, max_blocks: int = 5) -> Program:
    """A random ``Program``: every channel count is even (the input is 7x7, see PROGRAM_IMAGE)."""
    stem = draw(EVEN)
    stem_norm, stem_groups = draw(_norm(stem))
    channels, size = stem, PROGRAM_IMAGE
    blocks: list[Block] = []
    for _ in range(draw(st.integers(min_blocks, max_blocks))):
        allowed = [k for k in kinds if not (k == "pool" and size < 2) and not (k == "dense" and channels > 16)]
        kind = draw(st.sampled_from(allowed))
        if kind in ("conv", "residual"):
            out = draw(EVEN)
            norm, groups = draw(_norm(out))
            blocks.append(Block(kind, out=out, norm=norm, gn_groups=groups))
            channels = out
        elif kind == "grouped":
            groups = draw(st.sampled_from([g for g in _divisors(channels, 4) if g > 1]))
            out = groups * draw(st.sampled_from((2, 4)))
            norm, gn_groups = draw(_norm(out))
            blocks.append(Block(kind, out=out, norm=norm, gn_groups=gn_groups, groups=groups))
            channels = out
        elif kind == "dense":
            growth = draw(st.sampled_from((2, 4, 6)))
            norm, groups = draw(_norm(growth))
            blocks.append(Block(kind, out=growth, norm=norm, gn_groups=groups))
            channels += growth
        elif kind == "se":
            blocks.append(Block(kind, hidden=draw(st.integers(2, 6))))
        elif kind in ("depthwise", "norm"):
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
            **dict(self.options), in_channels=IN_CHANNELS, image_size=ZOO_IMAGE, num_outputs=NUM_OUTPUTS
        )

    def __repr__(self) -> str:
        return f"zoo.{self.family}({', '.join(f'{k}={v!r}' for k, v in self.options)})"


def _spec(family: str, **options: object) -> ZooSpec:
    return ZooSpec(family, tuple(sorted(options.items())))


WIDTHS = st.integers(4, 16)
STAGES = st.lists(st.integers(1, 2), min_size=1, max_size=3).map(tuple)


@st.composite
def resnets(draw, blocks: tuple[int, ...] | None = None) -> ZooSpec:
    return _spec("resnet", blocks_per_stage=draw(STAGES) if blocks is None else blocks, width=draw(WIDTHS))


@st.composite
def vggs(draw) -> ZooSpec:
    convs = draw(STAGES)
    widths = tuple(draw(st.lists(WIDTHS, min_size=len(convs), max_size=len(convs))))
    return _spec("vgg", cfg=zoo.vgg_cfg(convs, widths), batch_norm=draw(st.booleans()), hidden=draw(WIDTHS))


@st.composite
def mlps(draw) -> ZooSpec:
    hidden = tuple(draw(st.lists(WIDTHS, min_size=1, max_size=3)))
    return _spec("mlp", hidden=hidden, layernorm=draw(st.booleans()))


@st.composite
def vits(draw, layers: int | None = None, heads: int | None = None, patch: int | None = None) -> ZooSpec:
    heads = draw(st.sampled_from((1, 2, 4))) if heads is None else heads
    return _spec(
        "vit",
        patch_size=draw(st.sampled_from((2, 4))) if patch is None else patch,
        num_layers=draw(st.integers(1, 2)) if layers is None else layers,
        num_heads=heads,
        hidden_dim=heads * draw(st.integers(2, 4)),
        mlp_dim=draw(WIDTHS),
    )


def zoo_models(families: tuple[str, ...] = ("resnet", "vgg", "mlp", "vit")) -> st.SearchStrategy[ZooSpec]:
    strategies = {"resnet": resnets(), "vgg": vggs(), "mlp": mlps(), "vit": vits()}
    return st.one_of(*(strategies[f] for f in families))


@st.composite
def deeper_pairs(draw) -> tuple[ZooSpec, ZooSpec, str]:
    """(shallow, deeper sibling, depth objective) of one family and stage structure.

    The deep model has 1-2 more layers (ViT) or 0-2 more blocks / convs per stage (at least one
    more in all). Widths differ between the two: the extension takes the shallow model's widths.
    Widths are drawn independently (a layer may be square in one model and not in the other: depth
    alignment ignores channel counts); both VGGs make the same BatchNorm choice.
    """
    family = draw(st.sampled_from(("resnet", "vgg", "vit")))
    objective = draw(st.sampled_from(("lma", "sma")))
    if family == "vit":
        shallow = draw(vits())
        options = dict(shallow.options)
        deep = draw(vits(options["num_layers"] + draw(st.integers(1, 2)), options["num_heads"], options["patch_size"]))
        return shallow, deep, objective
    stages = draw(STAGES)
    extra = tuple(draw(st.lists(st.integers(0, 2), min_size=len(stages), max_size=len(stages))))
    if not any(extra):
        extra = (1, *extra[1:])
    deeper = tuple(a + b for a, b in zip(stages, extra))
    if family == "resnet":
        return draw(resnets(stages)), draw(resnets(deeper)), objective
    batch_norm = draw(st.booleans())  # with and without BatchNorm are different structures
    shallow, deep = (
        _spec("vgg", cfg=zoo.vgg_cfg(convs, widths), batch_norm=batch_norm, hidden=draw(WIDTHS))
        for convs, widths in (
            (stages, tuple(draw(st.lists(WIDTHS, min_size=len(stages), max_size=len(stages))))),
            (deeper, tuple(draw(st.lists(WIDTHS, min_size=len(stages), max_size=len(stages))))),
        )
    )
    return shallow, deep, objective


# ----------------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


Spec = ZooSpec | Program


def _image(spec: Spec) -> int:
    return ZOO_IMAGE if isinstance(spec, ZooSpec) else PROGRAM_IMAGE


def calibration(spec: Spec) -> list[Tensor]:
    """CALIBRATION_BATCHES batches of BATCH standard normal images of the spec's size."""
    generator = torch.Generator().manual_seed(0)
    size = _image(spec)
    return [torch.randn(BATCH, IN_CHANNELS, size, size, generator=generator) for _ in range(CALIBRATION_BATCHES)]


def fresh_inputs(spec: Spec) -> Tensor:
    """Inputs outside the calibration data (another generator, scale and offset)."""
    generator = torch.Generator().manual_seed(1000)
    size = _image(spec)
    return 1.3 * torch.randn(2 * BATCH, IN_CHANNELS, size, size, generator=generator) + 0.2


def build(spec: Spec, seed: int = 0) -> nn.Module:
    """The model of ``spec`` with random weights everywhere, then BatchNorm statistics of the
    calibration batches; eval mode."""
    torch.manual_seed(seed)
    model = spec.build() if isinstance(spec, ZooSpec) else ProgramNet(spec)
    randomize_(model.eval(), seed + 1)
    reset_batchnorm(model, calibration(spec), quiet=True)
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


# -------------------------------------------------------------------------------- properties


def check_invariance(spec: Spec) -> None:
    """random_permute keeps the function; exactly the tensors carrying a free group change."""
    batches = calibration(spec)
    model, x = build(spec), fresh_inputs(spec)
    with warnings.catch_warnings():
        # every op the generators use has a rule: a fail-closed warning here is a coverage gap
        warnings.simplefilter("error")
        analysis = fxmerge.analyze(model, batches[0])
    # a model with nothing to permute must be one the analysis failed closed on, with reasons
    # (e.g. a depthwise conv over a DenseNet concatenation: "grouped conv ... over concatenated channels")
    assert analysis.free_groups or all(g.reason for g in analysis.groups), analysis.summary()
    y = output(model, x)
    assert y.abs().max() > 0
    twin = random_permute(model, batches[0], seed=1).eval()
    err = max_relative(y, output(twin, x))
    assert err <= 1e-4, f"random_permute changed the outputs: {err:.2e}"
    assert_invariant(model, x, analysis, seed=2, rtol=1e-4)


def check_recovery(spec: Spec) -> None:
    """merge([m, permuted m], method="permute") gives m back, on calibration and fresh inputs."""
    batches = calibration(spec)
    model = build(spec)
    twin = random_permute(model, batches[0], seed=1).eval()
    result = fxmerge.merge([model, twin], batches, method="permute", quiet=True)
    assert all(g.width == g.sizes[0] for g in result.groups)
    for x in (batches[0], fresh_inputs(spec)):
        err = norm_relative(output(model, x), output(result.module, x))
        assert err < 1e-3, f"merged model differs from m: {err:.2e}"


def check_extension(pair: tuple[ZooSpec, ZooSpec, str]) -> None:
    """align_depth + extend: the deep structure, computing the shallow function on fresh inputs."""
    shallow_spec, deep_spec, objective = pair
    batches = calibration(shallow_spec)
    shallow, deep = build(shallow_spec, 0), build(deep_spec, 1)
    shallow_gm, deep_gm = fxmerge.trace(shallow, batches[0]), fxmerge.trace(deep, batches[0])
    deep_units, shallow_units = find_units(deep_gm), find_units(shallow_gm)
    assert len(deep_units) > len(shallow_units)
    alignment = align_depth(deep_gm, shallow_gm, batches, objective, 1, quiet=True)
    assert len(alignment.segments) == len(shallow_units)
    assert [j for s in alignment.segments for j in s] == list(range(len(deep_units)))
    extended = extend(shallow_gm, deep_gm, alignment, batches[0])
    structure = [(n.op, str(n.target)) for n in extended.graph.nodes]
    assert structure == [(n.op, str(n.target)) for n in deep_gm.graph.nodes]
    x = fresh_inputs(shallow_spec)
    expected = output(shallow, x)
    assert expected.abs().max() > 0
    err = max_relative(expected, output(extended, x))
    assert err <= 1e-5, f"the extension differs from the shallow model: {err:.2e}"


def check_net2net(spec: Spec) -> None:
    """zip(width="min") at the default alpha of [m, Net2Net-widened m] gives m back."""
    batches = calibration(spec)
    model = build(spec)
    analysis = fxmerge.analyze(model, batches[0])
    if not net2net_groups(analysis):
        # nothing to widen: only where the analysis failed closed (a GroupNorm or depthwise conv
        # over a DenseNet concatenation fixes the channels it reads), never silently
        assert all(g.reason for g in analysis.groups if g.fixed) and not any(
            g.kind == "channels" and g.consumers for g in analysis.free_groups if not g.factor_of
        ), analysis.summary()
        return
    wide = net2net_widen(model, batches[0], 2)
    assert params(wide) > params(model), "nothing was widened"
    x = fresh_inputs(spec)
    y = output(model, x)
    err = max_relative(y, output(wide, x))
    assert err <= 1e-5, f"the Net2Net widening changed the function: {err:.2e}"
    result = fxmerge.merge([model, wide], batches, method="zip", width="min", quiet=True)  # default alpha
    assert params(result.module) == params(model)
    for inputs in (batches[0], x):
        err = norm_relative(output(model, inputs), output(result.module, inputs))
        assert err < 1e-3, f"merged model differs from m: {err:.2e}"


# ---------------------------------------------------------------------------------- the tests

# An nn.MultiheadAttention's residual stream is its embed dim = heads x head channels, which
# Net2Net leaves alone (fxmerge.testing.net2net_widen): no ViTs, no "mha" blocks when widening.
WIDENABLE_KINDS = tuple(k for k in BLOCK_KINDS if k != "mha")

# name -> (check, strategy, examples in this suite); benchmarks/properties.py runs the same
# checks on the same strategies with many more examples.
PROPERTIES: dict[str, tuple[Callable, st.SearchStrategy, int]] = {
    "invariance/zoo": (check_invariance, zoo_models(), 20),
    "invariance/programs": (check_invariance, programs(), 30),
    "recovery/zoo": (check_recovery, zoo_models(), 15),
    "recovery/programs": (check_recovery, programs(), 25),
    "extension/zoo": (check_extension, deeper_pairs(), 20),
    "net2net/zoo": (check_net2net, zoo_models(("resnet", "vgg", "mlp")), 12),
    "net2net/programs": (check_net2net, programs(WIDENABLE_KINDS), 25),
}


if os.environ.get("FXMERGE_PROPERTY_EXAMPLES"):  # a longer profile, outside the timed suite
    PROPERTIES = {
        name: (check, strategy, int(os.environ["FXMERGE_PROPERTY_EXAMPLES"]))
        for name, (check, strategy, _) in PROPERTIES.items()
    }


def property_settings(max_examples: int) -> settings:
    """Deterministic (``derandomize``: the same examples on every run), no deadline, no database."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _property_test(name: str) -> Callable[[], None]:
    check, strategy, examples = PROPERTIES[name]

    @property_settings(examples)
    @given(case=strategy)
    def test(case) -> None:
        check(case)

    test.__name__ = f"test_{name.replace('/', '_')}"
    test.__doc__ = check.__doc__
    return test


test_invariance_zoo = _property_test("invariance/zoo")
test_invariance_programs = _property_test("invariance/programs")
test_recovery_zoo = _property_test("recovery/zoo")
test_recovery_programs = _property_test("recovery/programs")
test_extension_zoo = _property_test("extension/zoo")
test_net2net_zoo = _property_test("net2net/zoo")
test_net2net_programs = _property_test("net2net/programs")


# ------------------------------------------------------------------- minimal repros of findings


def test_grouped_conv_channels_per_group_are_matched() -> None:
    """Regression, minimised from recovery/programs and net2net/programs: a conv read by a grouped
    conv (ResNeXt's conv1 -> conv2) used to be merged silently wrong.

    The conv's output channels factor into (groups x input channels per group); the grouped conv
    reads the per-group factor alone (weight dim 1), so one transform of that factor acts on every
    group. It had neither activation statistics nor weight features when its turn came ("none:
    identity"): the permuted twin was merged with the factor in identity order (torchvision
    resnext50_32x4d: 0.82 relative error). The product (groups x channels per group) is now
    observed as a whole, groups are paired first, and the per-group factor is matched once on the
    similarity averaged over paired groups (``width.Structure.shared``).
    """
    spec = Program(4, "none", 1, (Block("grouped", out=4, groups=2), Block("conv", out=4)), "pool", 0)
    check_recovery(spec)
    check_net2net(spec)


def test_groupnorm_residual_block_is_recovered() -> None:
    """Regression, minimised from recovery/programs: a residual block with GroupNorm(2 groups) after
    a stem without one. The GroupNorm composites (groups x channels per group) used to be matched
    from weight features only, in topological order, where conv1's weights (reading the unmatched
    stream) were skipped: 2 features per unit (norm weight and bias), correlation always +-1, an
    arbitrary matching (0.23 relative error). Composites now get activation statistics."""
    spec = Program(4, "none", 1, (Block("residual", out=4, norm="gn", gn_groups=2), Block("conv", out=4)), "pool", 0)
    check_recovery(spec)


def test_weight_matched_groups_wait_for_observed_neighbours() -> None:
    """Regression, minimised from recovery/programs: attention inside ``nn.MultiheadAttention``
    (no activations to observe) before a grouped conv. Its v channels were matched on weights in
    topological order, before the residual stream they read and write, so only the in-projection
    bias was left as a feature: an arbitrary matching (0.43 relative error). Groups whose
    activations tell their units apart are now matched first."""
    spec = Program(4, "none", 1, (Block("mha"), Block("grouped", out=4, groups=2)), "pool", 0)
    check_recovery(spec)


def test_tied_units_are_matched_after_their_neighbours() -> None:
    """Regression, minimised from recovery/programs: an SE block's 2 hidden units tied on the
    calibration data (exact on it, 1e-2 relative error on fresh inputs) because the weight
    tie-break ran before the stream its weights read was matched. Tied groups now wait too."""
    spec = Program(
        4, "none", 1,
        (Block("conv", out=4, norm="bn"), Block("sdpa", hidden=2), Block("mha"), Block("se", hidden=2), Block("grouped", out=4, groups=2)),
        "pool", 0,
    )
    check_recovery(spec)


def test_nested_group_structures_use_merged_blocks_in_weight_features() -> None:
    """Regression, minimised from recovery/programs: a GroupNorm(2) over a grouped conv's output
    (groups=4) nests three factors on one axis. The weight features of the innermost factor were
    read with the outer blocks in each model's own order (not aligned across models): 0.22
    relative error. ``unit_weight_features`` now brings the matched factors of the key's own
    axis into the merged basis first."""
    spec = Program(
        4, "none", 1,
        (Block("conv", out=4), Block("norm"), Block("se", hidden=3), Block("grouped", out=8, norm="gn", gn_groups=2, groups=4)),
        "pool", 0,
    )
    check_recovery(spec)


def test_grouped_conv_merged_with_itself_is_the_model() -> None:
    """Regression: merging [m, m] used to scale the conv before a grouped conv by 1/2 (the merge
    matrices of its two factors, groups and channels per group, each averaged the models:
    1/K**2), so even ``method="average"`` of a model with itself changed it (0.13 relative error on
    torchvision resnext50_32x4d). Fixed in ``merged_state`` by normalising each merged entry by
    the total weight the models' merge matrices give it."""
    spec = Program(4, "none", 1, (Block("grouped", out=4, groups=2), Block("conv", out=4)), "pool", 0)
    batches = calibration(spec)
    model = build(spec)
    x = fresh_inputs(spec)
    for method in ("average", "permute", "zip"):
        result = fxmerge.merge([model, model], batches, method=method, quiet=True)
        assert norm_relative(output(model, x), output(result.module, x)) < 1e-6, method


def test_width_change_keeps_depthwise_and_instance_groupnorm_per_channel() -> None:
    """Regression: a width change of a channel group read by a depthwise conv (groups = channels)
    or a GroupNorm with one channel per group kept the old ``groups`` / ``num_groups``: merging
    widths 4 and 6 at width="max" gave a model that crashed (depthwise) or a GroupNorm(4, 8)
    normalising pairs of channels (width=8). ``load_state_resizing`` now keeps them per channel.
    A depthwise conv with a channel multiplier keeps its ``groups`` when the multiplier widens."""
    small = Program(4, "gn", 4, (Block("depthwise", norm="gn", gn_groups=4),), "pool", 0)
    large = Program(6, "gn", 6, (Block("depthwise", norm="gn", gn_groups=6),), "pool", 0)
    batches = calibration(small)
    models = [build(small), build(large, 1)]
    for width, channels in (("max", 6), ("min", 4), (8, 8)):
        merged = fxmerge.merge(models, batches, method="zip", width=width, quiet=True).module
        conv = merged.get_submodule("blocks.0.block.conv")
        norms = [merged.get_submodule(n) for n in ("stem.norm.norm", "blocks.0.block.norm.norm")]
        assert conv.groups == conv.in_channels == conv.out_channels == channels
        assert all(n.num_groups == n.num_channels == channels for n in norms)
        output(merged, batches[0])
    multiplier = Program(4, "none", 1, (Block("se", hidden=2), Block("grouped", out=8, groups=4)), "pool", 0)
    model = build(multiplier)
    wide = net2net_widen(model, batches[0], 2)  # widens the 2 outputs per input channel to 4
    assert wide.get_submodule("blocks.1.conv").groups == 4
    assert max_relative(output(model, batches[0]), output(wide, batches[0])) < 1e-5


def test_collinear_dead_units_are_told_apart_by_weights() -> None:
    """Regression, minimised from net2net/programs: channels dead after the stem's ReLU become, after
    a later LayerNorm, affine functions of the same per-position statistics, so their activations
    correlate exactly +-1 without being one feature. zip merged two of them (and permute could
    swap them): a wrong model. Such collinear units now get the weight tie-break that constant
    (dead) units get."""
    spec = Program(12, "ln", 1, (Block("pool"), Block("norm", norm="ln")), "pool", 0)
    check_net2net(spec)
    check_recovery(spec)


def test_channels_last_norm_units_do_not_depend_on_width_coincidence() -> None:
    """Regression: ``find_units`` decided that a layer-free spine step reshapes by comparing tensor
    shapes, so ``x.permute(0, 2, 3, 1)`` of an (N, C, H, W) tensor "reshaped" unless C == H == W:
    a ConvNeXt-style channels-last LayerNorm made its own unit at 4 channels on 8x8 inputs but not
    at 8 channels, and merging a model with its Net2Net widening failed (IncompatibleModelsError).
    Channel dims now come from the analysis: the units are the same at both widths and the merge
    gives the model back."""
    spec = Program(4, "ln", 1, (Block("conv", out=6, norm="ln"),), "pool", 0)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(BATCH, IN_CHANNELS, 8, 8, generator=generator) for _ in range(CALIBRATION_BATCHES)]
    torch.manual_seed(0)
    model = randomize_(ProgramNet(spec, image=8).eval(), 1)
    wide = net2net_widen(model, batches[0], 2)  # 4 -> 8 stem channels on 8x8: C == H == W
    units = [find_units(fxmerge.trace(m, batches[0])) for m in (model, wide)]
    assert [(u.kind, u.end, u.layout_change) for u in units[0]] == [(u.kind, u.end, u.layout_change) for u in units[1]]
    assert any(u.kind == "other" and u.in_channel_dims == u.out_channel_dims == (1,) for u in units[1])
    result = fxmerge.merge([model, wide], batches, method="zip", width="min", quiet=True)
    assert norm_relative(output(model, batches[0]), output(result.module, batches[0])) < 1e-3


def test_depth_alignment_ignores_square_layer_coincidence() -> None:
    """Regression (found by extension/zoo, fixed in ``depth._shape_change``): a ResNet of width 5 with
    5 outputs has a square head (5 -> 5, shape-preserving) and used to be impossible to align with
    a deeper ResNet of width 6 (6 -> 5): IncompatibleModelsError."""
    batches = calibration(_spec("resnet"))
    shallow = zoo.resnet((2,), 6, in_channels=IN_CHANNELS, image_size=ZOO_IMAGE, num_outputs=5).eval()
    deep = zoo.resnet((3,), 5, in_channels=IN_CHANNELS, image_size=ZOO_IMAGE, num_outputs=5).eval()
    deep_gm, shallow_gm = fxmerge.trace(deep, batches[0]), fxmerge.trace(shallow, batches[0])
    alignment = align_depth(deep_gm, shallow_gm, batches, "lma", 1, quiet=True)
    extended = extend(shallow_gm, deep_gm, alignment, batches[0])
    x = fresh_inputs(_spec("resnet"))
    assert max_relative(output(shallow, x), output(extended, x)) <= 1e-5


def test_group_beside_a_fixed_group_is_observed_through_their_product() -> None:
    """Regression, minimised from recovery/programs: a GroupNorm over concatenated channels fixes
    its groups, so the stream's other factor (channels per group) only ever appears in a product
    with a fixed group. It had no statistics, was matched on weights (0.05 relative error), and
    attention's v channels, matched on weights next, saw it unmatched. The product's statistics
    now give the free factor its own (``width.factor_statistics``)."""
    spec = Program(
        4, "none", 1,
        (Block("conv", out=6), Block("sdpa", hidden=2), Block("mha"), Block("se", hidden=2), Block("grouped", out=6, norm="gn", gn_groups=2, groups=3)),
        "pool", 0,
    )
    check_recovery(spec)


def test_nested_products_are_observed_as_a_whole() -> None:
    """Regression, minimised from recovery/programs (all 7 of its failures in the 200-example
    profile): a GroupNorm(4) over the output of a grouped conv (groups=2) nests three groups on
    one axis (conv groups x GroupNorm groups per conv group x channels per GroupNorm group). No
    tap held a product of just two of them, so the middle product was matched in identity order
    and the last factor on weights: 0.22 relative error. Products of any number of groups are now
    observed, and a factor's statistics are read off the product once the factors before it are
    matched (``width.product_statistics``)."""
    spec = Program(
        10, "gn", 1,
        (Block("pool"), Block("norm", norm="bn"), Block("grouped", out=8, groups=2), Block("grouped", out=8, norm="gn", gn_groups=4, groups=2)),
        "flatten", 8,
    )
    check_recovery(spec)
