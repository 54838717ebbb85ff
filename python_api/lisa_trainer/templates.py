"""Conversation templates: how a conversation instance becomes token ids and a loss mask.

A template renders a conversation as pieces of (token ids, trained). Only assistant turns are trained: the
assistant's content and the template's end-of-turn marker (the tokens a model must learn to emit to stop), never
the role headers or the user's text. Three kinds:

- the tokenizer's own chat template (``apply_chat_template``), the default when the tokenizer has one;
- a named format (``llama3``, ``chatml``, ...; LMFlow's ``--conversation_template`` names), written out below;
- ``empty``: the text as given (for data that is already formatted), with BOS before each user turn and EOS after
  each assistant turn as in LMFlow; ``empty_no_special_tokens`` adds nothing at all.

A conversation that ends with turns after its last assistant turn has them trimmed (they would carry no loss), as
LMFlow does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

BOS, EOS = "{bos}", "{eos}"  # markers in the formats below for the tokenizer's BOS and EOS token ids
_SPECIAL = re.compile(r"(\{bos\}|\{eos\})")


def encode(tokenizer, template: str, content: str = "") -> list[int]:
    """Token ids of ``template`` with ``{content}`` filled in; its ``{bos}``/``{eos}`` markers become the
    tokenizer's own special ids. The markers are found before the content goes in, so text that happens to contain
    "{eos}" stays text."""
    ids = []
    for part in _SPECIAL.split(template):
        if part == BOS:
            ids += bos_ids(tokenizer)
        elif part == EOS:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before tokenizing")
            ids.append(tokenizer.eos_token_id)
        elif part:
            ids += tokenizer(part.replace("{content}", content), add_special_tokens=False)["input_ids"]
    return ids


def bos_ids(tokenizer) -> list[int]:
    """BOS, only when the tokenizer itself would add one: GPT-2-style tokenizers have bos == eos and add nothing."""
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


@dataclass(frozen=True)
class ConversationFormat:
    """A chat format written out as strings with ``{content}``; ``{bos}``/``{eos}`` stand for the special tokens.

    ``system`` renders a system turn; a format without one (``None``) puts ``merged_system`` (with the system text)
    in front of the first user message instead. ``tool`` renders tool/observation results (the user's side; without
    it they render as user turns). ``start`` opens the conversation once, ``user_start`` every user turn. Tools
    (an instance's ``tools`` list) are listed after the system text, as LMFlow's tool templates do.
    """

    name: str
    user: str
    assistant_header: str  # untrained
    assistant_end: str  # trained: the end-of-turn marker the model must learn to emit
    after_assistant: str = ""  # untrained separator after the end-of-turn marker
    system: str | None = None
    merged_system: str = "{content}\n\n"
    tool: str | None = None
    start: str = BOS
    user_start: str = ""
    end: str = ""  # trained, after the last assistant turn (phi3's EOS)
    lists_tools: bool = True

    def renders_tools(self, tokenizer, messages: list[dict], tools: list) -> bool:
        return self.lists_tools

    def segments(self, tokenizer, messages: list[dict], system: str | None, tools: list | None) -> list[tuple[list[int], bool]]:
        if tools and self.lists_tools:
            listing = "\n".join(t if isinstance(t, str) else json.dumps(t) for t in tools)
            system = f"{system}\n\n{listing}" if system else listing
        pieces = [(self.start, "", False)]  # (template, content, trained)
        if system and self.system is not None:
            pieces.append((self.system, system, False))
        first_user = True
        for msg in messages:
            role, content = msg["role"], msg["content"]
            if role in ("assistant", "function"):  # function: the assistant's own call, trained like its answers
                pieces += [(self.assistant_header, "", False), ("{content}" + self.assistant_end, content, True),
                           (self.after_assistant, "", False)]
            elif role == "system":
                pieces.append((self.system or "{content}", content, False))
            elif role == "user" or self.tool is None:
                if first_user and system and self.system is None:
                    content = self.merged_system.replace("{content}", system) + content
                first_user = False
                pieces.append((self.user_start + self.user, content, False))
            else:  # tool / observation results
                pieces.append((self.tool, content, False))
        pieces.append((self.end, "", True))
        return [(encode(tokenizer, template, content), trained) for template, content, trained in pieces if template]


_CHATML = dict(
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_header="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    after_assistant="\n",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    tool="<|im_start|>tool\n{content}<|im_end|>\n",
    start="",
)
_LLAMA2 = dict(
    user="[INST] {content} [/INST]",
    assistant_header="",
    assistant_end=EOS,
    merged_system="<<SYS>>\n{content}\n<</SYS>>\n\n",
    start="",
    user_start=BOS,
)

FORMATS = {
    f.name: f
    for f in (
        ConversationFormat("llama2", **_LLAMA2),
        ConversationFormat(
            "llama3",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant_end="<|eot_id|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            tool="<|start_header_id|>tool<|end_header_id|>\n\n{content}<|eot_id|>",
        ),
        ConversationFormat("chatml", **_CHATML),
        ConversationFormat("qwen2", **_CHATML),
        ConversationFormat("yi", **_CHATML),
        ConversationFormat("mistral", user="[INST] {content} [/INST]", assistant_header="", assistant_end=EOS),
        ConversationFormat(
            "gemma",
            user="<start_of_turn>user\n{content}<end_of_turn>\n",
            assistant_header="<start_of_turn>model\n",
            assistant_end="<end_of_turn>",
            after_assistant="\n",
        ),
        ConversationFormat(
            "phi3",
            user="<|user|>\n{content}<|end|>\n",
            assistant_header="<|assistant|>\n",
            assistant_end="<|end|>",
            after_assistant="\n",
            system="<|system|>\n{content}<|end|>\n",
            end=EOS,
        ),
        ConversationFormat(
            "deepseek",
            user="User: {content}\n\n",
            assistant_header="Assistant: ",
            assistant_end=EOS,
            system="{content}\n\n",
        ),
        ConversationFormat("empty", user="{content}", assistant_header="", assistant_end=EOS, system="{content}", start="",
                user_start=BOS, lists_tools=False),
        ConversationFormat("empty_no_special_tokens", user="{content}", assistant_header="", assistant_end="",
                system="{content}", start="", lists_tools=False),
    )
}
# Without a chat template in the tokenizer and no name given: plain role headers.
PLAIN = ConversationFormat(
    "plain",
    user="<|user|>\n{content}\n",
    assistant_header="<|assistant|>\n",
    assistant_end=EOS,
    after_assistant="\n",
    system="<|system|>\n{content}\n",
    tool="<|tool|>\n{content}\n",
)
TOKENIZER_TEMPLATE = "tokenizer"  # the name that selects the tokenizer's own chat template explicitly
# LMFlow's other names: `hf_auto` is the default choice, `disable` is `empty`.
ALIASES = {"hf_auto": None, "disable": "empty"}


class TokenizerTemplate:
    """The tokenizer's own chat template. Each assistant turn is the difference between the rendering up to and
    including it and the rendering before it with the generation prompt, so the template's assistant header stays
    untrained whatever the template looks like."""

    name = TOKENIZER_TEMPLATE

    def renders_tools(self, tokenizer, messages: list[dict], tools: list) -> bool:
        return self._render(tokenizer, messages, tools) != self._render(tokenizer, messages, None)

    @staticmethod
    def _render(tokenizer, messages, tools, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(messages, tools=_schemas(tools), tokenize=False,
                                             add_generation_prompt=generation_prompt)

    def segments(self, tokenizer, messages: list[dict], system: str | None, tools: list | None) -> list[tuple[list[int], bool]]:
        if system:
            messages = [{"role": "system", "content": system}] + messages
        pieces, done = [], ""
        for i, msg in enumerate(messages):
            if msg["role"] == "assistant":
                prompt = self._render(tokenizer, messages[:i], tools, generation_prompt=True)
                if prompt.startswith(done):
                    pieces.append((prompt[len(done):], False))
                    done = prompt
            rendered = self._render(tokenizer, messages[: i + 1], tools)
            if not rendered.startswith(done):
                raise ValueError("the tokenizer's chat template does not render conversations incrementally")
            pieces.append((rendered[len(done):], msg["role"] == "assistant"))
            done = rendered
        # The template writes its own BOS as text; encoding it without special tokens maps it to the BOS id.
        return [(tokenizer(text, add_special_tokens=False)["input_ids"], trained) for text, trained in pieces if text]


def _schemas(tools: list | None) -> list[dict] | None:
    """Tools as the JSON schemas chat templates take: LMFlow data lists each tool as a JSON string or an object.
    None when any of them is not one (the template then renders none, and the caller says so)."""
    if not tools:
        return None
    schemas = []
    for tool in tools:
        if isinstance(tool, str):
            try:
                tool = json.loads(tool)
            except json.JSONDecodeError:
                return None
        if not isinstance(tool, dict):
            return None
        schemas.append(tool)
    return schemas


def conversation_template(name: str | None, tokenizer):
    """The template ``name`` selects (None: the tokenizer's own when it has one, else plain role headers)."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    name = ALIASES.get(name, name)
    if name is None:
        return TokenizerTemplate() if has_own else PLAIN
    if name == TOKENIZER_TEMPLATE:
        if not has_own:
            raise ValueError(f"--conversation_template {name}: the tokenizer has no chat template; "
                             f"name one of: {', '.join(FORMATS)}")
        return TokenizerTemplate()
    if name not in FORMATS:
        raise ValueError(f"--conversation_template: unknown template {name!r}; known: "
                         f"{', '.join([TOKENIZER_TEMPLATE, *ALIASES, *FORMATS])}")
    return FORMATS[name]


def trim_trailing_turns(messages: list[dict]) -> list[dict]:
    """The conversation up to its last assistant turn: what follows carries no loss (LMFlow drops it too)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return messages[: last + 1]
