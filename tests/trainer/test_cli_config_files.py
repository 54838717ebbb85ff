"""lisa-finetune --config: a YAML or JSON file gives every option (every field of every option class, each value
type) as its flag does; its errors name the file and key; flags override it; axolotl's LISA keys."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from cli_runs import FAST, error_of

from lisa_trainer.cli import OPTION_CLASSES, CliError, DataOptions, ModelOptions, RunOptions, main, parse_options
from lisa_trainer import LisaConfig
from lisa_trainer.options import _field_type, flag_of, option_fields
from lisa_trainer.trainer import LisaTrainingArguments

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


CONFIG_CASES = [pytest.param(cls, field, id=field.name) for cls in OPTION_CLASSES for field in option_fields(cls)
                if field.name != "config"]


def _sample(cls, field, default):
    """(a config file's value, the flag's text) for a valid value of ``field`` other than ``default``, chosen by its
    choices or type: a new option gets its case without a change here unless its type needs a special value."""
    special = {"layer_weights": ([1, 2, 3], "1,2,3"), "report_to": ("tensorboard", "tensorboard")}
    if field.name in special:
        return special[field.name]
    choices = field.metadata.get("choices")
    if choices:
        value = next(c for c in choices if c != default)
        return value, value
    base, _ = _field_type(cls, field)
    samples = {bool: [True, False], int: [3, 4], float: [0.25, 0.5], str: ["sample", "other"]}[base]
    value = next(v for v in samples if v != default)
    return value, str(value).lower() if base is bool else str(value)


def _part(opts, cls):
    return {ModelOptions: opts.model, DataOptions: opts.data, RunOptions: opts.run, LisaConfig: opts.lisa,
            LisaTrainingArguments: opts.training}[cls]


def _outcome(argv):
    """The options ``argv`` gives, or the one-line error refusing them."""
    try:
        opts = parse_options(argv)
    except CliError as e:
        return str(e)
    return dataclasses.replace(opts, run=dataclasses.replace(opts.run, config=None), config_keys={})


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("cls, field", CONFIG_CASES)
def test_a_config_file_gives_every_option_as_its_flag_does(tmp_path, cls, field, suffix):
    # a model needs an output folder (flags override the file: the folder's own options are tested without it)
    base = [] if field.name in ("output_dir", "output_model_path") else ["--output_dir", str(tmp_path / "out")]
    default = getattr(_part(parse_options(base), cls), field.name)
    value, text = _sample(cls, field, default)
    flag, key = flag_of(field), flag_of(field).lstrip("-")
    from_flag = _outcome([*base, flag, text])
    path = tmp_path / f"run{suffix}"
    # the file's typed value, and the flag's text as a string (YAML reads 5e-5 as text, for one)
    for doc in ({key: value}, {key: text}):
        path.write_text(yaml.safe_dump(doc) if suffix == ".yaml" else json.dumps(doc))
        from_file = _outcome([*base, "--config", str(path)])
        if isinstance(from_flag, str):  # refused (the option needs another): in the same words, naming file and key
            assert from_file == from_flag.replace(flag, f"--config {path}: {key}", 1)
        else:
            assert from_file == from_flag
            assert getattr(_part(from_file, cls), field.name) != default  # the value given is the one used


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("key, value, problem", [
    ("model_name_or_path", 5, "model_name_or_path: expected a string (quote it), got 5"),
    ("learning_rate", [1, 2], "learning_rate: expected a number, got [1, 2]"),
    ("learning_rate", None, "learning_rate: needs a value, got null"),
    ("learning_rate", -1, "learning_rate must be a finite number > 0, got -1"),
    ("block_size", 64.9, "block_size: expected an integer, got 64.9"),
    ("block_size", 1, "block_size must be at least 2"),
    ("save_steps", True, "save_steps: expected an integer, got True"),
    ("lisa_state_policy", "forget", "lisa_state_policy: invalid choice: 'forget' (choose from park, reset, keep)"),
    ("lisa_layer_weights", {"a": 1}, "lisa_layer_weights: expected text, got {'a': 1}"),
    ("lisa_layer_weights", [0, 0, 1], "lisa_layer_weights has 1 non-zero entries, fewer than "
                                      "--lisa_activated_layers=2"),
    ("report_to", "mlflowx", "report_to names unknown tracker(s) mlflowx"),
    ("demo", "maybe", "demo: expected a boolean (true/false/1/0), got 'maybe'"),
    ("config", "other.yaml", "config: a config file cannot name another one"),
    ("learning_rat", 1, "unknown option 'learning_rat'"),
])
def test_config_file_errors_are_one_line_naming_the_file_and_key(tmp_path, capsys, suffix, key, value, problem):
    path = tmp_path / f"run{suffix}"
    path.write_text(yaml.safe_dump({key: value}) if suffix == ".yaml" else json.dumps({key: value}))
    err = error_of(["--config", str(path), "--output_dir", str(tmp_path / "out")], capsys)
    assert f"error: --config {path}: {problem}" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_binary_config_file_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(bytes(range(256)))
    err = error_of(["--config", str(path)], capsys)
    assert f"error: --config {path}: not a text file" in err and len(err.strip().splitlines()) == 1


def test_a_flag_without_effect_is_accepted_with_a_warning_in_a_file_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataloader_num_workers: 4\nmax_steps: 3\n")
    with pytest.warns(UserWarning, match="dataloader_num_workers: no effect"):
        from_file = parse_options(["--config", str(path)])
    with pytest.warns(UserWarning, match="--dataloader_num_workers: no effect"):
        from_flags = parse_options(["--dataloader_num_workers", "4", "--max_steps", "3"])
    assert from_file.training == from_flags.training


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 5e-5\nmax_steps: 7\nmodel_name_or_path: m\noutput_dir: out\n")
    opts = parse_options(["--config", str(path), "--learning_rate", "1e-5"])
    assert (opts.training.learning_rate, opts.training.max_steps, opts.model.model_name_or_path) == (1e-5, 7, "m")
    assert opts.out_dir == Path("out")


def test_axolotl_lisa_keys_are_our_options(tmp_path):
    expected = parse_options(["--lisa_activated_layers", "3", "--lisa_interval_steps", "7",
                              "--lisa_layers_attribute", "model.layers"]).lisa
    assert parse_options(["--lisa_n_layers", "3", "--lisa_step_interval", "7",
                          "--lisa_layers_attribute", "model.layers"]).lisa == expected
    path = tmp_path / "axolotl.yaml"
    path.write_text("lisa_n_layers: 3\nlisa_step_interval: 7\nlisa_layers_attribute: model.layers\n")
    assert parse_options(["--config", str(path)]).lisa == expected


def test_axolotl_layers_attribute_finds_the_layers(tmp_path, capsys):
    """axolotl's default lisa_layers_attribute, model.layers, is a path from the CausalLM, as ours."""
    path = tmp_path / "axolotl.yaml"
    path.write_text("lisa_n_layers: 1\nlisa_step_interval: 2\nlisa_layers_attribute: model.layers\n")
    assert main(["--demo", "--config", str(path), "--output_dir", str(tmp_path / "out"), *FAST]) == 0
    assert "1 of 8 layers every 2 steps" in capsys.readouterr().out
