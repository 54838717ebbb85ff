"""`lisa-finetune`: fine-tune a causal LM with LISA from the command line (LMFlow's flags; the options are in
`lisa_trainer.cli_options`).

With no ``--model_name_or_path`` (or with ``--demo``) it runs the embedded default: a small random-weight Llama, a
byte-level tokenizer and the sample dataset shipped with the package, all built locally; it finishes in about a
minute on a laptop CPU and writes the model, ``train_log.jsonl`` and ``lisa_run.png`` to ``./lisa-demo-output``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn

from .cli_options import (OPTION_CLASSES, CliError, DataOptions, ModelOptions, Options, RunFailed, RunOptions,
                          option_message, parse_options)
from .options import OptionError

__all__ = ["CliError", "DataOptions", "ModelOptions", "OPTION_CLASSES", "RunFailed", "RunOptions", "main",
           "parse_options"]

PLOT_FILE = "lisa_run.png"


# ----------------------------------------------------------------------------------------- checks and loading


def _check_inputs(opts: Options) -> Path:
    """Everything that can be checked before a model loads; returns the dataset path."""
    from .demo import demo_dataset_path
    from .run_folder import RunFolderError, ensure_writable_folder

    name = opts.model.model_name_or_path
    if name and not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise CliError(f"--model_name_or_path {name}: no such folder")  # a path, not a hub id ("org/name")
    if opts.data.dataset_path is None and not opts.demo:
        raise CliError("--dataset_path is required with --model_name_or_path")
    dataset = Path(opts.data.dataset_path) if opts.data.dataset_path else demo_dataset_path()
    if not dataset.exists():
        raise CliError(f"--dataset_path {dataset}: no such file or folder")
    # Each folder named by the flag that gave it (the model goes to --output_dir unless --output_model_path is given).
    folders = {opts.out_dir: "--output_dir", opts.out_model: "--output_model_path" if opts.run.output_model_path
               else "--output_dir"}
    for path, flag in folders.items():
        try:
            ensure_writable_folder(path)
        except RunFolderError as e:
            raise CliError(f"{flag} {e}") from None
    checkpoint = opts.run.resume_from_checkpoint
    if checkpoint and checkpoint != "latest" and not Path(checkpoint).is_dir():
        raise CliError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder")
    _check_device(opts.training.device)
    return dataset


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


def _attention(opts: Options) -> str:
    """The attention implementation --use_flash_attention asks for, as this machine can give it."""
    import importlib.util

    import torch

    if not opts.model.use_flash_attention:
        return "sdpa"
    on_gpu = torch.cuda.is_available() and (opts.training.device or "cuda").startswith("cuda")
    if on_gpu and importlib.util.find_spec("flash_attn") is not None:
        chosen, why = "flash_attention_2", "the flash_attn package is installed"
    else:
        chosen = "sdpa"
        why = "the flash_attn package is not installed" if on_gpu else "training runs on the CPU"
    print(f"lisa-finetune: --use_flash_attention 1: {why}; using {chosen}", flush=True)
    return chosen


def _load_model(opts: Options):
    import torch
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .layers import refuse_peft_model

    name, dtype = opts.model.model_name_or_path, opts.model.torch_dtype
    if (Path(name) / "adapter_config.json").is_file():
        raise CliError(f"--model_name_or_path {name}: a peft adapter (adapter_config.json), not a model; LISA trains "
                       f"a model's full weights. Merge the adapter into its base model and pass that folder: "
                       f"PeftModel.from_pretrained(base, {name!r}).merge_and_unload().save_pretrained(FOLDER)")
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise CliError(f"--model_name_or_path {name}: no config.json there (not a Hugging Face model folder)")
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=opts.model.trust_remote_code, attn_implementation=_attention(opts),
            **{dtype_kw: dtype if dtype == "auto" else getattr(torch, dtype)})
    except (OSError, ValueError, ImportError) as e:
        raise CliError(f"--model_name_or_path {name}: cannot load the model ({e})") from None
    except SafetensorError as e:  # a weights file cut short or damaged
        raise CliError(f"--model_name_or_path {name}: cannot read {_unreadable_weights(name)} ({e})") from None
    try:
        refuse_peft_model(model)  # adapters loaded with the model (a hub adapter's name)
    except ValueError as e:
        raise CliError(f"--model_name_or_path {name}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=opts.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise CliError(f"--model_name_or_path {name}: cannot load its tokenizer ({e})") from None
    return model, tokenizer


def _unreadable_weights(name: str) -> str:
    """The first .safetensors file of the model folder ``name`` whose header does not read, or "its weights"."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(name).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError:
            return str(path)
    return "its weights"


def _check_block_size(model, block_size: int) -> None:
    """Longer sequences than the model has positions for fail deep in its forward (GPT-2: an IndexError)."""
    for field in ("n_positions", "max_position_embeddings"):  # GPT-2 aliases the second to the first
        limit = getattr(model.config, field, None)
        if isinstance(limit, int) and block_size > limit:
            raise CliError(f"--block_size {block_size} exceeds the model's {field}={limit}; use --block_size {limit} "
                           "or less")


