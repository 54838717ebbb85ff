import argparse
import json
from dataclasses import dataclass

import pytest
import yaml

from lisa_trainer.options import (ConfigFileError, OptionError, add_options, build, command_line_message, converter, option,
                                  option_fields, read_config_file)


def _weights(text):  # "1,2" or a JSON list "[1, 2]", as --lisa_layer_weights
    return tuple(float(w) for w in (json.loads(text) if text.startswith("[") else text.split(",")))


@dataclass
class Toy:
    count: int = option(2, help="how many", flag="--toy_count", aliases=("--toy_n",))
    rate: float | None = option(None, help="a rate")
    name: str = option("a", help="a name", choices=("a", "b"))
    switch: bool = option(False, help="a switch")
    weights: tuple | None = option(None, help="comma list", parse=_weights)
    internal: int = 7  # no help: not an option

    def __post_init__(self):
        if self.count < 1:
            raise OptionError(Toy, "count", f"must be >= 1, got {self.count}")
        if self.weights is not None and len(self.weights) < self.count:
            raise OptionError(Toy, "weights", f"has {len(self.weights)} entries, fewer than {{count}}={self.count}",
                              mentions=("count",))


def parse(argv):
    parser = argparse.ArgumentParser()
    add_options(parser, Toy, "toy")
    return vars(parser.parse_args(argv))


def test_flags_types_and_absent_flags():
    assert parse([]) == {}  # nothing given: the dataclass defaults apply
    values = parse(["--toy_count", "3", "--rate", "0.5", "--name", "b", "--switch", "--weights", "1,2,4"])
    assert values == {"count": 3, "rate": 0.5, "name": "b", "switch": True, "weights": (1.0, 2.0, 4.0)}
    assert build(Toy, values) == Toy(3, 0.5, "b", True, (1.0, 2.0, 4.0))
    assert parse(["--switch", "0"]) == {"switch": False}


@pytest.mark.parametrize("argv", [["--toy_count", "x"], ["--name", "c"], ["--switch", "maybe"], ["--internal", "1"]])
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit):
        parse(argv)


def test_validation_names_the_field_in_python_and_the_flag_on_the_command_line():
    with pytest.raises(OptionError) as caught:
        build(Toy, parse(["--toy_count", "0"]))
    assert str(caught.value) == "Toy.count must be >= 1, got 0"
    assert command_line_message(caught.value, [Toy]) == "--toy_count must be >= 1, got 0"
    with pytest.raises(OptionError) as caught:
        build(Toy, parse(["--toy_count", "3", "--weights", "1,2"]))
    assert str(caught.value) == "Toy.weights has 2 entries, fewer than Toy.count=3"
    assert command_line_message(caught.value, [Toy]) == "--weights has 2 entries, fewer than --toy_count=3"


def test_a_parse_error_is_shown_as_it_is(capsys):
    with pytest.raises(SystemExit):
        parse(["--weights", "1,x"])
    assert "argument --weights: could not convert string to float: 'x'" in capsys.readouterr().err


@pytest.mark.parametrize("suffix, text", [
    (".json", json.dumps({"toy_count": 4, "switch": True, "weights": "1,3", "name": "b", "rate": 2})),
    (".yaml", "toy_count: 4\nswitch: true\nweights: 1,3\nname: b\nrate: 2\n"),
    (".yml", "count: '4'\nswitch: 1\nweights: [1, 3]\nname: b\nrate: 2.0\n"),  # field names, text, a list
])
def test_config_file(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    config = read_config_file(path, [Toy])
    assert config.values == {"count": 4, "switch": True, "weights": (1.0, 3.0), "name": "b", "rate": 2.0}
    assert config.values == parse(["--toy_count", "4", "--switch", "--weights", "1,3", "--name", "b", "--rate", "2"])
    assert config.keys["count"] == ("count" if suffix == ".yml" else "toy_count")


def test_an_alias_is_the_same_option_in_flags_and_files(tmp_path):
    assert parse(["--toy_n", "5"]) == {"count": 5}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"toy_n": 5}))
    assert read_config_file(path, [Toy]).values == {"count": 5}
    path.write_text(json.dumps({"toy_n": 5, "toy_count": 6}))
    with pytest.raises(ConfigFileError, match="run.json: toy_n and toy_count are the same option .--toy_count."):
        read_config_file(path, [Toy])


