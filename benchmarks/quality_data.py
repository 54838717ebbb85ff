"""The quality benchmark's data: the Python standard library's own source, split by module, and the questions about
it ("What does `module.name` do?" -> the first line of that function's or class's docstring).

A module's part (pretraining text, fine-tuning questions or held-out questions) depends on its name alone, so the
split is the same on every machine and Python version, and a module held out at one size stays held out at another.
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path

import torch


def stdlib_modules(packages: bool = False) -> dict[str, Path]:
    """Public modules of the running interpreter's standard library by dotted name: the top-level ones (`Lib/*.py`)
    and, with `packages`, those inside its packages too (`email.message`, `json` for `json/__init__.py`), leaving
    out tests and site-packages."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    if not packages:
        return {p.stem: p for p in sorted(lib.glob("*.py")) if not p.name.startswith("_")}
    modules = {}
    for path in sorted(lib.rglob("*.py")):
        parts = path.relative_to(lib).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and all(p.isidentifier() and not p.startswith(("_", "test_")) and p not in ("test", "tests",
                                                                                          "idle_test")
                         for p in parts):  # importable (no `config-3.11-...`), public, not a test suite
            modules[".".join(parts)] = path
    return modules


def _bucket(name: str) -> int:
    """0..9 from the module name alone, so the split is the same on every machine and Python version."""
    return hashlib.blake2b(name.encode(), digest_size=2).digest()[0] % 10


def split_modules(names) -> dict[str, list[str]]:
    """~70% of modules for pretraining; of the rest, 2/3 give fine-tuning questions, 1/3 held-out questions."""
    split = {"pretrain": [], "ft_train": [], "ft_eval": []}
    for name in sorted(names):
        b = _bucket(name)
        split["ft_train" if b < 2 else "ft_eval" if b == 2 else "pretrain"].append(name)
    return split


def docstring_pairs(module: str, path: Path) -> list[tuple[str, str]]:
    """("What does `module.Class.name` do?", first docstring line) for each public function and class."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    pairs = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            defines = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if defines and not child.name.startswith("_"):
                doc = ast.get_docstring(child)
                first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
                name = f"{prefix}.{child.name}"
                if len(first) >= 10:
                    pairs.append((f"What does `{name}` do?", first))
                if isinstance(child, ast.ClassDef):
                    visit(child, name)

    visit(tree, module)
    return pairs


def build_task(tokenizer, max_len: int, corpus_modules: int | None = None, packages: bool = False) -> dict:
    """Token ids: the pretraining corpus (one tensor) and the fine-tuning train / held-out examples."""
    modules = stdlib_modules(packages)
    split = split_modules(modules)
    corpus = [tokenizer(modules[m].read_text(encoding="utf-8", errors="replace"), add_special_tokens=False,
                        verbose=False)["input_ids"] for m in split["pretrain"][:corpus_modules]]
    eos = tokenizer.eos_token_id

    def examples(names):
        out = []
        for m in names:
            for question, answer in docstring_pairs(m, modules[m]):
                prompt = tokenizer(f"Q: {question}\nA: ", add_special_tokens=False)["input_ids"]
                prompt = [tokenizer.bos_token_id] + prompt
                reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
                ids = (prompt + reply)[:max_len]
                labels = ([-100] * len(prompt) + reply)[:max_len]
                out.append((torch.tensor(ids), torch.tensor(labels)))
        return out

    return {
        "corpus": torch.tensor([t for doc in corpus for t in doc + [eos]]),
        "train": examples(split["ft_train"]),
        "eval": examples(split["ft_eval"]),
        "modules": {k: len(v) for k, v in split.items()},
        "corpus_digest": hashlib.blake2b("".join(f"{m}:{modules[m].stat().st_size};"
                                                 for m in split["pretrain"][:corpus_modules])
                                         .encode(), digest_size=8).hexdigest(),
    }


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch; the padding is masked out of attention and of the loss."""
    width = max(len(ids) for ids, _ in examples)
    shape = (len(examples), width)
    batch = {"input_ids": torch.full(shape, pad_id), "labels": torch.full(shape, -100),
             "attention_mask": torch.zeros(shape, dtype=torch.long)}
    for row, (ids, labels) in enumerate(examples):
        batch["input_ids"][row, :len(ids)] = ids
        batch["labels"][row, :len(ids)] = labels
        batch["attention_mask"][row, :len(ids)] = 1
    return batch
