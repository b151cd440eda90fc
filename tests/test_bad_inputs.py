"""Bad inputs give clear errors and leave the models alone; merges are
deterministic.

Every bad input must raise the matching ``fxmerge.errors`` type with a message that names the
culprit (model index, batch index, node or option) — never a raw torch error — and the input
models must come out untouched: state_dict bit-identical, every submodule's training flag as it
was. Inputs that are odd but legal (a model in train mode, float64 data, dead ReLUs, tied
parameters) must merge correctly.

Determinism: the same inputs and seed give bit-identical merged weights twice in one process and
in two fresh interpreters (with different ``PYTHONHASHSEED``, so set/dict-order dependence shows).

Devices: CUDA is not available here, so the device checks are exercised with the ``meta`` device,
a real second device for which the comparison of parameter devices is exactly the same code path.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge import zoo
from fxmerge.errors import CalibrationError, ConfigError, FxMergeError, IncompatibleModelsError
from fxmerge.inputs import as_batch, calibration_inputs
from fxmerge.testing import random_permute
from conftest import output_of, random_batches, relative_error, same_state


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- helpers


def _resnet(seed: int = 0, stages: tuple[int, ...] = (1, 1, 1), in_channels: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.resnet(stages, width=8, in_channels=in_channels, image_size=8).eval()


def _vgg(seed: int = 0, cfg: tuple = (16, "M", 32, "M", 64, "M"), batch_norm: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.vgg(cfg, batch_norm=batch_norm, in_channels=1, image_size=8).eval()


BATCHES = random_batches(count=3)


def _snapshot(models: list[Any]) -> list[tuple[dict[str, torch.Tensor], list[bool]] | None]:
    out = []
    for m in models:
        if not isinstance(m, nn.Module):
            out.append(None)
            continue
        state = {k: v.detach().clone() for k, v in m.state_dict().items()}
        out.append((state, [sub.training for sub in m.modules()]))
    return out


def _assert_untouched(models: list[Any], snapshot: list) -> None:
    for index, (m, snap) in enumerate(zip(models, snapshot)):
        if snap is None:
            continue
        state, flags = snap
        after = m.state_dict()
        assert after.keys() == state.keys(), f"models[{index}]: state keys changed"
        for key, before in state.items():
            now = after[key]
            assert now.device == before.device and now.dtype == before.dtype and now.shape == before.shape, key
            if before.device.type != "meta":  # meta tensors have no values to compare
                assert torch.equal(now, before), f"models[{index}]: {key} changed"
        assert [sub.training for sub in m.modules()] == flags, f"models[{index}]: training flags changed"


def _expect(error: type[FxMergeError], models: Any, calibration: Any, *fragments: str, **options: Any) -> str:
    """merge() must raise ``error`` (exactly that fxmerge type) whose message holds every fragment,
    and leave the models untouched. Returns the message."""
    listed = list(models) if isinstance(models, (list, tuple)) else [models]
    snapshot = _snapshot(listed)
    with pytest.raises(FxMergeError) as caught:
        fxmerge.merge(models, calibration, quiet=True, **options)
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {caught.value}"
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    _assert_untouched(listed, snapshot)
    return message


# ---------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("which", ["none", "one", "single module", "a dict", "not a module"])
def test_fewer_than_two_models(which: str) -> None:
    a = _resnet()
    models: Any = {"none": [], "one": [a], "single module": a, "a dict": {"a": a, "b": a}, "not a module": [a, "b"]}[which]
    fragment = {"none": "got 0", "one": "got 1", "single module": "single _ResNet", "a dict": "dict",
                "not a module": "models[1] is a str"}[which]
    _expect(ConfigError, models, BATCHES, "at least 2 models" if which != "not a module" else "nn.Module", fragment)


def test_a_module_list_is_a_list_of_models() -> None:
    a, b = _resnet(0), _resnet(1)
    listed = fxmerge.merge([a, b], BATCHES, quiet=True).module
    wrapped = fxmerge.merge(nn.ModuleList([a, b]), BATCHES, quiet=True).module
    assert same_state(listed, wrapped)


def test_models_of_different_families_different_depths() -> None:
    """ResNet (6 units) and VGG (8 units): depth alignment runs first and finds no unit of the VGG
    that can stand for the ResNet's first residual block; the error names both models and nodes."""
    message = _expect(
        IncompatibleModelsError, [_resnet(), _vgg()], BATCHES,
        "models[0] (_ResNet)", "models[1] (_VGG)", "6 units", "8 units", "'stage1_0_relu2'", "'features_3'",
    )
    assert "no unit" in message


