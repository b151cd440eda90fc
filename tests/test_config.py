"""``fxmerge.config.MergeConfig`` is the one list of merge options: the CLI flags (with help and
defaults), the YAML ``merge:`` keys, ``as_dict`` and ``merge()``'s keywords all follow its fields.
The removed ``seed`` option gets a clear error wherever it can still be given."""

from __future__ import annotations

import inspect
import re
from dataclasses import fields

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge import zoo
from fxmerge.cli import _default_text, _merge_settings, build_parser, main
from fxmerge.config import MergeConfig, option_names
from fxmerge.errors import ConfigError

# A value other than the default for every option, as Python values and as YAML text.
NON_DEFAULT = {
    "method": ("mudsc", "mudsc"),
    "depth": ("sma", "sma"),
    "inserted": ("matched", "matched"),
    "taps": ("last", "last"),
    "unmerge": ("regression", "regression"),
    "width": (0.5, "0.5"),
    "alpha": (0.25, "0.25"),
    "beta": (2.0, "2.0"),
    "balance": (0.75, "0.75"),
    "output": ("concat", "concat"),
    "output_balance": ("norm", "norm"),
    "stop_at": (2, "2"),
    "calibration_batches": (3, "3"),
    "strict": (True, "true"),
    "quiet": (True, "true"),
    "leaf_modules": ((nn.ReLU, "stage1.0"), "['torch.nn:ReLU', stage1.0]"),
    "capture": ("fx", "fx"),
    "model_weights": ((0.25, 0.75), "[0.25, 0.75]"),
    "max_memory": (4 * 10**9, "4GB"),
    "threads": (2, "2"),
    "repair": ("repair", "repair"),
}


def test_the_table_above_covers_every_option() -> None:
    assert set(NON_DEFAULT) == set(option_names())
    for spec in fields(MergeConfig):
        assert NON_DEFAULT[spec.name][0] != spec.default, spec.name