# (field, a file's value, the flag's text for it or None where no flag text is that value, the refusal)
WRONG = [
    ("count", [1, 2], None, "expected an integer, got [1, 2]"),
    ("count", True, None, "expected an integer, got True"),
    ("count", 2.5, "2.5", "expected an integer, got 2.5"),
    ("count", "x", "x", "expected an integer, got 'x'"),
    ("count", None, None, "needs a value, got null"),
    ("rate", [1, 2], None, "expected a number, got [1, 2]"),
    ("rate", False, None, "expected a number, got False"),
    ("rate", {"a": 1}, None, "expected a number, got {'a': 1}"),
    ("name", "c", "c", "invalid choice: 'c' (choose from a, b)"),
    ("name", 5, None, "expected a string (quote it), got 5"),
    ("switch", "maybe", "maybe", "expected a boolean (true/false/1/0), got 'maybe'"),
    ("switch", 2, "2", "expected a boolean (true/false/1/0), got 2"),
    ("switch", 0.5, "0.5", "expected a boolean (true/false/1/0), got 0.5"),
    ("weights", "1,x", "1,x", "could not convert string to float: 'x'"),
    ("weights", True, None, "expected text, got True"),
]


@pytest.mark.parametrize("name, value, text, problem", WRONG)
def test_wrong_values_are_refused_alike_from_a_flag_and_a_file(tmp_path, capsys, name, value, text, problem):
    field = next(f for f in option_fields(Toy) if f.name == name)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({name: value}))
    with pytest.raises(ConfigFileError) as caught:
        read_config_file(path, [Toy])
    assert str(caught.value) == f"{path}: {name}: {problem.replace(repr(text), repr(value))}"
    if text is not None:  # the command line: the same converter, the same words (about the text given)
        flag = field.metadata.get("flag") or f"--{name}"
        with pytest.raises(SystemExit):
            parse([flag, text])
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and f": {problem.replace(repr(value), repr(text))}\n" in err


def test_the_converter_takes_what_the_type_allows():
    fields = {f.name: converter(Toy, f) for f in option_fields(Toy)}
    assert fields["count"](64.0) == 64 and fields["count"]("64.0") == 64 and fields["count"]("1e3") == 1000
    assert fields["rate"](3) == 3.0 and isinstance(fields["rate"](3), float) and fields["rate"]("5e-5") == 5e-5
    assert fields["rate"](None) is None and fields["weights"](None) is None  # they take None
    assert fields["switch"](1) is True and fields["switch"]("off") is False
    assert fields["weights"]([1, 2.5]) == (1.0, 2.5) and fields["weights"](7) == (7.0,)


def test_config_file_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"toy_cnt": 4}))
    with pytest.raises(ConfigFileError, match=r"run.json: unknown option 'toy_cnt'"):
        read_config_file(path, [Toy])
    assert read_config_file(path, [Toy], no_effect={"toy_cnt"}).ignored == ["toy_cnt"]
    path.write_text("{oops")
    with pytest.raises(ConfigFileError, match=r"run.json: not valid JSON"):
        read_config_file(path, [Toy])
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    with pytest.raises(ConfigFileError, match=r"run.json: not a text file"):
        read_config_file(path, [Toy])
    path.write_text("[1, 2]")
    with pytest.raises(ConfigFileError, match=r"run.json: must hold a mapping"):
        read_config_file(path, [Toy])
    path = tmp_path / "run.yaml"
    path.write_text("count: [1\n")
    with pytest.raises(ConfigFileError, match=r"run.yaml: not valid YAML: .*line 2") as caught:
        read_config_file(path, [Toy])
    assert "\n" not in str(caught.value)