def test_models_of_different_families_same_depth() -> None:
    """ResNet and a VGG with as many units: the structure check names the first differing node."""
    _expect(
        IncompatibleModelsError, [_resnet(), _vgg(cfg=(16, "M", 32, "M"))], BATCHES,
        "models[1] (_VGG) differs from models[0] (_ResNet)", "graph node", "'features_3'", "MaxPool2d",
        "'stage1_0_conv1'", "Conv2d",
    )


def test_incompatible_stage_structure() -> None:
    """Three stages vs four: the extra stage downsamples, so it cannot become an identity."""
    _expect(
        IncompatibleModelsError, [_resnet(stages=(1, 1, 1)), _resnet(1, stages=(1, 1, 1, 1))], BATCHES,
        "models[0] (_ResNet), 6 units", "models[1] (_ResNet), 7 units", "'flatten'",
    )


@pytest.mark.parametrize("order", ["good first", "bad first"])
def test_different_input_shapes_name_the_model(order: str, capfd: pytest.CaptureFixture[str]) -> None:
    """First conv expects 3 channels, the data has 1: the failing model is named (no raw torch
    RuntimeError, no ShapeProp traceback dumped on stderr)."""
    good, bad = _resnet(), _resnet(1, in_channels=3)
    models = [good, bad] if order == "good first" else [bad, good]
    k_bad, k_good = (1, 0) if order == "good first" else (0, 1)
    capfd.readouterr()
    _expect(
        IncompatibleModelsError, models, BATCHES,
        f"models[{k_bad}] (_ResNet) fails on calibration batch 0", "(16, 1, 8, 8)", f"models[{k_good}] (_ResNet) accepts",
        "3 channels",
    )
    assert "Traceback" not in capfd.readouterr().err


def test_data_no_model_accepts_is_a_calibration_error() -> None:
    long_data = [torch.zeros(16, 1, 8, 8, dtype=torch.long)]
    _expect(CalibrationError, [_resnet(), _resnet(1)], long_data, "no model accepts calibration batch 0", "int64")


def test_model_in_train_mode_is_merged_as_in_eval_mode() -> None:
    a, b = _resnet(0), _resnet(1)
    a_train = copy.deepcopy(a).train()
    expected = fxmerge.merge([a, b], BATCHES, quiet=True).module
    models = [a_train, b]
    snapshot = _snapshot(models)
    result = fxmerge.merge(models, BATCHES, quiet=True).module
    _assert_untouched(models, snapshot)  # BatchNorm running stats too: no train-mode forward ran
    assert a_train.training and all(sub.training for sub in a_train.modules())
    assert not b.training and not result.training
    assert same_state(expected, result)


# ----------------------------------------------------------------------------------- calibration


def _nan_at(index: int, value: float) -> list[torch.Tensor]:
    batches = [b.clone() for b in BATCHES]
    batches[index][3, 0, 2, 2] = value
    return batches


CALIBRATION_CASES = {
    "empty list": ([], "empty"),
    "empty generator": ((b for b in []), "empty"),
    "single tensor": (BATCHES[0], "not a single tensor"),
    "not iterable": (42, "int"),  # None is a data-free merge (tests/test_datafree.py)
    "not tensors": ([1, 2], "batch 0 is of type int"),
    "label tuple of non-tensors": ([(BATCHES[0], 1), ("x", 1)], "batch 1 is of type tuple"),
    "second batch other shape": ([BATCHES[0], torch.randn(16, 1, 9, 8)], "batch 1 has shape (16, 1, 9, 8)"),
    "batch without samples": ([BATCHES[0], BATCHES[1][:0]], "batch 1 has shape (0, 1, 8, 8)"),
    "0-d batch": ([torch.tensor(1.0)], "batch 0 has shape ()"),
    "second batch other dtype": ([BATCHES[0], BATCHES[1].double()], "batch 1 is torch.float64"),
    "NaN in batch 2": (_nan_at(2, float("nan")), "batch 2 contains NaN or Inf"),
    "Inf in batch 1": (_nan_at(1, float("inf")), "batch 1 contains NaN or Inf"),
    "-Inf in (x, y) batch 0": ([(b, torch.zeros(16)) for b in _nan_at(0, float("-inf"))], "batch 0 contains NaN"),
}


