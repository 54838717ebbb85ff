"""`lisa-finetune`'s options: the fields of `ModelOptions`, `DataOptions`, `RunOptions` (here), `LisaConfig` and
`LisaTrainingArguments`, each carrying its flag, type, default and help, and validated by its dataclass, so an error
names the flag the user typed. `--config run.yaml|run.json` reads the same options from a file, each value converted
and checked as its flag's text (flags given on the command line override it). The other flags of LMFlow's finetuner
and of Hugging Face's `TrainingArguments` are accepted with one warning that they have no effect here, on the
command line and in a config file. `parse_options` gives one run's `Options`.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

from .arguments import LisaConfig, LisaTrainingArguments
from .options import (ConfigFileError, OptionError, add_options, build, command_line_message, option,
                      read_config_file)
from .templates import ALIASES, FORMATS, TOKENIZER_TEMPLATE

__all__ = ["CliError", "DataOptions", "ModelOptions", "OPTION_CLASSES", "Options", "RunOptions", "parse_options"]

DEMO_OUTPUT = "./lisa-demo-output"
DTYPES = ("float32", "bfloat16", "float16", "auto")


class CliError(Exception):
    """A problem with the command line or its inputs; printed without a traceback, exit status 2."""


class RunFailed(Exception):
    """A run that started and could not finish (diverged, disk full); printed without a traceback, exit status 1."""


@dataclass
class ModelOptions:
    model_name_or_path: str | None = option(None, help="local Hugging Face model folder (or a cached hub id); omit "
                                                        "for the demo")
    demo: bool = option(False, help="run the embedded demo (a small local Llama and the sample data)")
    torch_dtype: str = option("float32", choices=DTYPES, help="dtype the model is loaded in")
    trust_remote_code: bool = option(False, help="allow the model folder's own code (transformers' flag)")
    use_flash_attention: bool = option(False, help="1: flash_attention_2 when it is installed and a GPU is used, "
                                                   "else sdpa (said once); 0: sdpa")

    def __post_init__(self):
        if self.demo and self.model_name_or_path:
            raise OptionError(ModelOptions, "demo", "and {model_name_or_path} exclude each other: the demo builds "
                              "its own model", ("model_name_or_path",))


@dataclass
class DataOptions:
    dataset_path: str | None = option(None, help="LMFlow JSON file or folder of .json files (text_only, text2text, "
                                                 "conversation); omit for the demo's sample data")
    block_size: int = option(512, help="tokens per training sequence (demo 128)")
    disable_group_texts: bool = option(True, help="1 (LMFlow's default): each instance is one sequence, cut at "
                                                  "--block_size; 0: text_only data is packed into full blocks "
                                                  "(the demo's default)")
    validation_split_percentage: float = option(0.0, help="held-out share of the data, percent (demo 10)")
    conversation_template: str | None = option(
        None, help="how conversations are rendered: the tokenizer's own chat template when it has one (default), "
                   f"or one of {', '.join([TOKENIZER_TEMPLATE, *ALIASES, *FORMATS])} (empty: the text as given)")

    def __post_init__(self):
        if self.block_size < 2:
            raise OptionError(DataOptions, "block_size", f"must be at least 2 (a token and the next one to predict), "
                                                         f"got {self.block_size}")
        if not 0 <= self.validation_split_percentage < 100:
            raise OptionError(DataOptions, "validation_split_percentage",
                              f"must be in [0, 100), got {self.validation_split_percentage}")


@dataclass
class RunOptions:
    output_model_path: str | None = option(None, help=f"where the fine-tuned model and tokenizer go (default: "
                                                      f"--output_dir; demo: {DEMO_OUTPUT})")
    output_dir: str | None = option(None, help="where the model (unless --output_model_path), checkpoints, "
                                               "train_log.jsonl and the plot go")
    resume_from_checkpoint: str | None = option(None, help="a checkpoint-N folder, or 'latest' (the newest of the "
                                                           "run in the output folder)")
    use_lisa: bool = option(True, help="0: every layer trains in every step (full fine-tuning in the same loop, "
                                       "a baseline)")
    do_train: bool = option(True, help="accepted for LMFlow scripts: lisa-finetune always trains")
    disable_tqdm: bool = option(False, help="no progress bar")
    config: str | None = option(None, help="a JSON or YAML file of options (names as the flags, without --); "
                                           "flags on the command line override it")


OPTION_GROUPS = ((ModelOptions, "model"), (DataOptions, "data"), (LisaConfig, "LISA"),
                 (LisaTrainingArguments, "training"), (RunOptions, "output and run"))
OPTION_CLASSES = tuple(cls for cls, _ in OPTION_GROUPS)

# Defaults that differ between the demo and a real model (field names; the real model's are LMFlow's example's).
DEMO_DEFAULTS = dict(
    learning_rate=1e-3,  # 3e-3 spikes the loss at switches: a fresh layer's first AdamW step is ~lr per weight
    interval_steps=10,
    max_steps=200,
    per_device_train_batch_size=8,
    block_size=128,
    disable_group_texts=False,  # the sample text is packed into full blocks
    warmup_steps=10,
    eval_steps=20,
    validation_split_percentage=10.0,
)
MODEL_DEFAULTS = dict(learning_rate=5e-5, per_device_train_batch_size=1)

# Flags of LMFlow's finetuner (beyond Hugging Face's TrainingArguments) that mean nothing here.
LMFLOW_FLAGS = (
    "lora_model_path model_type config_overrides arch_type config_name tokenizer_name cache_dir use_fast_tokenizer "
    "model_revision token use_dora use_lora use_qlora bits quant_bit quant_type double_quant lora_r lora_alpha "
    "lora_target_modules lora_dropout save_aggregated_lora use_ram_optimized_load truncate_to_model_max_length "
    "do_rope_scaling rope_pi_ratio rope_ntk_ratio model_max_length truncation_side padding_side eos_padding "
    "ignore_bias_buffers dataset_name is_custom_dataset customized_cache_dir dataset_config_name train_file "
    "validation_file max_train_samples max_eval_samples streaming overwrite_cache preprocessing_num_workers "
    "group_texts_batch_size keep_linebreaks test_file train_on_prompt dataset_cache_dir calculate_dataset_stats "
    "eval_dataset_path remove_unused_columns finetune_part save_language_projection use_customized_optim "
    "customized_optim customized_optim_args optim_momentum optim_weight_decay deepspeed"
).split()


@dataclass
class Options:
    """One run's options, each part validated by its own dataclass."""

    model: ModelOptions
    data: DataOptions
    lisa: LisaConfig
    training: LisaTrainingArguments
    run: RunOptions
    demo: bool
    out_model: Path
    out_dir: Path
    config_keys: dict[str, str]  # field -> its key in the --config file, for the options read from there


