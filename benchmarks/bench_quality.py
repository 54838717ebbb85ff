"""Quality: held-out loss of full fine-tuning, LoRA and LISA on a small pretrained model, and LISA's sampling options.

Nothing is downloaded. The text is the Python standard library's own source, read from the running interpreter's
`Lib/` folder (split and turned into questions by `benchmarks/quality_data.py`); the tokenizer is the package's
byte-level demo tokenizer (259 tokens). The rest stays in this one file because it is one benchmark: its sizes,
pretraining, methods, studies and report are read and changed together.

1. Pretraining: a small Llama (random init from a transformers config) learns the source files of most stdlib
   modules. The weights are cached (`--cache`, default `~/.cache/lisa_kernels/bench_quality/`, one file per
   model size, Python version and corpus), so only the first run pays for it (5 minutes on a busy 2-core CPU).
2. Fine-tuning task: "What does `module.name` do?" -> the first line of that function's or class's docstring,
   for modules left out of pretraining. The held-out split asks about other left-out modules than the training
   split, so the held-out loss (on answer tokens only) measures what fine-tuning taught, not what was memorised.
3. Methods, each over a small learning-rate grid with the same step budget, batches and schedule (warmup, cosine):
   full fine-tuning (torch AdamW), LoRA (peft, several ranks, all linear layers) and LISA with the package's own
   API (`LisaConfig`, `build_optimizer`, `LisaController`) and each state policy (park, reset, keep).
4. Sampling study, at LISA-park's best learning rate, over several seeds (the seed sets the layer schedule and the
   data order): the paper's uniform draws, coverage-balanced sampling, `layer_weights="auto"`, and the paper's
   (γ, K) variants at the same step budget.

Reported per run: held-out loss, wall time, and the training state on the device (parameters + gradients +
optimizer state, measured after each step: the CPU stand-in for GPU memory; on CUDA the peak allocated too).
Results: a table on stdout, `benchmarks/results/quality-<device>.json` (with device, versions, commit, date) and
a PNG beside it.

Run from the repository root:

    python -m benchmarks.bench_quality             # the full run (~20 min on a busy 2-core CPU, +5 the first time)
    python -m benchmarks.bench_quality --quick     # a tiny model, a few steps: checks that everything runs
    python -m benchmarks.bench_quality --study sampling   # uniform, auto, outlier and module-wise over 5 seeds
    python -m benchmarks.bench_quality --study sampling --ft-steps 240   # the same, 3x longer runs
    python -m benchmarks.bench_quality --study sampling --size large     # 1.5M parameters, questions about the
                                                                         # modules inside packages too, 240 steps
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.bench_finetune import device_state_bytes
from benchmarks.common import print_table, results_path, write_results
from benchmarks.quality_data import build_task, collate

DEFAULT_CACHE = Path.home() / ".cache" / "lisa_kernels" / "bench_quality"


@dataclass(frozen=True)
class Size:
    model: dict  # LlamaConfig fields
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    block: int  # tokens per pretraining sequence; fine-tuning examples are cut to this length too
    ft_steps: int
    ft_batch: int
    warmup: int
    n_active: int  # γ
    interval: int  # K
    lrs: dict  # method family -> learning-rate grid
    lora_ranks: tuple
    seeds: tuple
    variants: tuple  # (γ, K) pairs tried beside (n_active, interval)
    corpus_modules: int | None = None  # pretrain on the first N modules only (None: all of them)
    packages: bool = False  # the modules inside the standard library's packages too, not only the top-level ones


SIZES = {
    # 8 layers so LISA has a real choice (2 of 8); 0.4M parameters and batches of 4 questions, so that 35
    # fine-tuning runs fit in ~15 minutes on a busy shared 2-core CPU (a fine-tuning step took ~0.3 s there,
    # pretraining 5 minutes).
    "full": Size(
        model=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=8, num_attention_heads=4,
                   num_key_value_heads=2),
        pretrain_steps=600, pretrain_batch=8, pretrain_lr=3e-3, block=128,
        ft_steps=80, ft_batch=4, warmup=5, n_active=2, interval=5,
        lrs={"full": (3e-4, 1e-3, 3e-3), "lora": (1e-3, 3e-3, 1e-2), "lisa": (3e-4, 1e-3, 3e-3)},
        lora_ranks=(4, 32), seeds=(0, 1, 2), variants=((1, 5), (4, 5), (2, 10)),
    ),
    # Seconds, not minutes: every code path once, on a model too small and too briefly trained to rank anything.
    "quick": Size(
        model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                   num_key_value_heads=1),
        pretrain_steps=30, pretrain_batch=8, pretrain_lr=3e-3, block=64,
        ft_steps=8, ft_batch=8, warmup=2, n_active=1, interval=2,
        lrs={"full": (1e-3,), "lora": (3e-3,), "lisa": (1e-3,)},
        lora_ranks=(4,), seeds=(0,), variants=((2, 2),), corpus_modules=3,
    ),
}

# The sampling study's size: with the 0.4M model, whose 550 training and 176 held-out questions come from
# top-level modules only, uniform minus module-wise sampling varied by 0.008-0.010 (std over 5 seeds) at 80 to
# 480 steps, as much as the difference itself; neither batches of 16 nor 6x longer runs narrowed it. Asking
# about the modules inside packages too (1,743 training, 469 held-out questions) made a seed (its layer
# schedule and data order) move every rule alike: that std fell to 0.0022 (80 steps) and 0.0038 (240 steps)
# on the same model, and to 0.0034 at 240 steps on this 1.5M-parameter one (pretraining 4.6 minutes, the
# sampling study's 20 runs of 240 steps 7.5 minutes on a 2-core CPU at a load of 2 to 3).
SIZES["large"] = replace(
    SIZES["full"], pretrain_steps=1200, ft_steps=240, packages=True,
    model=dict(hidden_size=128, intermediate_size=352, num_hidden_layers=8, num_attention_heads=4,
               num_key_value_heads=2))


# ----------------------------------------------------------------------------------------------------------------
# Model and pretraining


def build_model(size: Size, tokenizer, seed: int = 0):
    from lisa_trainer.demo import build_demo_model

    model = build_demo_model(tokenizer, seed=seed, max_position_embeddings=size.block, use_cache=False, **size.model)
    model.config._attn_implementation = "sdpa"
    return model


def lr_at(step: int, base: float, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 (the trainer's default schedule)."""
    from lisa_trainer.trainer import lr_at as schedule

    return schedule(step, base_lr=base, total_steps=total, warmup_steps=warmup, kind="cosine")