def _prepare(opts: Options, dataset_path: Path):
    """Data (checked first: a typo in it should not cost a model load), model, tokenizer, tokenized splits."""
    import torch

    from .data import load_lmflow_dataset, split_dataset, tokenize_dataset
    from .demo import build_demo_model, build_demo_tokenizer
    from .layers import find_decoder_layers

    try:
        data = load_lmflow_dataset(dataset_path)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(f"--dataset_path: {e}") from None
    torch.manual_seed(opts.training.seed)
    if opts.demo:
        tokenizer = build_demo_tokenizer()
        model = build_demo_model(tokenizer, seed=opts.training.seed)
    else:
        model, tokenizer = _load_model(opts)
    try:
        _, layers = find_decoder_layers(model, opts.lisa.layers_attribute)
    except (ValueError, AttributeError) as e:
        raise CliError(f"--lisa_layers_attribute: {e}") from None
    if not opts.run.use_lisa:  # every layer active in every period: full fine-tuning through the same loop
        opts.lisa = dataclasses.replace(opts.lisa, n_active_layers=len(layers), layer_weights=None,
                                        sampling="uniform", granularity="layer", module_budget=None,
                                        state_policy="keep", track_update_norms=False)
    _check_block_size(model, opts.data.block_size)
    try:
        tokenized = tokenize_dataset(data, tokenizer, opts.data.block_size,
                                     pack=False if opts.data.disable_group_texts else None,
                                     conversation_template=opts.data.conversation_template)
    except ValueError as e:
        raise CliError(f"--dataset_path: {e}") from None
    train_data, eval_data = split_dataset(tokenized, opts.data.validation_split_percentage / 100, opts.training.seed)
    if eval_data is None and opts.data.validation_split_percentage > 0:
        warnings.warn(f"{_empty_split(opts)}; no held-out loss is computed", stacklevel=2)
    return model, tokenizer, layers, tokenized.stats, train_data, eval_data


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    from .distributed import launched_world_size

    code = _main(argv)
    if launched_world_size() > 1:
        _end_rank(code)
    return code