# --------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lisa-finetune",
        description="Fine-tune a causal language model with LISA (layerwise importance sampling). With no "
                    "--model_name_or_path, runs a self-contained demo on a small local model. The flags are "
                    "LMFlow's; its other finetuner flags and Hugging Face's TrainingArguments are accepted with a "
                    "warning that they have no effect here.",
    )
    for cls, title in OPTION_GROUPS:
        add_options(parser, cls, title)
    return parser


def _no_effect_flags() -> set[str]:
    """Flags an LMFlow or Hugging Face script may pass that change nothing here."""
    from transformers import TrainingArguments as HFTrainingArguments

    ours = {f.name for cls in OPTION_CLASSES for f in dataclasses.fields(cls)}
    return ({f.name for f in dataclasses.fields(HFTrainingArguments)} | set(LMFLOW_FLAGS)) - ours


def _set_aside(parser: argparse.ArgumentParser, rest: list[str]) -> list[str]:
    """The flags among ``rest`` (what the parser did not know) that LMFlow or Hugging Face define, with their
    values dropped; anything else is an error, as argparse reports it."""
    known, ignored, unknown = _no_effect_flags(), [], []
    i = 0
    while i < len(rest):
        token = rest[i]
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name in known:
            ignored.append(name)
            if "=" not in token and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                i += 1  # its value
        else:
            unknown.append(token)
        i += 1
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return ignored


def _warn_no_effect(names: list[str]) -> None:
    warnings.warn(f"{', '.join(names)}: no effect in lisa-finetune (accepted so that LMFlow and Hugging Face scripts "
                  "run unchanged)", stacklevel=3)


def _read_config(path: str, given: dict) -> tuple[dict, dict[str, str]]:
    """The options of the config file ``path`` that the command line does not give, and the file's key of each."""
    try:
        config = read_config_file(path, OPTION_CLASSES, no_effect=_no_effect_flags())
    except ConfigFileError as e:
        raise CliError(f"--config {e}") from None
    if "config" in config.values:
        raise CliError(f"--config {path}: {config.keys['config']}: a config file cannot name another one")
    if config.ignored:
        _warn_no_effect([f"{path}: {key}" for key in config.ignored])
    taken = {name: value for name, value in config.values.items() if name not in given}
    return taken, {name: config.keys[name] for name in taken}


def option_message(error: OptionError, config: str | None, config_keys: dict[str, str]) -> str:
    """``error`` as the user gave the options: options read from the config file by their keys there (the file named
    first when the error is about one of them), the others by their flags."""
    message = command_line_message(error, OPTION_CLASSES, config_keys)
    return f"--config {config}: {message}" if error.name in config_keys else message


def parse_options(argv: list[str] | None = None) -> Options:
    parser = build_parser()
    given, rest = parser.parse_known_args(argv)
    ignored = _set_aside(parser, rest)
    if ignored:
        _warn_no_effect(["--" + name for name in ignored])
    values, config_keys = vars(given), {}
    if values.get("config"):
        from_file, config_keys = _read_config(values["config"], values)
        values = {**from_file, **values}
    demo = bool(values.get("demo")) or values.get("model_name_or_path") is None
    values = {**(DEMO_DEFAULTS if demo else MODEL_DEFAULTS), **values}
    out_model, out_dir = _output_folders(values, demo)
    # The demo's own folder holds the last demo run: the demo starts afresh there.
    values.setdefault("overwrite_output_dir", demo and "output_dir" not in values and "output_model_path" not in values)
    try:
        model, data, run = build(ModelOptions, values), build(DataOptions, values), build(RunOptions, values)
        training = build(LisaTrainingArguments, values, output_dir=str(out_dir), save_model=False,
                         progress=not run.disable_tqdm)
        lisa = build(LisaConfig, values, seed=training.seed)
    except OptionError as e:
        raise CliError(option_message(e, values.get("config"), config_keys)) from None
    return Options(model, data, lisa, training, run, demo, out_model, out_dir, config_keys)


def _output_folders(values: dict, demo: bool) -> tuple[Path, Path]:
    """(model folder, run folder): LMFlow writes both to --output_dir; --output_model_path moves the model."""
    model_path, run_dir = values.get("output_model_path"), values.get("output_dir")
    if model_path is None and run_dir is None:
        if not demo:
            raise CliError("--output_dir is required with --model_name_or_path (where the model, log and "
                           "checkpoints go)")
        model_path = DEMO_OUTPUT
    out_model = Path(model_path or run_dir)
    return out_model, Path(run_dir) if run_dir else out_model