@pytest.mark.parametrize("case", list(CALIBRATION_CASES))
def test_bad_calibration(case: str) -> None:
    calibration, fragment = CALIBRATION_CASES[case]
    _expect(CalibrationError, [_resnet(0), _resnet(1)], calibration, fragment)


def test_calibration_draws_no_more_than_it_uses() -> None:
    def stream() -> Iterator[torch.Tensor]:
        yield from BATCHES[:2]
        raise AssertionError("a third batch was drawn")

    assert len(calibration_inputs(stream(), 2)) == 2
    # ... and the batches after the limit are not even looked at (a NaN there is fine)
    assert len(calibration_inputs(_nan_at(2, float("nan")), 2)) == 2


def test_float64_data_for_float32_models_is_cast_with_a_warning() -> None:
    a, b = _resnet(0), _resnet(1)
    reference = fxmerge.merge([a, b], BATCHES, quiet=True).module
    with pytest.warns(UserWarning, match="calibration batches are float64, the models float32: casting"):
        result = fxmerge.merge([a, b], [x.double() for x in BATCHES], quiet=True).module
    assert same_state(reference, result)


def test_float64_models_with_float32_data() -> None:
    m = _resnet(0).double()
    with pytest.warns(UserWarning, match="casting the batches to float64"):
        result = fxmerge.merge([m, random_permute(m, BATCHES[0].double(), seed=1)], BATCHES, quiet=True).module
    assert all(v.dtype == torch.float64 for v in result.state_dict().values() if v.is_floating_point())
    x = BATCHES[0].double()
    assert torch.isfinite(output_of(result, x)).all()


# ------------------------------------------------------------------------------- dtypes, devices


def test_models_of_different_dtypes() -> None:
    _expect(
        IncompatibleModelsError, [_resnet(0), _resnet(1).double()], BATCHES,
        "one dtype", "models[0] (_ResNet) is float32", "models[1] (_ResNet) is float64",
    )


def test_models_on_different_devices() -> None:
    """Tested with the meta device (no CUDA here): the check compares parameter devices."""
    _expect(
        IncompatibleModelsError, [_resnet(0), _resnet(1).to("meta")], BATCHES,
        "one device", "models[0] (_ResNet) is cpu", "models[1] (_ResNet) is meta",
    )


def test_model_spread_over_two_devices() -> None:
    split = _resnet(1)
    split.head.to("meta")
    _expect(IncompatibleModelsError, [_resnet(0), split], BATCHES, "models[1] (_ResNet)", "several devices", "cpu/meta")


def test_calibration_on_another_device_is_moved_batch_by_batch() -> None:
    # "meta" stands in for a GPU: a device other than the batches' cpu, with no data to compute
    model = nn.Linear(4, 3).to("meta")
    batch = as_batch(torch.randn(2, 4))
    out = batch.run(model)
    assert (out.device.type, tuple(out.shape)) == ("meta", (2, 3))
    gm = torch.fx.symbolic_trace(model)
    assert [value.device.type for value in batch.placeholders(gm)] == ["meta"]
    assert batch.tensors()[0].device.type == "cpu"  # the caller's batch itself stays where it is


# -------------------------------------------------------------------------------------- options


WIDTH_CASES = {
    "zero": (0, "width=0"),
    "negative": (-3, "width=-3"),
    "negative float": (-1.0, "width=-1.0"),
    "nan": (float("nan"), "width=nan"),
    "true": (True, "width=True"),
    "false": (False, "width=False"),
    "bad string": ("huge", "width='huge'"),
    "above the sum of widths": (10**6, "target width 1000000 outside 1..16"),
    "dict value zero": ({"stem.0:out": 0}, "width['stem.0:out']=0"),
    "dict unknown group": ({"no_such_group": 4}, "no group named 'no_such_group'"),
}