def pretrain(size: Size, tokenizer, task: dict, cache: Path) -> tuple[dict, dict]:
    """The pretrained weights (state dict) and how they were made, from the cache when present."""
    recipe = {"model": size.model, "steps": size.pretrain_steps, "batch": size.pretrain_batch, "lr": size.pretrain_lr,
              "block": size.block, "python": sysconfig.get_python_version(), "corpus": task["corpus_digest"]}
    key = hashlib.blake2b(json.dumps(recipe, sort_keys=True).encode(), digest_size=8).hexdigest()
    path = cache / f"pretrained-{key}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["weights"], {**saved["info"], "cache": str(path), "from_cache": True}

    model = build_model(size, tokenizer, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, weight_decay=0.0)
    corpus, gen = task["corpus"], torch.Generator().manual_seed(0)
    started, losses = time.perf_counter(), []
    for step in range(size.pretrain_steps):
        starts = torch.randint(0, len(corpus) - size.block, (size.pretrain_batch,), generator=gen)
        ids = torch.stack([corpus[s:s + size.block] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, size.pretrain_lr, size.pretrain_steps, max(1, size.pretrain_steps // 20))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 10):]
    info = {"recipe": recipe, "seconds": time.perf_counter() - started, "final_loss": sum(tail) / len(tail),
            "corpus_tokens": len(corpus), "params": sum(p.numel() for p in model.parameters())}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"weights": model.state_dict(), "info": info}, tmp)
    tmp.replace(path)  # atomic: a second run never reads half a file
    return model.state_dict(), {**info, "cache": str(path), "from_cache": False}


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning


@dataclass(frozen=True)
class Run:
    method: str  # "full", "lora-r<rank>", "lisa-<policy>"
    lr: float
    seed: int = 0
    n_active: int = 2
    interval: int = 10
    sampling: str = "uniform"  # LisaConfig.sampling
    layer_weights: str | None = None  # None, "auto" or "outlier"
    granularity: str = "layer"  # LisaConfig.granularity
    embedding_state_dtype: str | None = None  # LisaConfig.embedding_state_dtype
    state_dtype: str | None = None  # FusedAdamW's state_dtype for every group (the embedding's and head's too)

    @property
    def label(self) -> str:
        if not self.method.startswith("lisa"):
            return self.method
        extra = [] if self.layer_weights is None else [f"weights={self.layer_weights}"]
        if self.granularity != "layer":
            extra.append(f"{self.granularity}-wise")
        if self.sampling != "uniform":
            extra.append(self.sampling)
        if self.embedding_state_dtype is not None:
            extra.append(f"embedding/head moments {self.embedding_state_dtype}")
        if self.state_dtype is not None:
            extra.append(f"all moments {self.state_dtype}")
        return f"{self.method} γ={self.n_active} K={self.interval}" + "".join(f" {e}" for e in extra)


def setup(run: Run, model):
    """-> (model, optimizer, controller or None), as a user of each method would build them."""
    if run.method == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.0), None
    if run.method.startswith("lora-r"):
        from peft import LoraConfig, get_peft_model

        rank = int(run.method.removeprefix("lora-r"))
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                 target_modules="all-linear", bias="none"))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr,
                                        weight_decay=0.0), None
    from lisa_trainer import LisaConfig, LisaController, build_optimizer

    cfg = LisaConfig(n_active_layers=run.n_active, interval_steps=run.interval, seed=run.seed,
                     state_policy=run.method.removeprefix("lisa-"), sampling=run.sampling,
                     layer_weights=run.layer_weights, embedding_state_dtype=run.embedding_state_dtype,
                     granularity=run.granularity)
    lean = {"state_dtype": getattr(torch, run.state_dtype)} if run.state_dtype else {}
    optimizer = build_optimizer(model, cfg, lr=run.lr, weight_decay=0.0, **lean)
    return model, optimizer, LisaController(model, optimizer, cfg)


