import json
import warnings

import pytest

from lisa_trainer.data import IGNORE_INDEX, load_and_tokenize
from lisa_trainer.demo import build_demo_tokenizer
from lisa_trainer.templates import FORMATS, conversation_template

SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "Hi there", "Hello!", "Capital of France?", "Paris."
TWO_TURNS = {"system": SYSTEM, "messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                                            {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]}

# What each format must render (the demo tokenizer's BOS/EOS are <s> and </s>) and which part of it is trained.
RENDERED = {
    "llama2": ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]Hello!</s><s>[INST] Capital of France? [/INST]"
               "Paris.</s>", "Hello!</s>Paris.</s>"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>", "Hello!<|eot_id|>Paris.<|eot_id|>"),
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
               "<|im_start|>assistant\nParis.<|im_end|>\n", "Hello!<|im_end|>Paris.<|im_end|>"),
    "mistral": ("<s>[INST] Be brief.\n\nHi there [/INST]Hello!</s>[INST] Capital of France? [/INST]Paris.</s>",
                "Hello!</s>Paris.</s>"),
    "gemma": ("<s><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
              "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\nParis.<end_of_turn>\n",
              "Hello!<end_of_turn>Paris.<end_of_turn>"),
    "phi3": ("<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n"
             "<|user|>\nCapital of France?<|end|>\n<|assistant|>\nParis.<|end|>\n</s>", "Hello!<|end|>Paris.<|end|></s>"),
    "deepseek": ("<s>Be brief.\n\nUser: Hi there\n\nAssistant: Hello!</s>User: Capital of France?\n\nAssistant: Paris.</s>",
                 "Hello!</s>Paris.</s>"),
    "empty": ("Be brief.<s>Hi thereHello!</s><s>Capital of France?Paris.</s>", "Hello!</s>Paris.</s>"),
    "empty_no_special_tokens": ("Be brief.Hi thereHello!Capital of France?Paris.", "Hello!Paris."),
}
RENDERED["qwen2"] = RENDERED["yi"] = RENDERED["chatml"]


def tokenize(tmp_path, tok, instances, template=None, block_size=1024):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"type": "conversation", "instances": instances}))
    return load_and_tokenize(path, tok, block_size, conversation_template=template)


def trained(tok, example):
    return tok.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_every_format_is_checked_here():
    assert set(RENDERED) == set(FORMATS)


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_format_renders_two_turns_and_trains_the_assistant_only(tmp_path, tok, name):
    (ex,) = tokenize(tmp_path, tok, [TWO_TURNS], name).examples
    text, trained_text = RENDERED[name]
    assert tok.decode(ex.input_ids) == text
    assert trained(tok, ex) == trained_text
    # The mask covers whole tokens of the assistant turns and nothing else: every trained token is the same token.
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ex.input_ids, ex.labels))


def test_a_named_template_replaces_the_tokenizers_own(tmp_path, tok):
    tok = _with_chat_template(tok)
    (own,) = tokenize(tmp_path, tok, [TWO_TURNS]).examples
    assert tok.decode(own.input_ids).startswith("<s>[system] Be brief.")
    (named,) = tokenize(tmp_path, tok, [TWO_TURNS], "chatml").examples
    assert tok.decode(named.input_ids) == RENDERED["chatml"][0]  # not wrapped in the tokenizer's template as well


def test_empty_leaves_preformatted_text_untouched(tmp_path, tok):
    tok = _with_chat_template(tok)
    user = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    reply = "Hello, {content} and {eos} stay text.<|im_end|>\n"
    (ex,) = tokenize(tmp_path, tok, [{"messages": [{"role": "user", "content": user},
                                                   {"role": "assistant", "content": reply}]}], "empty").examples
    assert tok.decode(ex.input_ids) == f"<s>{user}{reply}</s>"
    assert trained(tok, ex) == f"{reply}</s>"
    assert ex.input_ids.count(tok.eos_token_id) == 1