@pytest.mark.parametrize("case", list(WIDTH_CASES))
def test_bad_width(case: str) -> None:
    width, fragment = WIDTH_CASES[case]
    _expect(ConfigError, [_resnet(0), _resnet(1)], BATCHES, fragment, width=width)


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("method", "foo", ("average", "permute", "zip", "mudsc")),
        ("method", None, ("average", "permute", "zip", "mudsc")),
        ("depth", "dp", ("lma", "sma")),
        ("output", "both", ("shared", "concat")),
    ],
)
def test_unknown_choice_lists_the_allowed_values(option: str, value: Any, allowed: tuple[str, ...]) -> None:
    _expect(ConfigError, [_resnet(0), _resnet(1)], BATCHES, f"{option}={value!r}", *map(repr, allowed), **{option: value})


@pytest.mark.parametrize(
    ("stop_at", "fragments"),
    [
        ("no_such_node", ("stop_at='no_such_node'", "'stage1_0_relu2'", "'flatten'")),
        (99, ("stop_at=99", "0..5")),
        (-1, ("stop_at=-1", "0..5")),
        (1.5, ("stop_at=1.5",)),
        (True, ("stop_at=True",)),
    ],
)
def test_stop_at_not_a_unit(stop_at: Any, fragments: tuple[str, ...]) -> None:
    _expect(ConfigError, [_resnet(0), _resnet(1)], BATCHES, *fragments, stop_at=stop_at)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("alpha", -1.0), ("alpha", True), ("beta", float("nan")), ("balance", 1.5), ("balance", False),
        ("calibration_batches", 0), ("calibration_batches", True), ("strict", "yes"), ("strict", 1),
        ("leaf_modules", "layer1"),
    ],
)
def test_bad_numeric_option(option: str, value: Any) -> None:
    _expect(ConfigError, [_resnet(0), _resnet(1)], BATCHES, f"{option}={value!r}", **{option: value})


# ------------------------------------------------------------------------------------ dead units


def _dead_vgg(seed: int) -> nn.Module:
    """A VGG (no BatchNorm) whose first conv bias is -1000: its whole first ReLU layer is dead, so
    every later feature is constant over the inputs (zero variance)."""
    model = _vgg(seed, batch_norm=False)
    with torch.no_grad():
        model.features[0].bias.fill_(-1e3)
    return model


@pytest.mark.parametrize("method", ["average", "permute", "zip", "mudsc"])
def test_zero_variance_features_give_no_nan(method: str) -> None:
    dead, live = _dead_vgg(0), _vgg(1, batch_norm=False)
    x = BATCHES[0]
    with torch.no_grad():
        assert (dead.features[:2](x) == 0).all(), "the first layer is not dead"
        y_dead = dead(x)
    assert (y_dead.std(dim=0) == 0).all(), "the dead model's output still depends on the input"
    for pair in ([dead, live], [dead, dead]):
        snapshot = _snapshot(pair)
        result = fxmerge.merge(pair, BATCHES, method=method, quiet=True)
        _assert_untouched(pair, snapshot)
        state = result.module.state_dict()
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, f"non-finite merged weights: {bad}"
        assert all(g.similarity is None or g.similarity == g.similarity for g in result.groups), result.groups
        for m in result.matches.values():
            for matrix in (m.merge or ()) + (m.unmerge or ()):
                assert torch.isfinite(matrix).all(), m.name
        y = output_of(result.module, x)
        assert torch.isfinite(y).all()
        if pair[1] is dead:
            assert relative_error(y_dead, y, norm="l2") < 1e-5, "merging the dead model with itself changed its function"


# ---------------------------------------------------------------------------------- tied weights


class _SameLinearTwice(nn.Module):
    """One Linear called at two places: its weights are shared between the two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(12, 16), nn.ReLU()
        self.shared, self.act2, self.act3 = nn.Linear(16, 16), nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(x))
        x = self.act2(self.shared(x))
        x = self.act3(self.shared(x))
        return self.head(x)


class _TwoNamesOneParameter(nn.Module):
    """fc3.weight IS fc2.weight (one Parameter under two names); the biases differ."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(12, 16), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(16, 16), nn.ReLU()
        self.fc3, self.act3 = nn.Linear(16, 16), nn.ReLU()
        self.fc3.weight = self.fc2.weight
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        x = self.act3(self.fc3(x))
        return self.head(x)


