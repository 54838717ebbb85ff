"""Every fenced code block of README.md and of docs/*.md runs here: a block added to one of them is covered by a rule
below, or this fails with "README.md block N (line L) is not covered" (or "docs/cli.md block N ...").

Shell commands run as written, in a fresh folder where the example paths exist (a tiny local Llama at
`path/to/local/model`, the shipped sample data at `data/my_dataset/`), with the flags of SHORT_RUN or
BENCHMARK_SIZES appended so that each finishes in seconds; a `...` in a command stands for a value (after a flag)
or for the model, data and output flags (alone). Python snippets run with a tiny model and small tensors in place
of the names they take from the text around them (`model`, `batch`, `args`, ...), and their results are checked
against what the text says of them. What a CPU cannot run is run as close as it can be: 8 GPUs become 2 gloo
ranks, a second node is checked by torchrun's own parser, and the GPU suite's refusal is checked.

One harness, one file (~560 lines): the rules are looked up by every block, and a rule no block uses fails here.
"""

import dataclasses
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lisa_trainer.cli import main, parse_options
from lisa_trainer.demo import build_demo_model, build_demo_tokenizer, demo_dataset_path
from lisa_trainer.runlog import read_log
from ranks import free_port
from tiny_model import TINY, save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]  # every file whose blocks run here

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")

# Where the example paths of README.md and docs/*.md point, inside each command's folder.
EXAMPLE_PATHS = {"path/to/local/model": "model", "data/my_dataset": "data"}
# Appended to every lisa-finetune command (the last occurrence of a flag wins).
SHORT_RUN = ["--max_steps", "2", "--disable_tqdm"]
# What `...` stands for: after one of these flags, its value; alone, the flags of a whole run.
PLACEHOLDER_VALUES = {"--model_name_or_path": "path/to/local/model", "--dataset_path": "data/my_dataset/",
                      "--output_model_path": "output_models/my_model", "--output_dir": "output_models/my_model"}
RUN_FLAGS = ["--model_name_or_path", "path/to/local/model", "--dataset_path", "data/my_dataset/", "--output_dir",
             "output_models/my_model"]
RANKS = 2  # --nproc_per_node 8 / --num_processes 8 here: 2 gloo ranks on the CPU, whatever GPUs there are
LAUNCHED_ON_CPU = ["--device", "cpu"]
# Appended to each benchmark command: the smallest sizes that still run every part of it.
BENCHMARK_SIZES = {
    "benchmarks.bench_adamw": ["--repeats", "1", "--small-tensors", "20"],
    "benchmarks.bench_offload": ["--layer-params", "1e5", "--step-ms", "1", "--repeats", "1"],
    "benchmarks.bench_finetune": ["--steps", "2", "--warmup", "0", "--interval", "1", "--isolate", "no", "--no-plot"],
    "benchmarks.bench_memory": ["--shapes", "tiny", "--periods", "2", "--no-plot"],
    "benchmarks.bench_quality": ["--quick", "--no-plot"],  # and --cache in the test's folder
    "benchmarks.bench_linear_cross_entropy": ["--tokens", "64", "--vocab", "512", "--repeats", "1"],
}


# ------------------------------------------------------------------------------------------------ the blocks


@dataclass
class Block:
    document: str  # the file, relative to the repository root
    number: int  # counted within the file
    line: int
    lang: str
    code: str

    def __str__(self) -> str:
        return f"{self.document} block {self.number} (line {self.line}, {self.lang or 'no language'})"


def document_blocks(path: Path) -> list[Block]:
    """Every fenced block of one file, indented ones (inside a list item) included, dedented."""
    document = path.relative_to(ROOT).as_posix()
    lines, blocks, i = path.read_text(encoding="utf-8").splitlines(), [], 0
    while i < len(lines):
        opening = re.fullmatch(r"\s*```(\S*)\s*", lines[i])
        if opening:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            code = textwrap.dedent("\n".join(lines[i + 1:end]))
            blocks.append(Block(document, len(blocks) + 1, i + 1, opening.group(1), code))
            i = end
        i += 1
    return blocks


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continued lines joined, comments dropped, `a && b` split."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return commands


def run_statements(block: Block, namespace: dict):
    """Execute a Python block one top-level statement at a time, yielding each statement's source after it ran."""
    import ast

    for node in ast.parse(block.code).body:
        source = ast.get_source_segment(block.code, node)
        module = ast.Module(body=[node], type_ignores=[])
        exec(compile(module, f"<{block}>", "exec"), namespace)
        yield source


def run_block(block: Block, namespace: dict) -> dict:
    for _ in run_statements(block, namespace):
        pass
    return namespace


