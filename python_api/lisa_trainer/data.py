"""LMFlow JSON datasets: loading with precise errors, tokenization with loss masks, packing and collation.

A dataset file is ``{"type": ..., "instances": [...]}`` with one of three types (LMFlow's formats):

- ``text_only``: ``{"text": str}``; every token is trained. Instances are joined with EOS and packed into blocks.
- ``text2text``: ``{"input": str, "output": str}``; only the output tokens (and the closing EOS) are trained.
- ``conversation``: ``{"messages": [{"role": str, "content": str}, ...], "system": str, "tools": list}`` (system
  and tools optional); only the assistant turns are trained, rendered by a conversation template (``templates.py``).

A path may be one file or a folder of ``*.json`` files (read in name order; the types may differ between files).
Anything malformed raises one ``ValueError`` that names the file, the instance index and every problem found,
rather than skipping data: a silently dropped instance is a bug nobody notices.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
import warnings
from pathlib import Path

import torch

from . import templates
from .templates import encode, trim_trailing_turns

IGNORE_INDEX = -100
DATASET_TYPES = ("text_only", "text2text", "conversation")
CONVERSATION_ROLES = ("system", "user", "assistant", "tool", "function", "observation")
_MAX_PROBLEMS_SHOWN = 20


@dataclass
class LMFlowDataset:
    """The instances of one or more LMFlow files, each remembered with the file it came from."""

    files: list[Path]
    types: list[str]  # one per file
    instances: list[list[dict]]  # one list per file

    def __len__(self) -> int:
        return sum(len(x) for x in self.instances)

    @property
    def type(self) -> str:
        """The dataset type when all files share one, else "mixed"."""
        kinds = set(self.types)
        return kinds.pop() if len(kinds) == 1 else "mixed"


@dataclass
class Example:
    """One tokenized training sequence: ``labels[i]`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    examples: list[Example]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


# ----------------------------------------------------------------------------------------------------- loading


def dataset_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".json" and p.is_file())
        if not files:
            raise ValueError(f"{path}: folder contains no .json dataset files")
        return files
    raise FileNotFoundError(f"{path}: no such dataset file or folder")


def _check_instance(kind: str, inst, where: str) -> list[str]:
    """Problems with one instance, each phrased for a user fixing the file."""
    if not isinstance(inst, dict):
        return [f"{where}: expected an object, got {type(inst).__name__}"]

    def need_str(obj: dict, key: str, at: str) -> list[str]:
        if key not in obj:
            return [f'{at}: missing field "{key}"']
        if not isinstance(obj[key], str):
            return [f'{at}: field "{key}" must be a string, got {type(obj[key]).__name__}']
        return []

    if kind == "text_only":
        return need_str(inst, "text", where)
    if kind == "text2text":
        return need_str(inst, "input", where) + need_str(inst, "output", where)
    # conversation
    problems = []
    if "system" in inst and inst["system"] is not None and not isinstance(inst["system"], str):
        problems.append(f'{where}: field "system" must be a string, got {type(inst["system"]).__name__}')
    if "tools" in inst and inst["tools"] is not None and not isinstance(inst["tools"], list):
        problems.append(f'{where}: field "tools" must be a list, got {type(inst["tools"]).__name__}')
    if "messages" not in inst:
        return problems + [f'{where}: missing field "messages"']
    messages = inst["messages"]
    if not isinstance(messages, list):
        return problems + [f'{where}: field "messages" must be a list, got {type(messages).__name__}']
    if not messages:
        return problems + [f'{where}: field "messages" is empty']
    for j, msg in enumerate(messages):
        at = f"{where}, message {j}"
        if not isinstance(msg, dict):
            problems.append(f"{at}: expected an object, got {type(msg).__name__}")
            continue
        role_problems = need_str(msg, "role", at)
        problems += role_problems + need_str(msg, "content", at)
        if not role_problems and msg["role"] not in CONVERSATION_ROLES:
            problems.append(f'{at}: unknown role "{msg["role"]}" (expected one of {", ".join(CONVERSATION_ROLES)})')
    return problems


def _load_file(path: Path) -> tuple[str, list[dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(doc, dict):
        raise ValueError(f'{path}: top level must be an object with "type" and "instances", got {type(doc).__name__}')
    if "type" not in doc:
        raise ValueError(f'{path}: missing "type" (one of {", ".join(DATASET_TYPES)})')
    kind = doc["type"]
    if kind not in DATASET_TYPES:
        raise ValueError(f'{path}: unknown dataset type {kind!r} (expected one of {", ".join(DATASET_TYPES)})')
    if "instances" not in doc:
        raise ValueError(f'{path}: missing "instances"')
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise ValueError(f'{path}: "instances" must be a list, got {type(instances).__name__}')
    if not instances:
        raise ValueError(f'{path}: "instances" is empty')
    problems = []
    for i, inst in enumerate(instances):
        problems += _check_instance(kind, inst, f"instance {i}")
    if problems:
        shown = problems[:_MAX_PROBLEMS_SHOWN]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise ValueError(f"{path}: {len(problems)} problem(s) in {kind} data:\n  " + "\n  ".join(shown) + more)
    return kind, instances


def load_lmflow_dataset(path: str | Path) -> LMFlowDataset:
    """Read and validate an LMFlow dataset file or folder; raises ``ValueError`` naming file, instance, problem.

    Instances whose trained text is empty or whitespace-only teach nothing but the end-of-text marker: they are
    left out with one warning per file, and a dataset with nothing else is refused."""
    files = dataset_files(path)
    types, instances, blanks = [], [], []
    for f in files:
        kind, insts = _load_file(f)
        blank = _blank_instances(kind, insts)
        types.append(kind)
        skip = set(blank)
        instances.append([inst for i, inst in enumerate(insts) if i not in skip])
        blanks.append(blank)
    if not any(instances):
        raise ValueError(f"{', '.join(map(str, files))}: every instance's {_TRAINED_TEXT[types[0]]} is empty or "
                         "whitespace-only: nothing to train on")
    for f, kind, blank, kept in zip(files, types, blanks, instances):
        if blank:
            shown = ", ".join(map(str, blank[:10])) + (", ..." if len(blank) > 10 else "")
            warnings.warn(f"{f}: {len(blank)} of {len(blank) + len(kept)} instances have an empty or whitespace-only "
                          f"{_TRAINED_TEXT[kind]} (instance {shown}); they are left out", stacklevel=2)
    return LMFlowDataset(files=files, types=types, instances=instances)


_TRAINED_TEXT = {"text_only": '"text"', "text2text": '"output"', "conversation": "assistant content"}


def _blank_instances(kind: str, insts: list[dict]) -> list[int]:
    """Indices of the instances whose trained text is empty or whitespace-only."""
    def trained_texts(inst):
        if kind == "conversation":
            return [m["content"] for m in inst["messages"] if m["role"] == "assistant"]
        return [inst["text" if kind == "text_only" else "output"]]

    return [i for i, inst in enumerate(insts) if (texts := trained_texts(inst)) and not "".join(texts).strip()]


# ------------------------------------------------------------------------------------------------ tokenization


def tokenize_instance(tokenizer, kind: str, inst: dict, template=None) -> Example:
    """Token ids and labels of one validated instance (not yet truncated); ``template`` renders conversations
    (see ``templates.conversation_template``; None: the tokenizer's own chat template, else plain role headers)."""
    if kind == "text_only":
        ids = encode(tokenizer, "{bos}{content}{eos}", inst["text"])
        return Example(ids, list(ids))
    if kind == "text2text":
        prompt = encode(tokenizer, "{bos}{content}", inst["input"])
        answer = encode(tokenizer, "{content}{eos}", inst["output"])
        return Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)
    if kind == "conversation":
        template = template or templates.conversation_template(None, tokenizer)
        messages = trim_trailing_turns([{"role": m["role"], "content": m["content"]} for m in inst["messages"]])
        ids, labels = [], []
        for seg, trained in template.segments(tokenizer, messages, inst.get("system"), inst.get("tools")):
            ids += seg
            labels += seg if trained else [IGNORE_INDEX] * len(seg)
        return Example(ids, labels)
    raise ValueError(f"unknown dataset type {kind!r}")


def _pack(examples: list[Example], block_size: int) -> list[Example]:
    """Concatenate and cut into blocks of ``block_size``; the last, shorter block is kept (collation pads it)."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    return [Example(ids[i : i + block_size], labels[i : i + block_size]) for i in range(0, len(ids), block_size)]


def tokenize_dataset(dataset: LMFlowDataset, tokenizer, block_size: int, *, pack: bool | None = None,
                     conversation_template: str | None = None) -> TokenizedDataset:
    """Tokenize every instance; ``pack=None`` packs text_only files and truncates the others to ``block_size``.

    Packing text2text/conversation data (``pack=True``) keeps its loss masks; truncation (``pack=False``) keeps
    only the first ``block_size`` tokens of each instance and counts how many were cut in ``stats``.
    ``conversation_template`` names the template for conversation data (see ``templates.py``).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    template = None
    if "conversation" in dataset.types:
        template = templates.conversation_template(conversation_template, tokenizer)
    examples, stats = [], {"instances": 0, "truncated": 0, "dropped_untrained": 0, "tokens": 0, "trained_tokens": 0}
    longest_needed = 0  # the block size that would keep a trained token in every instance that lost all of them
    for path, kind, insts in zip(dataset.files, dataset.types, dataset.instances):
        try:
            tokenized = [tokenize_instance(tokenizer, kind, inst, template) for inst in insts]
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if kind == "conversation":
            _warn_unrendered_tools(path, template, tokenizer, insts)
        stats["instances"] += len(insts)
        if pack if pack is not None else kind == "text_only":
            examples += _pack(tokenized, block_size)
            continue
        for e in tokenized:
            if len(e) > block_size:
                stats["truncated"] += 1
                cut = Example(e.input_ids[:block_size], e.labels[:block_size])
                if _trained_tokens(e) and not _trained_tokens(cut):
                    first = next(i for i, t in enumerate(e.labels) if i > 0 and t != IGNORE_INDEX)
                    longest_needed = max(longest_needed, first + 1)
                e = cut
            examples.append(e)
    trainable = [e for e in examples if _trained_tokens(e)]
    stats["dropped_untrained"] = len(examples) - len(trainable)  # e.g. truncated before the first assistant turn
    examples = trainable
    if not examples:
        cause = "every label is masked or sequences are empty"
        if longest_needed:
            cause = (f"truncation at --block_size {block_size} cut every trained token; --block_size "
                     f"{longest_needed} would keep at least one in each of those sequences")
        raise ValueError(f"{dataset.files[0]}: no tokens to train on ({cause})")
    stats["examples"] = len(examples)
    stats["tokens"] = sum(len(e) for e in examples)
    stats["trained_tokens"] = sum(_trained_tokens(e) for e in examples)
    stats["truncation_needs_block_size"] = longest_needed
    return TokenizedDataset(examples, stats)


def _trained_tokens(e: Example) -> int:
    return sum(t != IGNORE_INDEX for t in e.labels[1:])  # the first label is never predicted


def _warn_unrendered_tools(path: Path, template, tokenizer, insts: list[dict]) -> None:
    with_tools = [inst for inst in insts if inst.get("tools")]
    if with_tools and not template.renders_tools(tokenizer, with_tools[0]["messages"], with_tools[0]["tools"]):
        warnings.warn(f"{path}: {len(with_tools)} instance(s) have \"tools\" that the {template.name!r} conversation "
                      "template does not render; the tools were left out of those conversations", stacklevel=3)


def split_dataset(data: TokenizedDataset, eval_fraction: float, seed: int) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """A seeded held-out split; at least one example stays in each part when ``eval_fraction > 0``."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(data)
    n_eval = min(n - 1, max(1, round(n * eval_fraction))) if eval_fraction > 0 and n > 1 else 0
    if n_eval == 0:
        return data, None
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(data.examples) if i not in held]
    evals = [e for i, e in enumerate(data.examples) if i in held]
    return TokenizedDataset(train, dict(data.stats, examples=len(train))), TokenizedDataset(evals, {"examples": len(evals)})


# --------------------------------------------------------------------------------------------------- collation


class Collator:
    """Pads a list of examples on the right: ``input_ids`` with the pad id, ``labels`` with ``IGNORE_INDEX``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e)
            ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id  # padded positions carry no loss and no attention, so any id works
    return 0


def load_and_tokenize(path, tokenizer, block_size: int, *, pack: bool | None = None,
                      conversation_template: str | None = None) -> TokenizedDataset:
    return tokenize_dataset(load_lmflow_dataset(path), tokenizer, block_size, pack=pack,
                            conversation_template=conversation_template)