def test_trailing_turns_after_the_last_answer_are_trimmed(tmp_path, tok):
    inst = {"messages": TWO_TURNS["messages"] + [{"role": "user", "content": "And Spain?"}]}
    for template in ("llama3", None):
        (ex,) = tokenize(tmp_path, tok, [inst], template).examples
        assert "Spain" not in tok.decode(ex.input_ids)


def test_tools_are_listed_in_the_system_turn(tmp_path, tok):
    tool = {"name": "weather", "parameters": {"city": "string"}}
    inst = dict(TWO_TURNS, tools=[tool, "calculator(expression)"])
    (ex,) = tokenize(tmp_path, tok, [inst], "llama3").examples
    assert tok.decode(ex.input_ids).startswith(
        f"<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.\n\n{json.dumps(tool)}\ncalculator(expression)<|eot_id|>")


def test_tool_results_render_on_the_users_side_and_calls_are_trained(tmp_path, tok):
    inst = {"messages": [{"role": "user", "content": "Weather?"}, {"role": "function", "content": "weather(Paris)"},
                         {"role": "observation", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
    (ex,) = tokenize(tmp_path, tok, [inst], "chatml").examples
    assert "<|im_start|>tool\nsunny<|im_end|>\n" in tok.decode(ex.input_ids)
    assert trained(tok, ex) == "weather(Paris)<|im_end|>Sunny.<|im_end|>"


def test_tools_a_template_cannot_render_are_named_with_their_count(tmp_path, tok):
    inst = dict(TWO_TURNS, tools=["calculator(expression)"])
    with pytest.warns(UserWarning, match=r"2 instance\(s\) have \"tools\" that the 'empty' conversation template"):
        data = tokenize(tmp_path, tok, [inst, inst, TWO_TURNS], "empty")
    assert "calculator" not in tok.decode(data.examples[0].input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(tmp_path, tok, [inst], "llama3")


def test_the_tokenizers_template_gets_the_tools(tmp_path, tok):
    tok = _with_chat_template(tok, tools=True)
    schema = {"type": "function", "function": {"name": "calculator"}}
    inst = dict(TWO_TURNS, tools=[json.dumps(schema)])  # LMFlow data: each tool a JSON string
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (ex,) = tokenize(tmp_path, tok, [inst]).examples
    assert "[tools] calculator" in tok.decode(ex.input_ids)
    with pytest.warns(UserWarning, match=r"1 instance\(s\) have \"tools\" that the 'tokenizer' conversation template"):
        tokenize(tmp_path, tok, [dict(TWO_TURNS, tools=["calculator(expression)"])])  # not a schema


def test_unknown_template_lists_the_known_ones(tmp_path, tok):
    with pytest.raises(ValueError, match=r"unknown template 'llama9'; known: tokenizer, hf_auto, disable, llama2, llama3"):
        tokenize(tmp_path, tok, [TWO_TURNS], "llama9")
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        conversation_template("tokenizer", tok)


def test_truncation_that_leaves_nothing_to_train_names_the_block_size_that_would(tmp_path, tok):
    long_question = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "Yes."}]}
    with pytest.raises(ValueError, match=r"truncation at --block_size 64 cut every trained token; --block_size 2\d\d"):
        tokenize(tmp_path, tok, [long_question], "chatml", block_size=64)


def test_tools_must_be_a_list(tmp_path, tok):
    with pytest.raises(ValueError, match='instance 0: field "tools" must be a list, got str'):
        tokenize(tmp_path, tok, [dict(TWO_TURNS, tools="calculator")])


def _with_chat_template(tok, tools=False):
    """A fresh demo tokenizer (the shared `tok` fixture stays unchanged) with a small chat template of its own."""
    fresh = build_demo_tokenizer()
    listing = "{% if tools %}[tools] {% for t in tools %}{{ t['function']['name'] }}{% endfor %}\n{% endif %}" if tools else ""
    fresh.chat_template = (
        "{{ bos_token }}" + listing + "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    return fresh