BLOCKS = [block for path in DOCUMENTS for block in document_blocks(path)]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny model (saved with its tokenizer) and the shipped sample data, shared by every command's folder."""
    root = tmp_path_factory.mktemp("readme-inputs")
    save_tiny_model(root / "model")
    shutil.copytree(demo_dataset_path(), root / "data")
    return root


@dataclass
class Command:
    block: Block
    words: list[str]
    earlier: list[list[str]]  # the block's commands before this one
    folder: Path  # a fresh folder holding the example paths; commands run there

    def __str__(self) -> str:
        return f"{self.block}: {shlex.join(self.words)}"


def command_folder(tmp_path: Path, inputs: Path, index: int) -> Path:
    folder = tmp_path / f"command-{index}"
    for example, target in EXAMPLE_PATHS.items():
        (folder / example).parent.mkdir(parents=True, exist_ok=True)
        (folder / example).symlink_to(inputs / target, target_is_directory=True)
    return folder


def tiny_model(seed: int = 0):
    return build_demo_model(build_demo_tokenizer(), seed=seed, **TINY)


def tiny_batch(vocab: int = 259, n: int = 2, length: int = 12) -> dict:
    ids = torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell runs it
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python_api"), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return env


# --------------------------------------------------------------------------------------- shell command rules


def expand_placeholders(argv: list[str]) -> list[str]:
    out = []
    for i, word in enumerate(argv):
        if word != "...":
            out.append(word)
        elif i and argv[i - 1] in PLACEHOLDER_VALUES:
            out.append(PLACEHOLDER_VALUES[argv[i - 1]])
        else:
            out += RUN_FLAGS
    return out


def flag_values(argv: list[str]) -> dict[str, str | None]:
    """``--flag value`` pairs; a flag followed by another flag (or nothing) is a bare boolean: None."""
    values, i = {}, 0
    while i < len(argv):
        assert argv[i].startswith("--"), argv[i]
        has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        values[argv[i][2:]] = argv[i + 1] if has_value else None
        i += 2 if has_value else 1
    return values


def write_config_files(folder: Path, name: str, options: dict[str, str | None]) -> None:
    """``name`` (YAML, as a user writes it by hand) and its JSON twin, holding ``options``."""
    (folder / name).write_text("".join(f"{k}: {'true' if v is None else v}\n" for k, v in options.items()))

    def typed(v):
        if v is None:
            return True
        try:
            return json.loads(v)
        except ValueError:
            return v

    (folder / Path(name).with_suffix(".json")).write_text(json.dumps({k: typed(v) for k, v in options.items()}))


def without_config_path(opts):
    """The options without where they came from (the file's path and which keys it held)."""
    return dataclasses.replace(opts, run=dataclasses.replace(opts.run, config=None), config_keys={})


def run_lisa_finetune(cmd: Command, monkeypatch) -> None:
    argv = cmd.words[1:]
    monkeypatch.chdir(cmd.folder)
    if "--config" in argv:
        # "the same options from a file; flags override it": the file holds the block's previous command's options
        config = argv[argv.index("--config") + 1]
        previous = [c for c in cmd.earlier if c[0] == "lisa-finetune"]
        assert previous, f"{cmd}: no lisa-finetune command before it in the block to take the options from"
        write_config_files(cmd.folder, config, flag_values(previous[-1][1:]))
        overrides = [w for i, w in enumerate(argv) if w != "--config" and (i == 0 or argv[i - 1] != "--config")]
        from_flags = parse_options([*previous[-1][1:], *overrides, *SHORT_RUN])
        for file in (config, str(Path(config).with_suffix(".json"))):
            from_file = parse_options(["--config", file, *overrides, *SHORT_RUN])
            assert without_config_path(from_file) == from_flags, f"{cmd}: {file} gives other options than the flags"
    opts = parse_options([*argv, *SHORT_RUN])
    assert main([*argv, *SHORT_RUN]) == 0, cmd
    # What the README says the run leaves: the model, the log with its summary, the plot.
    assert (opts.out_model / "model.safetensors").is_file(), cmd
    records = read_log(opts.out_dir / "train_log.jsonl")
    assert records[-1]["kind"] == "summary" and records[-1]["steps"] == 2, cmd
    assert (opts.out_dir / "lisa_run.png").is_file(), cmd


def lisa_finetune_argv(cmd: Command, words: list[str]) -> list[str]:
    """The lisa-finetune flags of a launcher command (after ``-m lisa_trainer.cli``), placeholders filled in."""
    module = words.index("-m")
    assert words[module + 1] == "lisa_trainer.cli", cmd
    return expand_placeholders(words[module + 2:])