MLP_BATCHES = random_batches((32, 12), 4)


@pytest.mark.parametrize("cls", [_SameLinearTwice, _TwoNamesOneParameter])
def test_tied_parameters(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    m = cls().eval()
    x = MLP_BATCHES[0]
    y = output_of(m, x)
    twin = random_permute(m, x, seed=1).eval()
    assert relative_error(y, output_of(twin, x), norm="l2") < 1e-5 and not same_state(m, twin)
    runs = [([m, m], method) for method in ("average", "permute", "zip", "mudsc")]
    runs += [([m, twin], method) for method in ("permute", "zip", "mudsc")]
    for models, method in runs:
        snapshot = _snapshot(models)
        merged = fxmerge.merge(models, MLP_BATCHES, method=method, quiet=True).module
        _assert_untouched(models, snapshot)
        assert relative_error(y, output_of(merged, x), norm="l2") < 1e-4, f"{cls.__name__} {method} twin={models[1] is twin}"
        if cls is _SameLinearTwice:
            calls = [n for n in merged.graph.nodes if n.op == "call_module" and n.target == "shared"]
            assert len(calls) == 2, "the shared Linear is no longer called twice"
        else:
            state = merged.state_dict()
            assert torch.equal(state["fc2.weight"], state["fc3.weight"]), f"{method}: the tie was broken"
            assert not torch.equal(state["fc2.bias"], state["fc3.bias"])
    if cls is _TwoNamesOneParameter:
        assert m.fc3.weight is m.fc2.weight and twin.fc3.weight is twin.fc2.weight


def test_tied_parameter_stays_one_object() -> None:
    torch.manual_seed(0)
    m = _TwoNamesOneParameter().eval()
    merged = fxmerge.merge([m, m], MLP_BATCHES, quiet=True).module
    assert merged.fc3.weight is merged.fc2.weight


# ----------------------------------------------------------------------------------- determinism


DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import hashlib, json
    import torch
    import fxmerge
    from fxmerge import zoo

    def digest(module):
        h = hashlib.sha256()
        for key, value in sorted(module.state_dict().items()):
            h.update(key.encode())
            h.update(str(value.dtype).encode())
            h.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def digests():
        torch.set_num_threads(1)
        models = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            models.append(zoo.resnet((1, 1, 1), width=8, in_channels=1, image_size=8).eval())
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randn(16, 1, 8, 8, generator=generator) for _ in range(3)]
        return {
            method: digest(fxmerge.merge(models, batches, method=method, quiet=True).module)
            for method in ("zip", "mudsc")
        }

    if __name__ == "__main__":
        print(json.dumps(digests()))
    """
)


_DETERMINISM_TEST = "test_bit_identical_in_process_and_in_fresh_interpreters"


@pytest.fixture(scope="module")
def fresh_interpreters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[subprocess.Popen]]:
    """The determinism script running in two fresh interpreters (different PYTHONHASHSEEDs)."""
    script = tmp_path_factory.mktemp("determinism") / "determinism.py"
    script.write_text(DETERMINISM_SCRIPT)
    processes = []
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        processes.append(
            subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        )
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module", autouse=True)
def start_fresh_interpreters_early(request: pytest.FixtureRequest) -> None:
    """Start the interpreters with the module's first test, so their start-up (importing torch and
    fxmerge takes seconds) overlaps the other tests; only when the determinism test will run."""
    if any(item.name == _DETERMINISM_TEST for item in request.session.items):
        request.getfixturevalue("fresh_interpreters")


def test_bit_identical_in_process_and_in_fresh_interpreters(fresh_interpreters: list[subprocess.Popen]) -> None:
    namespace: dict[str, Any] = {"__name__": "determinism"}
    exec(compile(DETERMINISM_SCRIPT, "determinism.py", "exec"), namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = namespace["digests"](), namespace["digests"]()
    assert first == second, "two merges in one process differ"
    assert first["zip"] != first["mudsc"], "zip and mudsc gave the same weights: the check is vacuous"
    for process in fresh_interpreters:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1]) == first, "a fresh interpreter gave other weights"