def _end_rank(code: int) -> NoReturn:
    """End a rank of a torchrun job now, skipping the interpreter's teardown (everything the run writes is closed).

    Once FSDP2's DTensors have used the gloo process group, torch keeps its backend, and with it its worker
    threads, alive past `destroy_process_group` (without FSDP they are joined there). A worker that drops the last
    reference to a tensor of its last collective while the interpreter tears down must take the GIL, which Python
    answers by ending the thread; the C++ frames it unwinds through then call std::terminate ("terminate called
    without an active exception", SIGABRT, and torchrun stops the other ranks before rank 0 writes the plot)."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    from .distributed import DistributedError, shutdown

    out_dir = None
    try:
        opts = parse_options(argv)
        out_dir = opts.out_dir
        return _run(opts)
    except CliError as e:
        print(f"lisa-finetune: error: {e}", file=sys.stderr)
        return 2
    except (RunFailed, DistributedError) as e:  # a rank that failed prints its own traceback; the others say why
        print(f"lisa-finetune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nlisa-finetune: interrupted; {_resume_hint(out_dir)}", file=sys.stderr)
        return 130
    finally:
        shutdown()  # the process group of a torchrun run, if there is one


def _resume_hint(out_dir: Path | None) -> str:
    from .checkpoint import latest_checkpoint
    from .run_folder import current_run_id

    run_id = current_run_id(out_dir) if out_dir is not None else None
    found = latest_checkpoint(out_dir, run_id) if run_id is not None else None
    if found is None:
        return "no checkpoint was written (--save_steps N writes them)"
    return f"the newest checkpoint is {found}; the same command with --resume_from_checkpoint latest continues from it"


def _run(opts: Options) -> int:
    from .distributed import launched_rank
    from .run_folder import RunFolderError, claim_output_dir

    wall_start = time.perf_counter()
    dataset_path = _check_inputs(opts)
    with contextlib.ExitStack() as held:
        claim = None
        try:  # held until the final model is written; a second run in the folder stops here, before any loading
            if launched_rank() == 0:  # under torchrun rank 0 holds the folder; the trainer tells the others the run
                claim = held.enter_context(claim_output_dir(opts.out_dir, resume_from=opts.run.resume_from_checkpoint,
                                                            overwrite=opts.training.overwrite_output_dir))
        except RunFolderError as e:
            raise CliError(f"--output_dir {e}") from None
        except FileNotFoundError as e:
            raise CliError(f"--resume_from_checkpoint: {e}") from None
        return _train(opts, dataset_path, wall_start, claim)


def _follow_accelerate_fsdp(opts: Options) -> None:
    """`accelerate launch --config_file` with an FSDP config shards as --fsdp does (rank 0 says how an FSDP1 config
    is met); a setting that cannot be met stops the run here, before the model loads."""
    from .distributed import accelerate_fsdp, launched_rank

    try:
        shard, note = accelerate_fsdp()
    except ValueError as e:
        raise CliError(str(e)) from None
    if shard and not opts.training.fsdp:
        opts.training = dataclasses.replace(opts.training, fsdp=True)
    if note and launched_rank() == 0:
        print(f"lisa-finetune: {note}", flush=True)


def _train(opts: Options, dataset_path: Path, wall_start: float, claim) -> int:
    from .checkpoint import CheckpointError
    from .plots import plot_run
    from .runlog import LOG_FILE
    from .trainer import LisaTrainer, TrainingDiverged

    _follow_accelerate_fsdp(opts)
    model, tokenizer, layers, stats, train_data, eval_data = _prepare(opts, dataset_path)
    n_params = sum(p.numel() for p in model.parameters())  # before the trainer, which may offload frozen layers
    try:
        trainer = LisaTrainer(model, tokenizer, train_data, opts.training, opts.lisa, eval_dataset=eval_data)
    except OptionError as e:
        raise CliError(option_message(e, opts.run.config, opts.config_keys)) from None
    main_rank = trainer.dist.is_main  # under torchrun, rank 0 alone prints and writes
    if main_rank:
        print(_start_line(opts, trainer, layers, n_params, stats, dataset_path, train_data, eval_data), flush=True)
    try:
        summary = trainer.train(claim=claim)  # rank 0's claim (the others learn it from rank 0)
        trainer.save_model(opts.out_model)  # every rank: under FSDP2 the shards are gathered to rank 0, which writes
        if not main_rank:
            return 0
        title = f"LISA: {'demo' if opts.demo else opts.model.model_name_or_path}"
        png = plot_run(opts.out_dir / LOG_FILE, opts.out_dir / PLOT_FILE, title=title)
    except (FileNotFoundError, CheckpointError) as e:
        raise CliError(f"--resume_from_checkpoint: {e}") from None
    except (TrainingDiverged, OSError) as e:  # NaN weights, a full disk, a file-size limit: earlier checkpoints stay
        raise RunFailed(str(e)) from None
    print(_format_summary(summary, opts, log=opts.out_dir / LOG_FILE, png=png, wall=time.perf_counter() - wall_start),
          flush=True)
    return 0


def _start_line(opts: Options, trainer, layers, n_params: int, stats: dict, dataset_path: Path, train_data,
                eval_data) -> str:
    ranks = (f" x {trainer.dist.world_size} ranks (global batch "
             f"{trainer.global_batch_size * opts.training.gradient_accumulation_steps})" if trainer.dist.world_size > 1
             else "")
    return (
        f"lisa-finetune: {'demo model' if opts.demo else opts.model.model_name_or_path} with {len(layers)} decoder "
        f"layers, {n_params / 1e6:.2f}M parameters; data {dataset_path}: "
        f"{len(train_data)} train / {len(eval_data) if eval_data else 0} held-out sequences of <= "
        f"{opts.data.block_size} tokens ({stats['truncated']} instances truncated, {stats['dropped_untrained']} "
        f"without trained tokens left out); {trainer.max_steps} steps on {trainer.device}{ranks}"
        + ("" if opts.run.use_lisa else "; --use_lisa 0: every layer trains in every step")
    )


def _empty_split(opts: Options) -> str:
    # split_dataset keeps at least one sequence in each part, so only a single sequence leaves the held-out part empty
    return (f"--validation_split_percentage {opts.data.validation_split_percentage:g} gave an empty held-out split: "
            "the data has a single sequence, which training keeps")


def _format_summary(summary: dict, opts: Options, *, log: Path, png: Path, wall: float) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    lisa = opts.lisa
    periods = summary["periods"]
    shown = ", ".join(f"{p['period']}:{p['layers']}" for p in periods[:16])
    if len(periods) > 16:
        shown += f", ... ({len(periods)} periods)"
    mem = f"host peak RSS {summary['peak_host_rss_mb']:.0f} MiB" if summary.get("peak_host_rss_mb") else "host peak RSS n/a"
    if "gpu_mem_peak_mb" in summary:
        mem = f"GPU peak allocated {summary['gpu_mem_peak_mb']:.0f} MiB; " + mem
    skipped = summary.get("skipped_steps")
    no_held_out = _empty_split(opts) if opts.data.validation_split_percentage else "no --validation_split_percentage"
    lines = [
        f"LISA {'demo ' if opts.demo else ''}finished: {summary['steps']} steps on {summary['device']} in {wall:.1f} s "
        f"(training {summary['wall_time_s']:.1f} s); {lisa.n_active_layers} of {summary.get('n_layers', '?')} layers "
        f"every {lisa.interval_steps} steps, state policy {lisa.state_policy}",
        f"  train loss    {fmt(summary['first_loss'])} -> {fmt(summary['last_loss'])}"
        + (f" ({skipped} steps skipped: non-finite loss or gradient)" if skipped else ""),
        f"  held-out loss {fmt(summary['first_eval_loss'])} -> {fmt(summary['last_eval_loss'])}"
        if summary["first_eval_loss"] is not None
        else f"  held-out loss n/a ({no_held_out})",
        f"  layers per period: {shown or 'none finished'}",
        f"  peak memory: {mem}",
        f"  model: {opts.out_model}  (AutoModelForCausalLM.from_pretrained)",
        f"  log:   {log}",
        f"  plot:  {png}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