def launched_run_is_data_parallel(cmd: Command, launcher: list[str], argv: list[str]) -> None:
    done = subprocess.run([*launcher, "-m", "lisa_trainer.cli", *argv, *SHORT_RUN, *LAUNCHED_ON_CPU], cwd=cmd.folder,
                          env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    opts = parse_options([*argv, *SHORT_RUN])
    records = read_log(cmd.folder / opts.out_dir / "train_log.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    communicated = "reduce_scatter_bytes" if opts.training.fsdp else "allreduce_bytes"
    assert len(steps) == 2 and all(r["world_size"] == RANKS and r[communicated] > 0 for r in steps), cmd
    assert [r["kind"] for r in records].count("summary") == 1, cmd
    assert (cmd.folder / opts.out_model / "model.safetensors").is_file(), cmd


def run_torchrun(cmd: Command, monkeypatch) -> None:
    from torch.distributed.run import parse_args

    launcher = parse_args(cmd.words[1:])  # torchrun's own parser
    assert launcher.module and launcher.training_script == "lisa_trainer.cli", cmd
    argv = lisa_finetune_argv(cmd, cmd.words)
    parse_options(argv)  # the flags are lisa-finetune's
    node_flags = cmd.words[1:cmd.words.index("-m")]
    if launcher.nnodes.split(":")[-1] != "1":  # N or MIN:MAX
        # Several nodes cannot run here: the launcher's reading of the node flags is what can be checked.
        values = flag_values(node_flags)
        assert launcher.nnodes == values["nnodes"] and launcher.node_rank == int(values["node_rank"]), cmd
        assert launcher.master_addr == values["master_addr"] and launcher.master_port == int(values["master_port"])
        return
    node_flags[node_flags.index("--nproc_per_node") + 1] = str(RANKS)
    launched_run_is_data_parallel(
        cmd, [sys.executable, "-m", "torch.distributed.run", *node_flags, "--master_port", str(free_port())], argv)


def run_accelerate_launch(cmd: Command, monkeypatch) -> None:
    node_flags = cmd.words[2:cmd.words.index("-m")]
    node_flags[node_flags.index("--num_processes") + 1] = str(RANKS)
    # With several GPUs accelerate turns --multi_gpu on by itself; without any it would start one process, so it is
    # asked for here: accelerate then starts the ranks through torchrun, as it does on GPUs.
    launcher = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *node_flags, "--multi_gpu",
                "--main_process_port", str(free_port())]
    launched_run_is_data_parallel(cmd, launcher, lisa_finetune_argv(cmd, cmd.words))


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser
        from pip._vendor import tomli as tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def check_pip_install(cmd: Command, monkeypatch) -> None:
    """Installing is not done here (the suite runs from an installed tree): the target's project must exist, with
    the extras named, the Python version the Quickstart names, and the lisa-finetune script these tests run."""
    target = re.fullmatch(r"\.(?:\[(\w+)\])?", cmd.words[cmd.words.index("-e") + 1])
    assert target, f"{cmd}: an editable install of the repository root is what is checked"
    project = pyproject()["project"]
    if target.group(1):
        assert target.group(1) in project["optional-dependencies"], cmd
    assert project["requires-python"] == ">=3.10" and "Python 3.10 or newer" in README.read_text()
    module, function = project["scripts"]["lisa-finetune"].split(":")
    assert getattr(__import__(module, fromlist=[function]), function) is main


def check_pytest(cmd: Command, monkeypatch) -> None:
    """This suite is what the command runs, and it cannot run itself: the command must find it (the configured test
    folder is this file's) with pytest from the test extra."""
    config = pyproject()
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == [Path(__file__).parent.name]
    assert any(r.startswith("pytest") for r in config["project"]["optional-dependencies"]["test"])


def run_benchmark(cmd: Command, monkeypatch) -> None:
    module = cmd.words[2]
    assert module in BENCHMARK_SIZES, f"{cmd}: no size for {module} in BENCHMARK_SIZES"
    results = cmd.folder / "results"
    monkeypatch.setenv("LISA_BENCH_RESULTS", str(results))
    extra = ["--cache", str(cmd.folder / "cache")] if module == "benchmarks.bench_quality" else []
    monkeypatch.setattr(sys, "argv", [module, *cmd.words[3:], *BENCHMARK_SIZES[module], *extra])
    monkeypatch.chdir(ROOT)  # "Run them from the repository root" (docs/performance.md)
    with warnings.catch_warnings():  # another test may have imported the module: runpy says it runs it again
        warnings.filterwarnings("ignore", "'benchmarks.* found in sys.modules", RuntimeWarning)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            assert e.code in (0, None), f"{cmd}: exit status {e.code}"
    assert list(results.glob("*.json")), f"{cmd}: no results JSON written"


def check_gpu_suite(cmd: Command, monkeypatch) -> None:
    """Without a GPU the suite refuses, saying why; on a GPU, a zero time budget checks its arguments and summary
    without running the steps (the whole suite takes minutes)."""
    words = [str(cmd.folder / "DIR") if w == "DIR" else w for w in cmd.words]
    env = dict(subprocess_env(), PYTHON=sys.executable, SUITE_BUDGET_S="0",
               LISA_BENCH_RESULTS=str(cmd.folder / "results"))
    done = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if torch.cuda.is_available():
        assert done.returncode == 1 and "skipped: budget" in done.stdout, f"{cmd}\n{done.stdout[-2000:]}"
    else:
        assert done.returncode == 2, f"{cmd}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        assert "torch sees no CUDA device; this suite is for GPU machines" in done.stdout, done.stdout


SHELL_RULES = [  # (the command's first words, rule): the first that matches applies
    (("lisa-finetune",), run_lisa_finetune),
    (("torchrun",), run_torchrun),
    (("accelerate", "launch"), run_accelerate_launch),
    (("pip", "install", "-e"), check_pip_install),
    (("python", "-m", "pytest"), check_pytest),
    (("python", "-m"), run_benchmark),
    (("bash", "benchmarks/gpu_suite.sh"), check_gpu_suite),
]


# ---------------------------------------------------------------------------------------------- Python rules


def changed_layers(model, before: dict) -> set[int]:
    return {int(n.split(".")[2]) for n, p in model.named_parameters()
            if n.startswith("model.layers.") and not torch.equal(p, before[n])}


def controller_loop(block: Block, tmp_path: Path) -> None:
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ns = run_block(block, dict(model=model, batch=tiny_batch(), max_steps=2))
    active = set(ns["controller"].active_layers)
    assert len(active) == 2 and changed_layers(model, before) == active
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 8):
        self.ids = tiny_batch(n=n)["input_ids"]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_context(tmp_path: Path) -> dict:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, seed=0)
    return dict(Trainer=Trainer, model=tiny_model(), args=args, ds=TokenDataset())


