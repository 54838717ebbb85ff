"""Options defined once: a dataclass field carries its flag, type, default, help and (in ``__post_init__``) its
validation; the command line, the config-file reader and the error messages are generated from the fields.

A field becomes a flag when its metadata has a ``help`` (``option(...)`` writes it); its flag is ``--<name>``
unless the metadata names another (``LisaConfig.n_active_layers`` is ``--lisa_activated_layers``, LMFlow's
name). Booleans take ``--flag``, ``--flag true|false|1|0``. Validation raises :class:`OptionError`, which names the
field for Python callers and the flag on the command line, from the same exception.
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


def option(default=dataclasses.MISSING, *, help: str, flag: str | None = None, choices=None, parse=None,
           default_factory=dataclasses.MISSING):
    """A dataclass field that is also a command-line option. ``parse`` turns the flag's text into the value (for
    types other than bool/int/float/str); ``choices`` lists the accepted values."""
    metadata = {"help": help, "flag": flag, "choices": choices, "parse": parse}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or f"--{field.name}"


def option_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def parse_bool(value) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/1/0), got {value!r}")


def _base_type(cls, field: dataclasses.Field):
    """The field's type without ``| None``."""
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    return hint


def _converter(cls, field: dataclasses.Field):
    if field.metadata.get("parse"):
        return _reporting(field.metadata["parse"])
    base = _base_type(cls, field)
    if base is bool:
        return parse_bool
    if base in (int, float, str):
        return base
    raise TypeError(f"{cls.__name__}.{field.name}: option of type {base} needs parse=")


def _reporting(parse):
    """``parse`` whose ValueError argparse prints as it is (it shows only "invalid value" for a plain ValueError)."""

    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def add_options(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One argument group with a flag per option field of ``cls``. Defaults are not set in the parser (absent flags
    are absent from the result), so the dataclass's own default applies and a config file can fill the gaps."""
    group = parser.add_argument_group(title)
    for field in option_fields(cls):
        convert = _converter(cls, field)
        kwargs = dict(dest=field.name, type=convert, default=argparse.SUPPRESS, choices=field.metadata.get("choices"))
        if convert is parse_bool:
            kwargs.update(nargs="?", const=True)
        default = "" if field.default in (dataclasses.MISSING, None) else f" (default: {field.default})"
        group.add_argument(flag_of(field), help=field.metadata["help"] + default, **kwargs)


def read_config_file(path: str | Path, classes) -> dict:
    """Option values from a JSON or YAML file of ``{flag name or field name: value}``; errors name file and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as e:  # JSONDecodeError / YAMLError: either names the line
        raise ConfigFileError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigFileError(f"{path}: must hold a mapping of option names to values")
    by_name = {}
    for cls in classes:
        for field in option_fields(cls):
            by_name[field.name] = by_name[flag_of(field).lstrip("-")] = (cls, field)
    values = {}
    for key, value in doc.items():
        if key not in by_name:
            raise ConfigFileError(f"{path}: unknown option {key!r}")
        cls, field = by_name[key]
        if value is not None and not isinstance(value, (bool, int, float, list)) or field.metadata.get("parse"):
            try:
                value = field.metadata.get("parse", _converter(cls, field))(
                    value if isinstance(value, str) else json.dumps(value))
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise ConfigFileError(f"{path}: {key}: {e}") from None
        values[field.name] = value
    return values


def build(cls, values: dict, **extra):
    """``cls`` from the values of its option fields found in ``values`` (others keep their defaults)."""
    names = {f.name for f in option_fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names}, **extra)


def command_line_message(error: OptionError, classes) -> str:
    """``error`` with each field it names shown as its flag (the field's name when it has none)."""
    owner = next((cls for cls in classes if cls.__name__ == error.owner), None)
    flags = {f.name: flag_of(f) for f in option_fields(owner)} if owner is not None else {}
    return error.render(lambda field: flags.get(field, f"{error.owner}.{field}"))
