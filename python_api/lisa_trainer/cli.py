"""`lisa-finetune`: fine-tune a causal LM with LISA from the command line (LMFlow-compatible flags).

With no ``--model_name_or_path`` (or with ``--demo``) it runs the embedded default: a small random-weight Llama, a
byte-level tokenizer and the sample dataset shipped with the package, all built locally; it finishes in about a
minute on a laptop CPU and writes the model, ``train_log.jsonl`` and ``lisa_run.png`` to ``./lisa-demo-output``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

PLOT_FILE = "lisa_run.png"
DEMO_OUTPUT = "./lisa-demo-output"

# Defaults that differ between the demo and a real model; None in the parser means "not given".
DEMO_DEFAULTS = dict(
    learning_rate=1e-3,  # 3e-3 spikes the loss at switches: a fresh layer's first AdamW step is ~lr per weight
    lisa_activated_layers=2,
    lisa_interval_steps=10,
    max_steps=200,
    per_device_train_batch_size=8,
    block_size=128,
    warmup_steps=10,
    eval_steps=20,
    validation_split_percentage=10,
)
MODEL_DEFAULTS = dict(  # LMFlow's LISA example script
    learning_rate=5e-5,
    lisa_activated_layers=2,
    lisa_interval_steps=20,
    max_steps=-1,
    per_device_train_batch_size=1,
    block_size=512,
    warmup_steps=0,
    eval_steps=None,
    validation_split_percentage=0,
)
# LisaConfig field -> the flag that sets it, so errors from the core name what the user typed.
FLAG_OF_FIELD = {
    "n_active_layers": "--lisa_activated_layers",
    "interval_steps": "--lisa_interval_steps",
    "layers_attribute": "--lisa_layers_attribute",
    "layer_weights": "--lisa_layer_weights",
    "sampling": "--lisa_sampling",
    "state_policy": "--lisa_state_policy",
    "prefetch_steps": "--lisa_prefetch_steps",
    "embedding_state_dtype": "--lisa_embedding_state_dtype",
    "seed": "--seed",
}


class CliError(Exception):
    """A problem with the command line or its inputs; printed without a traceback, exit status 2."""


class RunFailed(Exception):
    """A run that started and could not finish (diverged, disk full); printed without a traceback, exit status 1."""


def _bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/1/0), got {value!r}")


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lisa-finetune",
        description="Fine-tune a causal language model with LISA (layerwise importance sampling). "
        "With no --model_name_or_path, runs a self-contained demo on a small local model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    flag = dict(nargs="?", const=True, type=_bool)  # `--bf16` or `--bf16 true|false|1|0`, as in LMFlow/HF
    g = p.add_argument_group("model and data")
    g.add_argument("--model_name_or_path", help="local Hugging Face model folder (or a cached hub id); omit for the demo")
    g.add_argument("--demo", default=False, **flag, help="run the embedded demo (small local Llama + sample data)")
    g.add_argument("--dataset_path", help="LMFlow JSON file or folder of .json files (text_only, text2text, conversation)")
    g.add_argument("--output_model_path", help=f"where the fine-tuned model and tokenizer go (demo: {DEMO_OUTPUT})")
    g.add_argument("--output_dir", help="where checkpoints, train_log.jsonl and the plot go (default: --output_model_path)")
    g.add_argument("--block_size", type=_positive_int, help="tokens per training sequence (demo 128, else 512)")
    g.add_argument("--disable_group_texts", default=None, **flag, help="do not pack text_only data into blocks")
    g.add_argument("--validation_split_percentage", type=float, help="held-out share of the data, percent (demo 10, else 0)")
    g.add_argument("--torch_dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"), help="dtype the model is loaded in")
    g.add_argument("--trust_remote_code", default=False, **flag)

    g = p.add_argument_group("LISA")
    g.add_argument("--lisa_activated_layers", type=_positive_int, help="γ: decoder layers trained per period (default 2)")
    g.add_argument("--lisa_interval_steps", type=_positive_int, help="K: optimizer steps per period (demo 10, else 20)")
    g.add_argument("--lisa_layers_attribute", help="dotted path of the decoder-layer list, e.g. model.layers (default: found by structure)")
    g.add_argument("--lisa_state_policy", default="park", choices=("park", "reset", "keep"), help="what happens to a deactivated layer's optimizer state")
    g.add_argument("--lisa_layer_weights", help="importance weights per layer: 'auto' (estimated during the run from update norms), a comma list, JSON list, a JSON file with a list, or a previous run's train_log.jsonl (its mean update norms)")
    g.add_argument("--lisa_sampling", default="uniform", choices=("uniform", "balanced"), help="uniform: independent draws each period (the paper); balanced: every layer trains equally often over each cycle")
    g.add_argument("--lisa_prefetch_steps", type=int, default=1, help="bring the next period's parked state back this many steps early")
    g.add_argument("--lisa_embedding_state_dtype", choices=("float32", "bfloat16"), help="dtype of the embedding's and head's AdamW moments (default: as the other layers)")

    g = p.add_argument_group("optimization")
    g.add_argument("--learning_rate", type=_positive_float, help="peak learning rate (demo 1e-3, else 5e-5)")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--lr_scheduler_type", default="cosine", choices=("cosine", "linear", "constant"))
    g.add_argument("--warmup_steps", type=int, help="linear warmup steps (demo 10, else 0)")
    g.add_argument("--warmup_ratio", type=float, default=0.0, help="warmup as a share of all steps, when --warmup_steps is 0")
    g.add_argument("--num_train_epochs", type=_positive_float, default=1.0)
    g.add_argument("--max_steps", type=int, help="optimizer steps; > 0 overrides --num_train_epochs (demo 200)")
    g.add_argument("--per_device_train_batch_size", type=_positive_int, help="sequences per micro-batch (demo 8, else 1)")
    g.add_argument("--per_device_eval_batch_size", type=_positive_int)
    g.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 disables")
    g.add_argument("--bf16", default=False, **flag, help="bf16 autocast (CUDA only)")
    g.add_argument("--gradient_checkpointing", default=False, **flag)
    g.add_argument("--chunked_loss", default=True, **flag, help="LM-head loss over tiles of the logits, never all of them (0: the plain loss)")
    g.add_argument("--seed", type=int, default=0, help="data order, layer schedule and demo weights")
    g.add_argument("--max_nonfinite_steps", type=_positive_int, default=10, help="stop after this many steps in a row with a NaN/inf loss or gradient norm (each is skipped)")

    g = p.add_argument_group("logging and saving")
    g.add_argument("--logging_steps", type=_positive_int, default=1)
    g.add_argument("--eval_steps", type=_positive_int, help="evaluate on the held-out split every N steps (demo 20)")
    g.add_argument("--save_steps", type=_positive_int, help="write a resumable checkpoint every N steps")
    g.add_argument("--save_total_limit", type=_positive_int, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", help="a checkpoint-N folder, or 'latest' (the newest of the run in --output_dir)")
    g.add_argument("--overwrite_output_dir", default=False, **flag, help="start a new run in an --output_dir that holds another run's log or checkpoints")
    g.add_argument("--disable_tqdm", default=False, **flag, help="no progress bar")
    g.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    g.add_argument("--ddp_timeout", type=_positive_int, default=1800,
                   help="under torchrun: seconds a rank waits for the others before the run fails")
    g.add_argument("--fsdp", default=False, **flag,
                   help="under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2)")
    return p


# --------------------------------------------------------------------------------------------------- helpers


def _number_list(doc, where: str) -> list[float]:
    if not isinstance(doc, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in doc):
        raise CliError(f"--lisa_layer_weights {where}: expected a JSON list of numbers (or {{\"layer_weights\": [...]}})")
    return [float(w) for w in doc]


def parse_layer_weights(value: str) -> list[float] | str:
    """``--lisa_layer_weights``: "auto", "1,2,1,...", a JSON list "[1, 2, 1, ...]", a JSON file (a list, or
    {"layer_weights": [...]}) or a JSONL run log.

    From a run log the weight of a layer is its mean weight-update norm over the periods it trained in; layers
    never sampled there get the mean of the others, so they can still be chosen.
    """
    if value.strip() == "auto":
        return "auto"
    path = Path(value)
    if path.is_file():
        text = path.read_text()
        if path.suffix == ".jsonl":
            return _weights_from_log(path)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise CliError(f"--lisa_layer_weights {path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if isinstance(doc, dict):
            doc = doc.get("layer_weights", doc.get("weights"))
        return _number_list(doc, str(path))
    if value.lstrip().startswith("["):
        try:
            return _number_list(json.loads(value), repr(value))
        except json.JSONDecodeError as e:
            raise CliError(f"--lisa_layer_weights {value!r}: invalid JSON list at column {e.colno}: {e.msg}") from None
    if any(ch in value for ch in "/\\") or value.endswith((".json", ".jsonl")):
        raise CliError(f"--lisa_layer_weights {value}: no such file")
    try:
        return [float(w) for w in value.split(",") if w.strip()]
    except ValueError:
        raise CliError(f"--lisa_layer_weights {value!r}: expected comma-separated numbers or a file path") from None


def _weights_from_log(path: Path) -> list[float]:
    from .runlog import read_log

    records = read_log(path)
    n_layers = next((r.get("n_layers") for r in records if r["kind"] == "config"), None)
    sums, counts = {}, {}
    for r in records:
        if r["kind"] != "period":
            continue
        for layer, norm in zip(r.get("layers", ()), r.get("layer_update_norms", ())):
            sums[layer] = sums.get(layer, 0.0) + norm
            counts[layer] = counts.get(layer, 0) + 1
    if not n_layers or not sums:
        raise CliError(f"--lisa_layer_weights {path}: no LISA periods with update norms in this log")
    means = {i: sums[i] / counts[i] for i in sums}
    fill = sum(means.values()) / len(means)
    return [means.get(i, fill) for i in range(n_layers)]


def _resolve(args) -> tuple[bool, dict]:
    """Fill mode-dependent defaults; returns (demo?, the filled values)."""
    demo = bool(args.demo) or args.model_name_or_path is None
    if args.demo and args.model_name_or_path:
        raise CliError("--demo and --model_name_or_path exclude each other: the demo builds its own model")
    defaults = DEMO_DEFAULTS if demo else MODEL_DEFAULTS
    values = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in defaults.items()}
    if not 0 <= values["validation_split_percentage"] < 100:
        raise CliError(f"--validation_split_percentage must be in [0, 100), got {values['validation_split_percentage']}")
    if args.max_steps is not None and args.max_steps == 0:
        raise CliError("--max_steps must be > 0 (or -1 to train for --num_train_epochs)")
    if values["block_size"] < 2:
        raise CliError(f"--block_size must be at least 2 (a token and the next one to predict), got {values['block_size']}")
    return demo, values


def _check_paths(args, demo: bool) -> tuple[Path, Path, Path]:
    from .demo import demo_dataset_path
    from .run_folder import RunFolderError, ensure_writable_folder

    if args.model_name_or_path and not Path(args.model_name_or_path).exists() and (
        args.model_name_or_path.startswith((".", "/", "~")) or args.model_name_or_path.count("/") > 1
    ):  # a path, not a hub id ("org/name") that could sit in the local cache
        raise CliError(f"--model_name_or_path {args.model_name_or_path}: no such folder")
    if args.dataset_path is None and not demo:
        raise CliError("--dataset_path is required with --model_name_or_path")
    dataset = Path(args.dataset_path) if args.dataset_path else demo_dataset_path()
    if not dataset.exists():
        raise CliError(f"--dataset_path {dataset}: no such file or folder")
    if args.output_model_path is None and not demo:
        raise CliError("--output_model_path is required with --model_name_or_path")
    out_model = Path(args.output_model_path or DEMO_OUTPUT)
    out_dir = Path(args.output_dir) if args.output_dir else out_model
    for flag, path in (("--output_model_path", out_model), ("--output_dir", out_dir)):
        try:  # before the model loads: a typo here should not cost a model load first
            ensure_writable_folder(path)
        except RunFolderError as e:
            raise CliError(f"{flag} {e}") from None
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not Path(args.resume_from_checkpoint).is_dir():
            raise CliError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder")
    return dataset, out_model, out_dir


def _check_block_size(model, block_size: int) -> None:
    """Longer sequences than the model has positions for fail deep in its forward (GPT-2: an IndexError)."""
    for field in ("n_positions", "max_position_embeddings"):  # GPT-2 aliases the second to the first
        limit = getattr(model.config, field, None)
        if isinstance(limit, int) and block_size > limit:
            raise CliError(f"--block_size {block_size} exceeds the model's {field}={limit}; use --block_size {limit} or less")


def _check_device(name: str | None) -> None:
    """Refuse a --device this machine does not have before loading a model onto it."""
    import torch

    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device {name!r}: not a device name (use cuda, cuda:N or cpu)") from None
    if device.type not in ("cuda", "cpu"):
        raise CliError(f"--device {name!r}: only cuda, cuda:N and cpu are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: no CUDA GPU is available to torch {torch.__version__} here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _load_model(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = args.torch_dtype if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
    path = Path(args.model_name_or_path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise CliError(f"--model_name_or_path {path}: no config.json there (not a Hugging Face model folder)")
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    try:
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, trust_remote_code=args.trust_remote_code, **{dtype_kw: dtype}
        )
    except (OSError, ValueError) as e:
        raise CliError(f"--model_name_or_path {args.model_name_or_path}: cannot load the model ({e})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise CliError(f"--model_name_or_path {args.model_name_or_path}: cannot load its tokenizer ({e})") from None
    return model, tokenizer


def _lisa_config(args, values, weights):
    from .controller import LisaConfig

    try:
        return LisaConfig(
            n_active_layers=values["lisa_activated_layers"],
            interval_steps=values["lisa_interval_steps"],
            layers_attribute=args.lisa_layers_attribute,
            seed=args.seed,
            layer_weights=weights,
            sampling=args.lisa_sampling,
            state_policy=args.lisa_state_policy,
            prefetch_steps=args.lisa_prefetch_steps,
            embedding_state_dtype=args.lisa_embedding_state_dtype,
        )
    except ValueError as e:
        raise CliError(_name_flags(str(e))) from None


def _name_flags(message: str) -> str:
    """Mention the command-line flag next to each LisaConfig field an error names."""
    for field, flag in FLAG_OF_FIELD.items():
        if field in message and flag not in message:
            message = message.replace(f"LisaConfig.{field}", f"{flag} (LisaConfig.{field})", 1)
            if flag not in message:
                message = f"{flag}: {message}"
    return message


def _format_summary(summary: dict, *, demo: bool, out_model: Path, log: Path, png: Path, wall: float, lisa) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    periods = summary["periods"]
    shown = ", ".join(f"{p['period']}:{p['layers']}" for p in periods[:16])
    if len(periods) > 16:
        shown += f", ... ({len(periods)} periods)"
    mem = f"host peak RSS {summary['peak_host_rss_mb']:.0f} MiB" if summary.get("peak_host_rss_mb") else "host peak RSS n/a"
    if "gpu_mem_peak_mb" in summary:
        mem = f"GPU peak allocated {summary['gpu_mem_peak_mb']:.0f} MiB; " + mem
    lines = [
        f"LISA {'demo ' if demo else ''}finished: {summary['steps']} steps on {summary['device']} in {wall:.1f} s "
        f"(training {summary['wall_time_s']:.1f} s); {lisa.n_active_layers} of {summary.get('n_layers', '?')} layers "
        f"every {lisa.interval_steps} steps, "
        f"state policy {lisa.state_policy}",
        f"  train loss    {fmt(summary['first_loss'])} -> {fmt(summary['last_loss'])}"
        + (f" ({summary['skipped_steps']} steps skipped: non-finite loss or gradient)" if summary.get("skipped_steps") else ""),
        f"  held-out loss {fmt(summary['first_eval_loss'])} -> {fmt(summary['last_eval_loss'])}"
        if summary["first_eval_loss"] is not None
        else "  held-out loss n/a (no --validation_split_percentage)",
        f"  layers per period: {shown or 'none finished'}",
        f"  peak memory: {mem}",
        f"  model: {out_model}  (AutoModelForCausalLM.from_pretrained)",
        f"  log:   {log}",
        f"  plot:  {png}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .distributed import DistributedError, shutdown

    try:
        return _run(args)
    except CliError as e:
        print(f"lisa-finetune: error: {e}", file=sys.stderr)
        return 2
    except (RunFailed, DistributedError) as e:  # a rank that failed prints its own traceback; the others say why
        print(f"lisa-finetune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from .checkpoint import latest_checkpoint
        from .run_folder import current_run_id

        out = Path(args.output_dir or args.output_model_path or DEMO_OUTPUT)
        run_id = current_run_id(out)
        found = latest_checkpoint(out, run_id) if run_id is not None else None
        hint = (f"the newest checkpoint is {found}; the same command with --resume_from_checkpoint latest continues "
                f"from it" if found else "no checkpoint was written (--save_steps N writes them)")
        print(f"\nlisa-finetune: interrupted; {hint}", file=sys.stderr)
        return 130
    finally:
        shutdown()  # the process group of a torchrun run, if there is one


def _run(args) -> int:
    wall_start = time.perf_counter()
    demo, values = _resolve(args)
    dataset_path, out_model, out_dir = _check_paths(args, demo)
    # The demo's own folder holds the last demo run: running the demo again starts afresh there.
    args.overwrite_output_dir = args.overwrite_output_dir or (demo and not (args.output_model_path or args.output_dir))
    from .distributed import launched_rank
    from .run_folder import RunFolderError, claim_output_dir

    with contextlib.ExitStack() as held:
        try:  # held until the final model is written; a second run in out_dir stops here, before loading anything
            if launched_rank() == 0:  # under torchrun rank 0 holds the folder; the trainer tells the others the run
                held.enter_context(claim_output_dir(out_dir, resume_from=args.resume_from_checkpoint,
                                                    overwrite=args.overwrite_output_dir))
        except RunFolderError as e:
            raise CliError(f"--output_dir {e}") from None
        except FileNotFoundError as e:
            raise CliError(f"--resume_from_checkpoint: {e}") from None
        return _train(args, demo, values, dataset_path, out_model, out_dir, wall_start)


def _train(args, demo: bool, values: dict, dataset_path: Path, out_model: Path, out_dir: Path, wall_start: float) -> int:
    weights = parse_layer_weights(args.lisa_layer_weights) if args.lisa_layer_weights else None

    import torch

    from .data import load_lmflow_dataset, split_dataset, tokenize_dataset
    from .demo import build_demo_model, build_demo_tokenizer
    from .layers import find_decoder_layers
    from .plots import plot_run
    from .runlog import LOG_FILE
    from .trainer import LisaTrainer, TrainingArguments, TrainingDiverged

    _check_device(args.device)
    try:  # before the model: a typo in the data should not cost a model load first
        data = load_lmflow_dataset(dataset_path)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(f"--dataset_path: {e}") from None
    torch.manual_seed(args.seed)
    if demo:
        tokenizer = build_demo_tokenizer()
        model = build_demo_model(tokenizer, seed=args.seed)
    else:
        model, tokenizer = _load_model(args)

    try:
        _, layers = find_decoder_layers(model, args.lisa_layers_attribute)
    except (ValueError, AttributeError) as e:
        raise CliError(f"--lisa_layers_attribute: {e}") from None
    if values["lisa_activated_layers"] > len(layers):
        raise CliError(f"--lisa_activated_layers {values['lisa_activated_layers']} exceeds the model's {len(layers)} decoder layers")
    if isinstance(weights, list) and len(weights) != len(layers):
        raise CliError(f"--lisa_layer_weights has {len(weights)} entries but the model has {len(layers)} decoder layers")
    _check_block_size(model, values["block_size"])

    pack = None if not args.disable_group_texts else False
    try:
        tokenized = tokenize_dataset(data, tokenizer, values["block_size"], pack=pack)
    except ValueError as e:
        raise CliError(f"--dataset_path: {e}") from None
    train_data, eval_data = split_dataset(tokenized, values["validation_split_percentage"] / 100, args.seed)

    lisa = _lisa_config(args, values, weights)
    try:
        targs = TrainingArguments(
            output_dir=str(out_dir),
            learning_rate=values["learning_rate"],
            weight_decay=args.weight_decay,
            lr_scheduler_type=args.lr_scheduler_type,
            warmup_steps=values["warmup_steps"],
            warmup_ratio=args.warmup_ratio,
            num_train_epochs=args.num_train_epochs,
            max_steps=values["max_steps"],
            per_device_train_batch_size=values["per_device_train_batch_size"],
            per_device_eval_batch_size=args.per_device_eval_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_grad_norm=args.max_grad_norm,
            bf16=args.bf16,
            gradient_checkpointing=args.gradient_checkpointing,
            chunked_loss=args.chunked_loss,
            seed=args.seed,
            logging_steps=args.logging_steps,
            eval_steps=values["eval_steps"],
            save_steps=args.save_steps,
            save_total_limit=args.save_total_limit,
            save_model=False,
            progress=not args.disable_tqdm,
            device=args.device,
            overwrite_output_dir=args.overwrite_output_dir,
            max_nonfinite_steps=args.max_nonfinite_steps,
            ddp_timeout=args.ddp_timeout,
            fsdp=args.fsdp,
        )
    except ValueError as e:  # the fields are named like the flags
        raise CliError(str(e).replace("TrainingArguments.", "--")) from None

    try:
        trainer = LisaTrainer(model, tokenizer, train_data, targs, lisa, eval_dataset=eval_data)
    except ValueError as e:
        raise CliError(_name_flags(str(e))) from None
    main_rank = trainer.dist is None or trainer.dist.is_main  # under torchrun, rank 0 alone prints and writes
    ranks = f" x {trainer.dist.world_size} ranks (global batch {trainer.global_batch_size * args.gradient_accumulation_steps})" if trainer.dist else ""
    if main_rank:
        print(
            f"lisa-finetune: {'demo model' if demo else args.model_name_or_path} with {len(layers)} decoder layers, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; data {dataset_path}: "
            f"{len(train_data)} train / {len(eval_data) if eval_data else 0} held-out sequences of <= {values['block_size']} tokens "
            f"({tokenized.stats['truncated']} instances truncated, {tokenized.stats['dropped_untrained']} without trained "
            f"tokens left out); "
            f"{trainer.max_steps} steps on {trainer.device}{ranks}",
            flush=True,
        )
    from .checkpoint import CheckpointError

    try:
        summary = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.save_model(out_model)  # every rank: under FSDP2 the shards are gathered to rank 0, which writes
        if not main_rank:
            return 0
        png = plot_run(out_dir / LOG_FILE, out_dir / PLOT_FILE, title=f"LISA: {'demo' if demo else args.model_name_or_path}")
    except (FileNotFoundError, CheckpointError) as e:
        raise CliError(f"--resume_from_checkpoint: {e}") from None
    except (TrainingDiverged, OSError) as e:  # NaN weights, a full disk, a file-size limit: earlier checkpoints stay
        raise RunFailed(str(e)) from None
    print(
        _format_summary(summary, demo=demo, out_model=out_model, log=out_dir / LOG_FILE, png=png,
                        wall=time.perf_counter() - wall_start, lisa=lisa),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