def trainer_with_callback(block: Block, tmp_path: Path) -> None:
    ns = run_block(block, trainer_context(tmp_path))
    assert ns["trainer"].state.global_step == 2
    controller = ns["lisa"].controller
    assert len(controller.active_layers) == 2 and controller.config.state_policy == "park"


def trainer_with_fused_adamw(block: Block, tmp_path: Path) -> None:
    from lisa_kernels import FusedAdamW
    from lisa_trainer import LisaCallback

    # The import and the callback of the README's two lines, which docs/huggingface-trainer.md builds on: this block
    # replaces their Trainer line.
    ns = run_block(block, dict(trainer_context(tmp_path), LisaCallback=LisaCallback,
                               lisa=LisaCallback(n_active_layers=2, interval_steps=20)))
    ns["trainer"].train()
    optimizer = ns["trainer"].optimizer
    assert isinstance(getattr(optimizer, "optimizer", optimizer), FusedAdamW)  # accelerate wraps it
    assert ns["trainer"].state.global_step == 2


def chunked_loss(block: Block, tmp_path: Path) -> None:
    model = tiny_model()
    batch = tiny_batch()
    g = torch.Generator().manual_seed(1)
    given = dict(model=model, ids=batch["input_ids"], mask=batch["attention_mask"], labels=batch["labels"],
                 hidden2d=torch.randn(10, 16, generator=g), weight=torch.randn(40, 16, generator=g),
                 targets=torch.randint(0, 40, (10,), generator=g), bias=torch.randn(40, generator=g))
    ns = dict(given)
    for statement in run_statements(block, ns):
        if "causal_lm_cross_entropy(" in statement:  # "= model(..., labels=labels).loss"
            expected = model(input_ids=given["ids"], attention_mask=given["mask"], labels=given["labels"]).loss
            torch.testing.assert_close(ns["loss"], expected)
        elif "linear_cross_entropy(" in statement:
            logits = given["hidden2d"] @ given["weight"].T + given["bias"]
            torch.testing.assert_close(ns["loss"], F.cross_entropy(logits, given["targets"], reduction="sum"))


def twin_losses(*models) -> None:
    batch = tiny_batch()
    for m in models:
        m(**batch).loss.backward()


