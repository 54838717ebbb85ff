import argparse
import json
from dataclasses import dataclass

import pytest

from lisa_trainer.options import ConfigFileError, OptionError, add_options, build, command_line_message, option, read_config_file


def _weights(text):
    return tuple(float(w) for w in text.split(","))


@dataclass
class Toy:
    count: int = option(2, help="how many", flag="--toy_count")
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


@pytest.mark.parametrize("suffix, text", [(".json", json.dumps({"toy_count": 4, "switch": True, "weights": "1,3"})),
                                          (".yaml", "toy_count: 4\nswitch: true\nweights: 1,3\n")])
def test_config_file(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    assert read_config_file(path, [Toy]) == {"count": 4, "switch": True, "weights": (1.0, 3.0)}


def test_config_file_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"toy_cnt": 4}))
    with pytest.raises(ConfigFileError, match=r"run.json: unknown option 'toy_cnt'"):
        read_config_file(path, [Toy])
    path.write_text("{oops")
    with pytest.raises(ConfigFileError, match=r"run.json: not valid JSON"):
        read_config_file(path, [Toy])