@torch.no_grad()
def held_out_loss(model, examples, pad_id: int, device: torch.device, batch: int = 64) -> float:
    """Mean loss per answer token over the held-out questions."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch):
        b = {k: v.to(device) for k, v in collate(examples[i:i + batch], pad_id).items()}
        n = int((b["labels"][:, 1:] != -100).sum())
        total += model(**b).loss.item() * n
        count += n
    model.train()
    return total / count


def finetune(run: Run, size: Size, weights: dict, task: dict, tokenizer, device: torch.device) -> dict:
    model = build_model(size, tokenizer)
    model.load_state_dict(weights)
    model.to(device).train()
    model, optimizer, controller = setup(run, model)
    pad = tokenizer.pad_token_id
    order = torch.randperm(len(task["train"]), generator=torch.Generator().manual_seed(run.seed)).tolist()
    per_epoch = len(order) // size.ft_batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started, state_peak = time.perf_counter(), 0
    for step in range(size.ft_steps):
        if step and step % per_epoch == 0:  # a new epoch: a new order, still a function of the seed alone
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(run.seed * 1000 + step)).tolist()
        at = (step % per_epoch) * size.ft_batch
        batch = {k: v.to(device) for k, v in collate([task["train"][i] for i in order[at:at + size.ft_batch]],
                                                       pad).items()}
        if controller is not None:
            controller.on_step_begin(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, run.lr, size.ft_steps, size.warmup)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        state_peak = max(state_peak, device_state_bytes(model, optimizer, device))
        optimizer.zero_grad(set_to_none=True)
        if controller is not None:
            controller.on_step_end(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    result = {**asdict(run), "label": run.label, "eval_loss": held_out_loss(model, task["eval"], pad, device),
              "train_seconds": seconds, "device_state_mb": state_peak / 2**20,
              "peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    if controller is not None:
        result["layer_periods"] = [sum(i in e["layers"] for e in controller.period_log)
                                   for i in range(controller.n_layers)]
    return result


# ----------------------------------------------------------------------------------------------------------------
# The study


def method_grid(size: Size) -> list[Run]:
    runs = [Run("full", lr) for lr in size.lrs["full"]]
    runs += [Run(f"lora-r{r}", lr) for r in size.lora_ranks for lr in size.lrs["lora"]]
    runs += [Run(f"lisa-{policy}", lr, n_active=size.n_active, interval=size.interval)
             for policy in ("park", "reset", "keep") for lr in size.lrs["lisa"]]
    return runs


def sampling_grid(size: Size, lr: float) -> list[Run]:
    base = Run("lisa-park", lr, n_active=size.n_active, interval=size.interval)
    options = [base, replace(base, sampling="balanced"), replace(base, layer_weights="auto")]
    options += [replace(base, n_active=g, interval=k) for g, k in size.variants]
    return [replace(o, seed=s) for o in options for s in size.seeds]


def best_per_method(results: list[dict]) -> list[dict]:
    best = {}
    for r in results:
        if r["method"] not in best or r["eval_loss"] < best[r["method"]]["eval_loss"]:
            best[r["method"]] = r
    return list(best.values())


def over_seeds(results: list[dict]) -> list[dict]:
    """Mean, spread and per-seed losses of each sampling option, with the per-seed difference to uniform."""
    by_label: dict[str, list[dict]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    baseline = {r["seed"]: r["eval_loss"] for r in next(iter(by_label.values()))}
    rows = []
    for label, rs in by_label.items():
        losses = [r["eval_loss"] for r in sorted(rs, key=lambda r: r["seed"])]
        deltas = [r["eval_loss"] - baseline[r["seed"]] for r in rs if r["seed"] in baseline]
        spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        rows.append({"option": label, "mean_loss": statistics.fmean(losses),
                     "std_loss": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                     "min_loss": min(losses), "max_loss": max(losses),
                     "mean_vs_uniform": statistics.fmean(deltas), "std_vs_uniform": spread,
                     "vs_uniform": deltas, "wins_vs_uniform": sum(d < 0 for d in deltas),
                     # The rule for changing a default: better than uniform by more than twice the paired spread.
                     "beats_uniform": statistics.fmean(deltas) < -2 * spread,
                     "seeds": len(losses), "losses": losses,
                     "mean_train_s": statistics.fmean(r["train_seconds"] for r in rs),
                     "max_device_state_mb": max(r["device_state_mb"] for r in rs)})
    return rows


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    best = payload["best_per_method"]
    names = [r["method"] for r in best]
    axes[0].barh(names, [r["eval_loss"] for r in best], color="tab:blue")
    axes[0].set_xlim(min(r["eval_loss"] for r in best) * 0.95, max(r["eval_loss"] for r in best) * 1.02)
    axes[0].set_xlabel("held-out loss (best learning rate)")
    axes[0].invert_yaxis()
    rows = payload["sampling"]
    for y, row in enumerate(rows):
        axes[1].plot(row["losses"], [y] * len(row["losses"]), "o", color="tab:gray", alpha=0.6)
        axes[1].plot([row["mean_loss"]], [y], "D", color="tab:red")
    axes[1].set_yticks(range(len(rows)), [r["option"] for r in rows])
    axes[1].set_xlabel(f"held-out loss, {len(rows[0]['losses'])} seeds (red: mean)")
    axes[1].invert_yaxis()
    fig.suptitle(f"{payload['environment']['device']}: {payload['config']['model_params'] / 1e6:.1f}M-parameter "
                 f"Llama, {payload['config']['ft_steps']} fine-tuning steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="full",
                   help="full: the 0.4M-parameter model on the top-level modules; large: the 1.5M-parameter one "
                        "with the modules inside packages too (the sampling study's); quick: as --quick")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds): a smoke test")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"pretrained weights cache (default {DEFAULT_CACHE})")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    # One thread: on a busy 2-core machine a step of this model took 0.57 s with one thread and 6.6 s with two.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--study", choices=("methods", "moment-dtype", "sampling"), default="methods",
                   help="methods: the full study; moment-dtype: LISA park with fp32 moments, bf16 moments for the "
                        "embedding and head only, and bf16 moments everywhere, over the seeds, at --lr; sampling: "
                        "LISA park with uniform, auto and outlier layer weights and module-wise sampling, over "
                        "--seeds seeds, at --lr")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate of the moment-dtype and sampling studies (default 1e-3: LISA park's best in "
                        "the methods study)")
    p.add_argument("--seeds", type=int, default=5, help="seeds of the sampling study (default 5)")
    p.add_argument("--ft-steps", type=int, default=None,
                   help="fine-tuning steps of each run (default: the size's, 80 full, 240 large)")
    args = p.parse_args(argv)
    if args.quick:
        args.size = "quick"
    return args


def result_name(study: str, args) -> str:
    """`quality[-<study>][-<size>][-<steps>steps]`: each size and step count its own file, the defaults' names
    short; the smoke test writes one file whatever its steps."""
    size = "" if args.size == "full" else f"-{args.size}"
    steps = "" if args.ft_steps is None or args.quick else f"-{args.ft_steps}steps"
    return f"quality{study}{size}{steps}"


MOMENT_DTYPES = {"fp32": {"embedding_state_dtype": "float32"},
                 "bf16 embedding/head": {"embedding_state_dtype": "bfloat16"},
                 "bf16 everywhere": {"state_dtype": "bfloat16"}}


def moment_dtype_study(args, size: Size, execute, device: torch.device, described: dict) -> None:
    """LISA park with fp32 moments, bf16 moments for the embedding and head (decoder layers fp32) and bf16 moments
    for every tensor, seed by seed."""
    runs = [Run("lisa-park", args.lr, n_active=size.n_active, interval=size.interval, seed=seed, **dtypes)
            for dtypes in MOMENT_DTYPES.values() for seed in size.seeds]
    started = time.perf_counter()
    results = execute(runs)
    payload = {**described, "config": {**described["config"], "lr": args.lr}, "runs": results,
               "summary": over_seeds(results), "total_seconds": time.perf_counter() - started}
    path = write_results(result_name("-moment-dtype", args), payload, device, results_dir=args.results_dir)
    print_table([{"option": r["option"], "mean loss": r["mean_loss"], "std": r["std_loss"],
                  "vs fp32": r["mean_vs_uniform"], "lower than fp32": f"{r['wins_vs_uniform']}/{r['seeds']}",
                  "train s": r["mean_train_s"]} for r in json.loads(path.read_text())["summary"]],
                title=f"Moment dtype, LISA park, lr {args.lr:.0e}, seeds {list(size.seeds)}")
    print(f"results: {path}")


SAMPLING_RULES = {"uniform": {}, "auto": {"layer_weights": "auto"}, "outlier": {"layer_weights": "outlier"},
                  "module": {"granularity": "module"}}


def sampling_study(args, size: Size, execute, device: torch.device, described: dict) -> None:
    """LISA park with each sampling rule, seed by seed: uniform layers, `auto` and `outlier` layer weights, and
    module-wise sampling with the budget of γ whole layers; mean ± std, and the per-seed differences to uniform."""
    seeds = range(1 if args.quick else args.seeds)
    runs = [Run("lisa-park", args.lr, n_active=size.n_active, interval=size.interval, seed=seed, **rule)
            for rule in SAMPLING_RULES.values() for seed in seeds]
    started = time.perf_counter()
    results = execute(runs)
    payload = {**described, "config": {**described["config"], "lr": args.lr, "seeds": list(seeds)},
               "runs": results, "summary": over_seeds(results), "total_seconds": time.perf_counter() - started}
    path = write_results(result_name("-sampling", args), payload, device, results_dir=args.results_dir)
    print_table([{"option": r["option"], "mean loss": r["mean_loss"], "std": r["std_loss"],
                  "vs uniform": r["mean_vs_uniform"], "paired std": r["std_vs_uniform"],
                  "beats uniform": r["beats_uniform"], "lower than uniform": f"{r['wins_vs_uniform']}/{r['seeds']}",
                  "device state MB": r["max_device_state_mb"], "train s": r["mean_train_s"]}
                 for r in json.loads(path.read_text())["summary"]],
                title=f"Sampling rules, LISA park, lr {args.lr:.0e}, {size.ft_steps} steps, seeds {list(seeds)}")
    print(f"results: {path}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    from lisa_trainer.demo import build_demo_tokenizer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = SIZES[args.size]
    if args.ft_steps is not None:
        size = replace(size, ft_steps=args.ft_steps)
    tokenizer = build_demo_tokenizer()
    task = build_task(tokenizer, size.block, size.corpus_modules, size.packages)
    weights, pretraining = pretrain(size, tokenizer, task, args.cache)
    where = "from" if pretraining["from_cache"] else f"{pretraining['seconds']:.0f} s, saved to"
    print(f"pretrained: {pretraining['params'] / 1e6:.2f}M parameters, final loss {pretraining['final_loss']:.3f} "
          f"({where} {pretraining['cache']})", flush=True)

    def execute(runs):
        out = []
        for run in runs:
            r = finetune(run, size, weights, task, tokenizer, device)
            print(f"  {r['label']:<32} lr {r['lr']:.0e} seed {r['seed']}: held-out {r['eval_loss']:.4f} "
                  f"({r['train_seconds']:.1f} s)", flush=True)
            out.append(r)
        return out

    # What every study's results file says of the model and task it ran on.
    described = {"config": {**asdict(size), "size": args.size, "model_params": pretraining["params"],
                            "train_examples": len(task["train"]), "eval_examples": len(task["eval"]),
                            "modules": task["modules"]},
                 "pretraining": pretraining}
    if args.study == "moment-dtype":
        moment_dtype_study(args, size, execute, device, described)
        return {}
    if args.study == "sampling":
        sampling_study(args, size, execute, device, described)
        return {}
    started = time.perf_counter()
    methods = execute(method_grid(size))
    best = best_per_method(methods)
    park_lr = next(r["lr"] for r in best if r["method"] == "lisa-park")
    # Seed 0 of uniform park at that lr is already in the method grid.
    known = {(r["label"], r["lr"], r["seed"]): r for r in methods}
    sampling_runs = sampling_grid(size, park_lr)
    sampling = [known.get((run.label, run.lr, run.seed)) or execute([run])[0] for run in sampling_runs]

    payload = {
        **described,
        "config": {**described["config"], "sampling_lr": park_lr},
        "methods": methods,
        "best_per_method": best,
        "sampling_runs": sampling,
        "sampling": over_seeds(sampling),
        "total_seconds": time.perf_counter() - started + (0 if pretraining["from_cache"] else pretraining["seconds"]),
    }
    name = result_name("", args)
    path = write_results(name, payload, device, results_dir=args.results_dir)
    payload = json.loads(path.read_text())
    print_table([{"method": r["method"], "best lr": r["lr"], "held-out loss": r["eval_loss"],
                  "train s": r["train_seconds"], "device state MB": r["device_state_mb"],
                  "peak alloc MB": r["peak_allocated_mb"]} for r in best],
                title=f"Best learning rate per method ({size.ft_steps} steps, seed 0)")
    print_table([{"sampling (lr %.0e)" % park_lr: r["option"], "mean loss": r["mean_loss"], "std": r["std_loss"],
                  "vs uniform": r["mean_vs_uniform"], "wins": f"{r['wins_vs_uniform']}/{r['seeds']}",
                  "train s": r["mean_train_s"]} for r in payload["sampling"]],
                title=f"LISA sampling over seeds {list(size.seeds)}")
    print(f"results: {path}")
    if not args.no_plot:
        png = results_path(name, device, ".png", results_dir=args.results_dir)
        plot(payload, png)
        print(f"plot: {png}")
    return payload


if __name__ == "__main__":
    main()