def fused_adamw(block: Block, tmp_path: Path) -> None:
    model, twin = tiny_model(), tiny_model()
    ns = run_block(block, dict(model=model))
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-4, weight_decay=0.01)  # "same signature"
    twin_losses(model, twin)
    ns["optimizer"].step()
    reference.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def step_in_backward(block: Block, tmp_path: Path) -> None:
    from lisa_kernels import FusedAdamW, StepInBackward

    model, twin = tiny_model(), tiny_model()
    optimizer = FusedAdamW(model.parameters(), lr=1e-3)
    ns = run_block(block, dict(StepInBackward=StepInBackward, optimizer=optimizer, loss=model(**tiny_batch()).loss))
    assert ns["stepping"].finite and all(p.grad is None for p in model.parameters())
    plain = FusedAdamW(twin.parameters(), lr=1e-3)
    twin_losses(twin)
    plain.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))  # "bit for bit"


def functional_adamw(block: Block, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    grads = [torch.randn_like(p) for p in params]
    given = dict(params=[p.clone() for p in params], grads=grads, exp_avgs=[torch.zeros_like(p) for p in params],
                 exp_avg_sqs=[torch.zeros_like(p) for p in params], steps=[torch.tensor(0.0) for _ in params])
    run_block(block, given)
    reference = [p.clone().requires_grad_() for p in params]
    for p, grad in zip(reference, grads):
        p.grad = grad
    torch.optim.AdamW(reference, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01).step()
    assert all(float(s) == 1 for s in given["steps"])
    for p, q in zip(given["params"], reference):
        torch.testing.assert_close(p, q.detach())


def host_state_bank(block: Block, tmp_path: Path) -> None:
    from lisa_kernels import ParkedState

    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # "any torch.optim optimizer"
    twin_losses(model)
    optimizer.step()
    layers = model.model.layers
    frozen, other = list(layers[0].parameters()), list(layers[1].parameters())
    saved = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in frozen}
    ns = dict(optimizer=optimizer, frozen_params=frozen, next_params=frozen, params=other)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without CUDA there is no pinned memory: one warning, pageable memory
        for statement in run_statements(block, ns):
            if statement.startswith("parker.park("):
                # every state tensor but the scalar step ("`step` stays")
                assert all(isinstance(optimizer.state[p][k], ParkedState) for p in frozen for k, v in saved[p].items()
                           if v.dim())
            elif statement.startswith("parker.unpark("):
                for p in frozen:
                    assert all(torch.equal(optimizer.state[p][k], v) for k, v in saved[p].items())
            elif statement.startswith("parker.drop("):
                assert all(not optimizer.state.get(p) for p in other)


PYTHON_RULES = {  # a piece of the block's code that tells it apart: its rule
    "controller = LisaController(model, optimizer, cfg)": controller_loop,
    "lisa = LisaCallback(": trainer_with_callback,
    "optimizers=(LisaCallback.optimizer_for(model, args), None)": trainer_with_fused_adamw,
    "causal_lm_cross_entropy(hidden": chunked_loss,
    "optimizer = FusedAdamW(model.parameters()": fused_adamw,
    "with StepInBackward(optimizer) as stepping:": step_in_backward,
    "fused_adamw_(params, grads": functional_adamw,
    "parker = StateParker(optimizer, bank)": host_state_bank,
}


# ------------------------------------------------------------------------------------------------ the tests


def python_rules_of(block: Block) -> list:
    return [rule for marker, rule in PYTHON_RULES.items() if marker in block.code]


def shell_rule_of(words: list[str]):
    return next((rule for prefix, rule in SHELL_RULES if tuple(words[:len(prefix)]) == prefix), None)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{Path(b.document).stem}-block{b.number}-line{b.line}")
def test_readme_block_runs(block, inputs, tmp_path, monkeypatch):
    if block.lang == "python":
        rules = python_rules_of(block)
        assert len(rules) == 1, f"{block} is not covered: {len(rules)} rules of PYTHON_RULES match it, not 1"
        rules[0](block, tmp_path)
    elif block.lang == "bash":
        commands = shell_commands(block.code)
        for i, words in enumerate(commands):
            rule = shell_rule_of(words)
            assert rule is not None, f"{block} is not covered: no rule in SHELL_RULES for {shlex.join(words)!r}"
            rule(Command(block, words, commands[:i], command_folder(tmp_path, inputs, i)), monkeypatch)
    else:
        pytest.fail(f"{block} is not covered: a block of language {block.lang!r} has no rules")


def test_every_python_rule_still_matches_a_block():
    """A rule whose block was edited away would silently test nothing."""
    for marker in PYTHON_RULES:
        assert any(marker in b.code for b in BLOCKS if b.lang == "python"), \
            f"no block of README.md or docs/*.md holds {marker!r}"
