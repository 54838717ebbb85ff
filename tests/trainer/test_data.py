import json

import pytest
import torch

from lisa_trainer.data import (
    IGNORE_INDEX,
    Collator,
    Example,
    load_and_tokenize,
    load_lmflow_dataset,
    split_dataset,
    tokenize_dataset,
)
from lisa_trainer.demo import build_demo_tokenizer, demo_dataset_path


def write(path, doc):
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def trained_text(tok, example):
    return tok.decode([t for t in example.labels if t != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------------- formats


def test_text_only_packs_every_token_into_blocks(tmp_path, tok):
    texts = ["The first document is short.", "A second one, a little longer than the first, follows it." * 3]
    f = write(tmp_path / "t.json", {"type": "text_only", "instances": [{"text": t} for t in texts]})
    data = load_and_tokenize(f, tok, block_size=16)
    expected = []
    for t in texts:
        expected += [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = [t for e in data.examples for t in e.input_ids]
    assert flat == expected  # nothing dropped, order kept, the short last block included
    assert all(len(e) == 16 for e in data.examples[:-1]) and 0 < len(data.examples[-1]) <= 16
    assert all(e.labels == e.input_ids for e in data.examples)


def test_text2text_trains_on_the_output_only(tmp_path, tok):
    f = write(tmp_path / "t.json", {"type": "text2text", "instances": [{"input": "Question: two plus two?", "output": " Four."}]})
    (ex,) = load_and_tokenize(f, tok, block_size=128).examples
    assert tok.decode(ex.input_ids) == "<s>Question: two plus two? Four.</s>"
    assert trained_text(tok, ex) == " Four.</s>"
    n_prompt = len(tok("Question: two plus two?")["input_ids"])  # with BOS
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt


def test_text2text_truncates_to_block_size_and_counts_it(tmp_path, tok):
    f = write(tmp_path / "t.json", {"type": "text2text", "instances": [{"input": "x" * 10, "output": "y" * 50}]})
    data = load_and_tokenize(f, tok, block_size=32)
    assert len(data.examples[0]) == 32 and data.stats["truncated"] == 1


CONVERSATION = {
    "type": "conversation",
    "instances": [
        {
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ],
        }
    ],
}


def test_conversation_trains_on_assistant_turns_only(tmp_path, tok):
    f = write(tmp_path / "c.json", CONVERSATION)
    (ex,) = load_and_tokenize(f, tok, block_size=512).examples
    text = tok.decode(ex.input_ids)
    for piece in ("Be brief.", "Hi there", "Capital of France?", "Hello!", "Paris."):
        assert piece in text
    assert trained_text(tok, ex) == "Hello!</s>Paris.</s>"


def test_conversation_with_a_chat_template(tmp_path, tok):
    tok = build_demo_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    f = write(tmp_path / "c.json", CONVERSATION)
    (ex,) = load_and_tokenize(f, tok, block_size=512).examples
    assert tok.decode(ex.input_ids).startswith("[system] Be brief.\n[user] Hi there\n[assistant] Hello!</s>")
    # the template's "[assistant] " header stays untrained; what it writes after an assistant turn trains with it
    assert trained_text(tok, ex) == "Hello!</s>\nParis.</s>\n"


def test_folder_of_files_in_name_order_with_mixed_types(tmp_path, tok):
    write(tmp_path / "b.json", {"type": "text2text", "instances": [{"input": "in", "output": "out"}]})
    write(tmp_path / "a.json", {"type": "text_only", "instances": [{"text": "alpha"}]})
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_lmflow_dataset(tmp_path)
    assert [p.name for p in ds.files] == ["a.json", "b.json"] and ds.type == "mixed" and len(ds) == 2
    data = tokenize_dataset(ds, tok, block_size=64)
    assert [trained_text(tok, e) for e in data.examples] == ["<s>alpha</s>", "out</s>"]


def test_shipped_sample_dataset_loads(tok):
    ds = load_lmflow_dataset(demo_dataset_path())
    assert set(ds.types) == {"text_only", "text2text", "conversation"}
    assert sum(f.stat().st_size for f in ds.files) < 64_000
    data = tokenize_dataset(ds, tok, block_size=128)
    assert data.stats["trained_tokens"] > 10_000


def test_collator_pads_with_masked_labels():
    batch = Collator(pad_token_id=7)([Example([1, 2, 3], [1, IGNORE_INDEX, 3]), Example([4], [4])])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, IGNORE_INDEX, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["input_ids"].dtype == torch.long


def test_split_is_seeded_disjoint_and_complete(tmp_path, tok):
    f = write(tmp_path / "t.json", {"type": "text2text", "instances": [{"input": f"q{i}", "output": f"a{i}"} for i in range(20)]})
    data = load_and_tokenize(f, tok, block_size=64)
    train, held = split_dataset(data, 0.25, seed=3)
    train2, held2 = split_dataset(data, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert [e.input_ids for e in held] == [e.input_ids for e in held2]
    assert sorted(map(tuple, (e.input_ids for e in train.examples + held.examples))) == sorted(tuple(e.input_ids) for e in data.examples)
    assert split_dataset(data, 0.0, seed=3)[1] is None


# ----------------------------------------------------------------------------------------------- malformed

MALFORMED = [
    ('{"type": "text_only", "instances": [\n  {"text": "a"},\n  {"text": "b"\n]}', ["line 4, column 1"]),
    ("[1, 2]", ["top level must be an object"]),
    ({"instances": [{"text": "a"}]}, ['missing "type"']),
    ({"type": "chat", "instances": [{"text": "a"}]}, ["unknown dataset type 'chat'", "text_only"]),
    ({"type": "text_only"}, ['missing "instances"']),
    ({"type": "text_only", "instances": {"text": "a"}}, ['"instances" must be a list']),
    ({"type": "text_only", "instances": []}, ['"instances" is empty']),
    ({"type": "text_only", "instances": [{"text": "a"}, {"txt": "b"}]}, ['instance 1: missing field "text"']),
    ({"type": "text_only", "instances": [{"text": "a"}, "b"]}, ["instance 1: expected an object, got str"]),
    ({"type": "text2text", "instances": [{"input": "a", "output": 3}]}, ['instance 0: field "output" must be a string, got int']),
    ({"type": "conversation", "instances": [{"messages": "hi"}]}, ['instance 0: field "messages" must be a list']),
    ({"type": "conversation", "instances": [{"messages": []}]}, ['instance 0: field "messages" is empty']),
    (
        {"type": "conversation", "instances": [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}]},
        ['instance 0, message 1: unknown role "bot"'],
    ),
    ({"type": "conversation", "instances": [{"messages": [{"role": "user"}]}]}, ['instance 0, message 0: missing field "content"']),
    ({"type": "conversation", "instances": [{"system": 1, "messages": [{"role": "user", "content": "a"}]}]}, ['field "system" must be a string']),
]


@pytest.mark.parametrize("doc,expected", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_data_names_file_instance_and_problem(tmp_path, doc, expected):
    f = write(tmp_path / "broken.json", doc)
    with pytest.raises(ValueError) as err:
        load_lmflow_dataset(f)
    msg = str(err.value)
    assert str(f) in msg
    for piece in expected:
        assert piece in msg


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    insts = [{"text": "ok"}, {"text": 1}, {"text": "ok"}, {}, {"text": None}]
    f = write(tmp_path / "many.json", {"type": "text_only", "instances": insts})
    with pytest.raises(ValueError) as err:
        load_lmflow_dataset(f)
    msg = str(err.value)
    assert "3 problem(s)" in msg and "instance 1:" in msg and "instance 3:" in msg and "instance 4:" in msg


def test_a_bad_file_in_a_folder_is_named(tmp_path):
    write(tmp_path / "a.json", {"type": "text_only", "instances": [{"text": "fine"}]})
    bad = write(tmp_path / "b.json", {"type": "text_only", "instances": [{"text": "fine"}, {"text": ["no"]}]})
    with pytest.raises(ValueError, match="b.json: 1 problem") as err:
        load_lmflow_dataset(tmp_path)
    assert str(bad) in str(err.value) and "instance 1" in str(err.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_lmflow_dataset(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="no .json dataset files"):
        load_lmflow_dataset(tmp_path)


def test_sequences_without_trained_tokens_are_counted_when_left_out(tmp_path, tok):
    long_question = {"messages": [{"role": "user", "content": "why? " * 40}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    f = write(tmp_path / "c.json", {"type": "conversation", "instances": [long_question, short]})
    data = load_and_tokenize(f, tok, block_size=64)
    assert len(data) == 1 and data.stats["truncated"] == 1 and data.stats["dropped_untrained"] == 1
    assert trained_text(tok, data.examples[0]) == "hello</s>"


def test_blank_texts_are_left_out_with_a_warning_naming_the_file(tmp_path, tok):
    f = write(tmp_path / "t.json", {"type": "text_only", "instances": [{"text": ""}, {"text": "kept"}, {"text": " \n\t"}]})
    with pytest.warns(UserWarning, match=r't\.json: 2 of 3 instances have an empty or whitespace-only "text" '
                                         r"\(instance 0, 2\); they are left out"):
        data = load_and_tokenize(f, tok, block_size=16)
    assert [tok.decode(e.input_ids) for e in data.examples] == ["<s>kept</s>"]
    answers = write(tmp_path / "qa.json", {"type": "text2text", "instances": [{"input": "q", "output": "a"},
                                                                             {"input": "q", "output": "  "}]})
    with pytest.warns(UserWarning, match=r'qa\.json: 1 of 2 instances have an empty or whitespace-only "output"'):
        assert len(load_lmflow_dataset(answers)) == 1


def test_a_dataset_of_blank_texts_only_is_refused_naming_the_file(tmp_path):
    f = write(tmp_path / "blank.json", {"type": "text_only", "instances": [{"text": ""}, {"text": "   "}]})
    with pytest.raises(ValueError, match=r'blank\.json: every instance\'s "text" is empty or whitespace-only: '
                                         "nothing to train on"):
        load_lmflow_dataset(f)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
    f = write(tmp_path / "chat.json", {"type": "conversation", "instances": [chat]})
    with pytest.raises(ValueError, match=r"chat\.json: every instance's assistant content is empty"):
        load_lmflow_dataset(f)
