"""Options defined once: a dataclass field carries its flag, type, default, help and (in ``__post_init__``) its
validation; the command line, the config-file reader and the error messages are generated from the fields.

A field becomes a flag when its metadata has a ``help`` (``option(...)`` writes it); its flag is ``--<name>``
unless the metadata names another (``LisaConfig.n_active_layers`` is ``--lisa_activated_layers``, LMFlow's
name), and ``aliases`` adds other tools' names. Booleans take ``--flag``, ``--flag true|false|1|0``. A config file's
value goes through the same converter as the flag's text (:func:`converter`), so a file accepts exactly what the
command line accepts. Validation raises :class:`OptionError`, which names the field for Python callers and the flag
on the command line, from the same exception.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path


class OptionError(ValueError):
    """A value a dataclass of options refuses: ``owner.name problem``; the command line shows ``--flag problem``.

    ``problem`` may name other fields as ``{field}`` (listed in ``mentions``): they read ``Owner.field`` in Python
    and as their flags on the command line, from the same exception."""

    def __init__(self, owner: type | str, name: str, problem: str, mentions: tuple[str, ...] = ()):
        self.owner = owner if isinstance(owner, str) else owner.__name__
        self.name, self.problem, self.mentions = name, problem, mentions
        super().__init__(self.render(lambda field: f"{self.owner}.{field}"))

    def render(self, name_of) -> str:
        """The message with every field named by ``name_of(field)``."""
        text = self.problem
        for field in self.mentions:
            text = text.replace("{" + field + "}", name_of(field))
        return f"{name_of(self.name)} {text}"


class ConfigFileError(ValueError):
    """A config file that cannot be read, or holds something that is not an option; the message names the file."""


def option(default=dataclasses.MISSING, *, help: str, flag: str | None = None, aliases: tuple[str, ...] = (),
           choices=None, parse=None, default_factory=dataclasses.MISSING):
    """A dataclass field that is also a command-line option. ``aliases`` are other flags for it (another tool's
    names); ``parse`` turns the flag's text into the value (for types other than bool/int/float/str); ``choices``
    lists the accepted values."""
    metadata = {"help": help, "flag": flag, "aliases": aliases, "choices": choices, "parse": parse}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or f"--{field.name}"


def flags_of(field: dataclasses.Field) -> tuple[str, ...]:
    """The option's flag and its aliases."""
    return (flag_of(field), *field.metadata.get("aliases", ()))


def option_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


# ------------------------------------------------------------------------------------------------ conversion
# One converter per option takes either the flag's text or a config file's JSON/YAML value, so both are checked
# alike and refused with the same words (argparse.ArgumentTypeError, which argparse prints as it is).


def _refuse(expected: str, value):
    raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")


def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    _refuse("a boolean (true/false/1/0)", value)