def _merge_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``fxmerge merge --help`` per option: flag -> its entry (the flag line and the help lines under
    it, joined; a wide terminal so that help text is not wrapped)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--help"])
    assert exit_info.value.code == 0
    entries: dict[str, str] = {}
    flag = None
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"  (-[a-z-]+|--[a-z-]+)", line)
        if match:
            flag = line.split(",")[0].split()[0] if line.strip().startswith("--") else match.group(1)
            entries[flag] = line.strip()
        elif flag is not None and line.startswith("    "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries




def test_every_option_is_a_flag_with_help_and_its_default(monkeypatch, capsys) -> None:
    lines = _merge_help(monkeypatch, capsys)
    for spec in fields(MergeConfig):
        flag = "--" + spec.name.replace("_", "-")
        assert flag in lines, f"{spec.name} has no flag {flag}"
        assert spec.metadata["help"] in lines[flag], flag
        assert f"(default: {_default_text(spec.default)})" in lines[flag], lines[flag]
    # the command's other flags have help too
    for flag in ("--model", "--kwargs", "--weights", "--calib", "--batch-size", "--out", "--threads"):
        assert flag in lines and len(lines[flag].split()) > 3, f"{flag} has no help: {lines.get(flag)!r}"
    assert "(default: 64)" in lines["--batch-size"]
    assert "--seed" not in lines


def _settings(tmp_path, merge_yaml: str, *flags: str) -> MergeConfig:
    config = tmp_path / "merge.yaml"
    config.write_text(
        "models: [{factory: 'fxmerge.zoo:resnet'}, {factory: 'fxmerge.zoo:resnet'}]\n"
        "calibration: {tensor: calib.safetensors}\n"
        f"merge: {merge_yaml}\n"
        "out: merged/\n"
    )
    args = build_parser().parse_args(["merge", str(config), *flags])
    return _merge_settings(args)["config"]


def test_yaml_accepts_exactly_the_option_names(tmp_path) -> None:
    everything = "{" + ", ".join(f"{name}: {text}" for name, (_, text) in NON_DEFAULT.items()) + "}"
    config = _settings(tmp_path, everything)
    assert config == MergeConfig(**{name: value for name, (value, _) in NON_DEFAULT.items()})
    with pytest.raises(ConfigError) as caught:
        _settings(tmp_path, "{method: zip, colour: blue}")
    message = str(caught.value)
    assert "['colour']" in message and f"allowed: {sorted(option_names())}" in message


def test_flags_parse_like_yaml_and_override_it(tmp_path) -> None:
    flags = []
    for name, (_, text) in NON_DEFAULT.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(NON_DEFAULT[name][0], bool):
            flags.append(flag)
        elif name == "leaf_modules":
            flags += [flag, "torch.nn:ReLU", flag, "stage1.0"]
        elif name == "model_weights":
            flags += [flag, "1", flag, "3"]  # normalised to (0.25, 0.75)
        else:
            flags += [flag, text]
    config = _settings(tmp_path, "{method: permute, strict: true}", *flags)
    assert config == MergeConfig(**{name: value for name, (value, _) in NON_DEFAULT.items()})
    assert _settings(tmp_path, "{strict: true}", "--no-strict").strict is False
    assert _settings(tmp_path, "{width: 12}").width == 12 and _settings(tmp_path, "{}", "--width", "min").width == "min"
    assert _settings(tmp_path, "{}", "--stop-at", "stage2.0.relu_1").stop_at == "stage2.0.relu_1"


@pytest.mark.parametrize(
    ("merge_yaml", "fragment"),
    [
        ("{alpha: fast}", "alpha='fast' is not a valid value"),
        ("{calibration_batches: '2.5'}", "calibration_batches='2.5' is not a valid value"),
        ("{leaf_modules: ['torch.nn:relu']}", "has no attribute 'relu'"),
        ("{leaf_modules: ['torch.nn:functional']}", "'torch.nn:functional' is not a class"),
        ("{method: fastest}", "method='fastest' is not one of"),
        ("{max_memory: lots}", "max_memory='lots' is not a valid value"),
        ("[zip]", "'merge:' must be a mapping"),
    ],
)
def test_bad_yaml_values_name_the_option(tmp_path, merge_yaml: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        _settings(tmp_path, merge_yaml)


def test_as_dict_has_every_option_and_round_trips() -> None:
    config = MergeConfig(**{name: value for name, (value, _) in NON_DEFAULT.items()})
    data = config.as_dict()
    assert list(data) == list(option_names())
    assert data["leaf_modules"] == ["torch.nn.modules.activation:ReLU", "stage1.0"]
    assert MergeConfig.from_dict(data) == config
    assert MergeConfig().as_dict()["width"] == "max"
    assert MergeConfig(width={"stem.0:out": 4}).as_dict()["width"] == {"stem.0:out": 4}


def test_merge_keywords_are_the_options() -> None:
    """merge()'s keyword arguments (besides process_group and example_input, inputs of one call)
    are MergeConfig's fields, with the same defaults, and its docstring explains each."""
    parameters = inspect.signature(fxmerge.merge).parameters
    keywords = [
        n for n, p in parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in ("process_group", "example_input")
    ]
    assert keywords == list(option_names())
    for spec in fields(MergeConfig):
        assert parameters[spec.name].default == spec.default, spec.name
        assert re.search(rf"\b{spec.name}\b[^\n]*:", fxmerge.merge.__doc__), f"{spec.name} is not documented"


# ------------------------------------------------------------------------------ the removed seed


def test_seed_in_an_old_config_is_a_clear_error(tmp_path, capsys) -> None:
    with pytest.raises(ConfigError) as caught:
        _settings(tmp_path, "{method: zip, seed: 0}")
    message = str(caught.value)
    assert "'seed' was removed" in message and "nothing in a merge is random" in message and "delete the key" in message
    with pytest.raises(ConfigError, match="'seed' was removed"):
        MergeConfig.from_dict({"seed": 3})
    # the command line says it too (exit 1, message on stderr), and --seed is no flag any more
    config = tmp_path / "old.yaml"
    config.write_text("models: []\nmerge: {seed: 0}\n")
    assert main(["merge", str(config)]) == 1
    assert "'seed' was removed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(config), "--seed", "0"])
    assert exit_info.value.code == 2


def test_seed_is_not_a_merge_keyword() -> None:
    models = [zoo.resnet((1, 1, 1), width=4, in_channels=1, image_size=8).eval() for _ in range(2)]
    with pytest.raises(TypeError, match="seed"):
        fxmerge.merge(models, [torch.randn(4, 1, 8, 8)], seed=0, quiet=True)
    with pytest.raises(TypeError, match="seed"):
        MergeConfig(seed=0)
