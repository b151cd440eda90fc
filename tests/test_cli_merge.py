"""The command line round trip: weights on disk -> `fxmerge merge CONFIG.yaml` -> `fxmerge.load`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import fxmerge
from fxmerge import zoo
from fxmerge.cli import main
from fxmerge.data import digits_tasks, train_classifier

KWARGS = {"in_channels": 1, "image_size": 8, "num_outputs": 10, "width": 8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    split = digits_tasks(seed=0)
    folder = tmp_path_factory.mktemp("cli")
    models = []
    for k, name in enumerate(("a", "b")):
        torch.manual_seed(k)
        model = zoo.resnet(**KWARGS)
        x, y = split.task(name, "train")
        train_classifier(model, x, y, epochs=2, seed=k)
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, folder / f"{name}.safetensors")
        models.append(model.eval())
    calibration = split.x_train[:256]
    save_file({"inputs": calibration.contiguous()}, folder / "calib.safetensors")
    return folder, models, calibration


def test_yaml_config_merge_round_trip_equals_python_api(trained, capsys):
    folder, models, calibration = trained
    config = folder / "merge.yaml"
    config.write_text(
        "models:\n"
        f"  - {{factory: 'fxmerge.zoo:resnet', kwargs: {KWARGS}, weights: '{folder / 'a.safetensors'}'}}\n"
        f"  - {{factory: 'fxmerge.zoo:resnet', kwargs: {KWARGS}, weights: '{folder / 'b.safetensors'}'}}\n"
        f"calibration: {{tensor: '{folder / 'calib.safetensors'}', batch_size: 64}}\n"
        "merge: {method: zip, alpha: 0.5, width: max}\n"
        f"out: '{folder / 'merged'}'\n"
    )
    assert main(["merge", str(config), "--quiet"]) == 0
    assert "merged 2 models" in capsys.readouterr().out
    loaded = fxmerge.load(folder / "merged")
    expected = fxmerge.merge(models, list(calibration.split(64)), method="zip", quiet=True).module
    probe = calibration[:32]
    with torch.no_grad():
        assert torch.allclose(loaded(probe), expected(probe), atol=1e-6)
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_flags_merge_and_inspect(trained, capsys):
    folder, _, _ = trained
    out = folder / "flags"
    argv = ["merge", "--quiet", "--calib", str(folder / "calib.safetensors"), "--method", "permute", "--out", str(out),
            "--threads", "2"]
    for name in ("a", "b"):
        argv += ["--model", "fxmerge.zoo:resnet", "--kwargs", str(KWARGS), "--weights", str(folder / f"{name}.safetensors")]
    assert main(argv) == 0
    assert "s (2 torch threads)\n" in capsys.readouterr().out  # the count that reproduces the merge
    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "stem.0:out" in report and "layer diff" in report and "method=permute" in report
    assert "s (2 torch threads)" in report


def test_inspect_a_factory_prints_the_groups(capsys):
    assert main(["inspect", "fxmerge.zoo:resnet", "--kwargs", "{in_channels: 1, image_size: 8}", "--input-shape", "2,1,8,8"]) == 0
    out = capsys.readouterr().out
    assert "permutable" in out and "stage2.0.conv1:out" in out


def test_inspect_a_transformers_factory_exports_it(capsys):
    """A HuggingFace BERT (tests/conftest.py's tiny_bert) on token ids: fx cannot trace it, so
    "auto" exports it, and every hidden group is free."""
    assert main(["inspect", "conftest:tiny_bert", "--input-shape", "2,8", "--token-ids", "100"]) == 0
    out = capsys.readouterr().out
    assert "captured by export" in out and "hidden-channel coverage 100.0%" in out
    assert "bert.encoder.layer.0.intermediate.dense:out" in out


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("models: []\nunknown: 1\n")
    assert main(["merge", str(config)]) == 1
    assert "unknown keys ['unknown']" in capsys.readouterr().err