def _number(value, expected: str) -> int | float:
    """``value`` as a Python number: text is read as an int or a float; bools, lists and the like are refused."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    _refuse(expected, value)


def parse_int(value) -> int:
    number = _number(value, "an integer")
    if isinstance(number, float) and not number.is_integer():  # 64.9, inf and nan; 64.0 is 64
        _refuse("an integer", value)
    return int(number)


def parse_float(value) -> float:
    number = _number(value, "a number")
    try:
        return float(number)
    except OverflowError:  # an integer beyond float's range, from a file
        _refuse("a number", value)


def parse_str(value) -> str:
    if not isinstance(value, str):
        _refuse("a string (quote it)", value)
    return value


def _parse_text(parse):
    """``parse`` (which reads the flag's text) for any value: a number or a list from a file is read as its JSON
    text (``[1, 2]`` as the flag ``'[1, 2]'``); its ValueError is the refusal."""

    def convert(value):
        if isinstance(value, bool) or not isinstance(value, (str, int, float, list)):
            _refuse("text", value)
        try:
            return parse(value if isinstance(value, str) else json.dumps(value))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


_PARSERS = {bool: parse_bool, int: parse_int, float: parse_float, str: parse_str}


def _field_type(cls, field: dataclasses.Field) -> tuple[object, bool]:
    """(the field's type without ``| None``, whether it takes None)."""
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def converter(cls, field: dataclasses.Field):
    """The function that turns the option's flag text or config-file value into the field's value, or raises
    ``argparse.ArgumentTypeError`` saying why not: the type (a list is no float, a bool no int, 64.9 no int),
    ``None`` (a file's null) only where the field takes it, and the choices."""
    base, takes_none = _field_type(cls, field)
    parse = field.metadata.get("parse")
    if parse is not None:
        to_value = _parse_text(parse)
    elif base in _PARSERS:
        to_value = _PARSERS[base]
    else:
        raise TypeError(f"{cls.__name__}.{field.name}: option of type {base} needs parse=")
    choices = field.metadata.get("choices")

    def convert(value):
        if value is None:
            if takes_none:
                return None
            raise argparse.ArgumentTypeError("needs a value, got null")
        result = to_value(value)
        if choices is not None and result not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {result!r} (choose from {', '.join(choices)})")
        return result

    convert.takes_flag_alone = parse is None and base is bool  # ``--flag`` means ``--flag true``
    return convert


def add_options(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One argument group with a flag per option field of ``cls``. Defaults are not set in the parser (absent flags
    are absent from the result), so the dataclass's own default applies and a config file can fill the gaps."""
    group = parser.add_argument_group(title)
    for field in option_fields(cls):
        convert = converter(cls, field)
        kwargs = dict(dest=field.name, type=convert, default=argparse.SUPPRESS)
        if field.metadata.get("choices"):
            kwargs["metavar"] = "{" + ",".join(field.metadata["choices"]) + "}"
        if convert.takes_flag_alone:
            kwargs.update(nargs="?", const=True)
        default = "" if field.default in (dataclasses.MISSING, None) else f" (default: {field.default})"
        group.add_argument(*flags_of(field), help=field.metadata["help"] + default, **kwargs)


# ------------------------------------------------------------------------------------------------ config files


@dataclasses.dataclass
class ConfigFile:
    """The options a config file gives, converted and checked as their flags are."""

    path: Path
    values: dict  # field name -> value
    keys: dict  # field name -> the key the file gives it under (for messages)
    ignored: list  # keys of options that have no effect (given in ``no_effect``)


def read_config_file(path: str | Path, classes, no_effect=()) -> ConfigFile:
    """Option values from a JSON or YAML file of ``{key: value}``; a key is an option's flag (or an alias) without
    ``--``, or its field name; keys in ``no_effect`` are set aside. Each value goes through the converter of the
    option's flag (:func:`converter`); errors name file and key."""
    path = Path(path)
    kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"{path}: not a text file (not valid UTF-8)") from None
    try:
        if kind == "YAML":
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as e:  # JSONDecodeError / YAMLError: either names the line
        raise ConfigFileError(f"{path}: not valid {kind}: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict):
        raise ConfigFileError(f"{path}: must hold a mapping of option names to values")
    by_key = {}
    for cls in classes:
        for field in option_fields(cls):
            for key in (field.name, *(flag.lstrip("-") for flag in flags_of(field))):
                by_key[key] = (cls, field)
    config = ConfigFile(path, {}, {}, [])
    for key, value in doc.items():
        if key in no_effect and key not in by_key:
            config.ignored.append(key)
            continue
        if key not in by_key:
            raise ConfigFileError(f"{path}: unknown option {key!r}")
        cls, field = by_key[key]
        if field.name in config.keys:
            raise ConfigFileError(f"{path}: {config.keys[field.name]} and {key} are the same option ({flag_of(field)})")
        try:
            config.values[field.name] = converter(cls, field)(value)
        except argparse.ArgumentTypeError as e:
            raise ConfigFileError(f"{path}: {key}: {e}") from None
        config.keys[field.name] = key
    return config


def build(cls, values: dict, **extra):
    """``cls`` from the values of its option fields found in ``values`` (others keep their defaults)."""
    names = {f.name for f in option_fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names}, **extra)


def command_line_message(error: OptionError, classes, names: dict[str, str] | None = None) -> str:
    """``error`` with each field it names shown as ``names[field]`` if given, else as its flag (the field's name
    when it has none)."""
    owner = next((cls for cls in classes if cls.__name__ == error.owner), None)
    flags = {f.name: flag_of(f) for f in option_fields(owner)} if owner is not None else {}
    flags.update(names or {})
    return error.render(lambda field: flags.get(field, f"{error.owner}.{field}"))
