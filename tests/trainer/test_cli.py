import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from lisa_trainer.cli import OPTION_CLASSES, CliError, DataOptions, ModelOptions, RunOptions, main, parse_options
from lisa_trainer import LisaConfig
from lisa_trainer.options import _field_type, flag_of, option_fields
from lisa_trainer.trainer import LisaTrainingArguments
from lisa_trainer.sampler import parse_layer_weights
from lisa_trainer.runlog import read_log

FAST = ["--max_steps", "4", "--lisa_interval_steps", "2", "--block_size", "48", "--per_device_train_batch_size", "2",
        "--disable_tqdm", "--eval_steps", "2"]


pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    code = main(["--demo", "--output_model_path", str(out), "--save_steps", "2", *FAST])
    return code, out


def test_demo_end_to_end(demo_run, capsys):
    code, out = demo_run
    assert code == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    ids = tok("The river", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()

    recs = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "step"] == [1, 2, 3, 4]
    assert [r["period"] for r in recs if r["kind"] == "period"] == [0, 1]
    assert recs[-1]["kind"] == "summary" and recs[-1]["last_loss"] < recs[-1]["first_loss"]
    assert (out / "lisa_run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_demo_resumes_from_latest_checkpoint(demo_run, tmp_path):
    _, out = demo_run
    before = [(r["step"], r["loss"], r["active_layers"]) for r in read_log(out / "train_log.jsonl") if r["kind"] == "step"]
    # same run, resumed at step 2: the log is cut back to step 2 and steps 3-4 are replayed identically
    code = main(["--demo", "--output_model_path", str(out), "--resume_from_checkpoint", str(out / "checkpoint-2"), *FAST])
    assert code == 0
    after = [(r["step"], r["loss"], r["active_layers"]) for r in read_log(out / "train_log.jsonl") if r["kind"] == "step"]
    assert after == before


def test_resuming_with_another_schedule_is_a_clear_error(demo_run, capsys):
    _, out = demo_run
    log = (out / "train_log.jsonl").read_bytes()
    argv = ["--demo", "--output_model_path", str(out), "--resume_from_checkpoint", "latest", *FAST, "--lisa_interval_steps", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume_from_checkpoint" in err and "interval_steps=2" in err and "Traceback" not in err
    assert (out / "train_log.jsonl").read_bytes() == log  # nothing touched


def test_ctrl_c_says_how_to_resume_without_a_traceback(tmp_path, capsys, monkeypatch):
    from lisa_trainer.trainer import LisaTrainer

    def interrupted(self, resume_from_checkpoint=None, *, claim=None):  # the run wrote checkpoint-3, then Ctrl-C
        (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
        (tmp_path / "out" / "checkpoint-3" / "trainer_state.pt").touch()
        raise KeyboardInterrupt

    monkeypatch.setattr(LisaTrainer, "train", interrupted)
    assert main(["--demo", "--output_model_path", str(tmp_path / "out"), *FAST]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "checkpoint-3" in err and "--resume_from_checkpoint latest" in err


def test_summary_is_printed(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path / "logs"), "--output_model_path", str(tmp_path / "m"), *FAST]) == 0
    text = capsys.readouterr().out
    assert "train loss" in text and "->" in text and "layers per period" in text and "peak memory" in text
    assert (tmp_path / "logs" / "train_log.jsonl").is_file() and (tmp_path / "logs" / "lisa_run.png").is_file()
    assert (tmp_path / "m" / "config.json").is_file()


def error_of(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse rejects a value
        code = e.code
    assert code == 2
    return capsys.readouterr().err


def test_errors_name_the_flag_or_path(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text('{"type": "text_only", "instances": [{"text": 3}]}')
    cases = [
        (["--dataset_path", str(tmp_path / "missing.json")], ["--dataset_path", "missing.json"]),
        (["--dataset_path", str(bad)], ["--dataset_path", "broken.json", "instance 0", '"text" must be a string']),
        (["--lisa_activated_layers", "0"], ["--lisa_activated_layers", "positive integer"]),
        (["--lisa_activated_layers", "9"], ["--lisa_activated_layers", "8 decoder layers"]),
        (["--lisa_layer_weights", "1,2,3"], ["--lisa_layer_weights", "3 entries", "8 decoder layers"]),
        (["--lisa_layer_weights", str(tmp_path / "w.json")], ["--lisa_layer_weights", "no such file"]),
        (["--lisa_layer_weights", "0,0,0,0,0,0,0,1"],
         ["error: --lisa_layer_weights", "1 non-zero entries, fewer than --lisa_activated_layers"]),
        (["--lisa_layers_attribute", "model.nothing"], ["--lisa_layers_attribute"]),
        (["--lisa_state_policy", "forget"], ["--lisa_state_policy", "invalid choice"]),
        (["--lisa_module_budget", "1000"], ["--lisa_module_budget", "--lisa_granularity='module' only"]),
        (["--lisa_granularity", "module", "--lisa_layer_weights", "auto"], ["--lisa_granularity", "takes neither"]),
        (["--learning_rate", "-1"], ["--learning_rate"]),
        (["--model_name_or_path", str(tmp_path / "no-model")], ["--model_name_or_path", "no-model"]),
        (["--model_name_or_path", str(tmp_path), "--demo"], ["--demo", "--model_name_or_path"]),
        (["--resume_from_checkpoint", str(tmp_path / "ckpt")], ["--resume_from_checkpoint", "ckpt"]),
        (["--no_such_flag"], ["unrecognized arguments: --no_such_flag"]),
        (["--device", "bogus"], ["--device", "bogus", "not a device name"]),
        (["--device", "cuda:99"], ["--device cuda:99"]),  # no GPU here, or not 100 of them
    ]
    for argv, expected in cases:
        err = error_of([*argv, "--output_model_path", str(tmp_path / "out"), "--max_steps", "1"], capsys)
        for piece in expected:
            assert piece in err, (argv, err)


def test_the_data_is_checked_before_the_model_is_loaded(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text('{"type": "text2text", "instances": [{"input": "q"}]}')
    not_a_model = tmp_path / "model"
    not_a_model.mkdir()  # loading it would fail: the error seen first must be the data's
    err = error_of(["--model_name_or_path", str(not_a_model), "--dataset_path", str(bad),
                    "--output_model_path", str(tmp_path / "out")], capsys)
    assert "broken.json" in err and 'missing field "output"' in err


def test_module_wise_demo_resumes_exactly(tmp_path):
    out = tmp_path / "out"
    argv = ["--demo", "--output_model_path", str(out), "--lisa_granularity", "module", "--save_steps", "3", *FAST,
            "--max_steps", "8"]
    assert main(argv) == 0
    periods = [r for r in read_log(out / "train_log.jsonl") if r["kind"] == "period"]
    assert len(periods) == 4 and all(p["modules"] and len(p["module_grad_norms"]) == len(p["modules"]) for p in periods)
    assert len({tuple(p["modules"]) for p in periods}) > 1
    before = [(r["step"], r["loss"]) for r in read_log(out / "train_log.jsonl") if r["kind"] == "step"]
    # Resumed in the middle of period 1: the same losses, modules and gradient norms.
    assert main([*argv, "--resume_from_checkpoint", str(out / "checkpoint-3")]) == 0
    log = read_log(out / "train_log.jsonl")
    assert [(r["step"], r["loss"]) for r in log if r["kind"] == "step"] == before
    assert [(p["modules"], p["module_grad_norms"]) for p in log if p["kind"] == "period"] == \
        [(p["modules"], p["module_grad_norms"]) for p in periods]


def test_layer_weights_from_list_json_and_a_previous_log(tmp_path, demo_run):
    assert parse_layer_weights("outlier") == "outlier"
    assert parse_layer_weights("1, 2,0.5") == [1.0, 2.0, 0.5]
    assert parse_layer_weights("[1, 0, 2.5]") == [1.0, 0.0, 2.5]  # the README's "a JSON list", inline
    (tmp_path / "w.json").write_text(json.dumps({"layer_weights": [1, 0, 3]}))
    assert parse_layer_weights(str(tmp_path / "w.json")) == [1.0, 0.0, 3.0]
    _, out = demo_run
    weights = parse_layer_weights(str(out / "train_log.jsonl"))
    periods = [r for r in read_log(out / "train_log.jsonl") if r["kind"] == "period"]
    sampled = {i for p in periods for i in p["layers"]}
    assert len(weights) == 8 and all(w > 0 for w in weights)
    first = periods[0]
    for layer, norm in zip(first["layers"], first["layer_update_norms"]):
        if sum(layer in p["layers"] for p in periods) == 1:
            assert weights[layer] == pytest.approx(norm)
    unsampled = [w for i, w in enumerate(weights) if i not in sampled]
    assert all(w == pytest.approx(sum(weights[i] for i in sampled) / len(sampled)) for w in unsampled)


def test_the_demo_runs_again_in_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo's default output folder is ./lisa-demo-output
    assert main(["--demo", *FAST]) == 0
    assert main(["--demo", *FAST]) == 0
    steps = [r["step"] for r in read_log(tmp_path / "lisa-demo-output" / "train_log.jsonl") if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ config files

def _sample(cls, field, default):
    """(a config file's value, the flag's text) for a valid value of ``field`` other than ``default``, chosen by its
    choices or type: a new option gets its case without a change here unless its type needs a special value."""
    special = {"layer_weights": ([1, 2, 3], "1,2,3"), "report_to": ("tensorboard", "tensorboard")}
    if field.name in special:
        return special[field.name]
    choices = field.metadata.get("choices")
    if choices:
        value = next(c for c in choices if c != default)
        return value, value
    base, _ = _field_type(cls, field)
    samples = {bool: [True, False], int: [3, 4], float: [0.25, 0.5], str: ["sample", "other"]}[base]
    value = next(v for v in samples if v != default)
    return value, str(value).lower() if base is bool else str(value)


CONFIG_CASES = [pytest.param(cls, field, id=field.name) for cls in OPTION_CLASSES for field in option_fields(cls)
                if field.name != "config"]


def _part(opts, cls):
    return {ModelOptions: opts.model, DataOptions: opts.data, RunOptions: opts.run, LisaConfig: opts.lisa,
            LisaTrainingArguments: opts.training}[cls]


def _outcome(argv):
    """The options ``argv`` gives, or the one-line error refusing them."""
    try:
        opts = parse_options(argv)
    except CliError as e:
        return str(e)
    return dataclasses.replace(opts, run=dataclasses.replace(opts.run, config=None), config_keys={})


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("cls, field", CONFIG_CASES)
def test_a_config_file_gives_every_option_as_its_flag_does(tmp_path, cls, field, suffix):
    # a model needs an output folder (flags override the file: the folder's own options are tested without it)
    base = [] if field.name in ("output_dir", "output_model_path") else ["--output_dir", str(tmp_path / "out")]
    default = getattr(_part(parse_options(base), cls), field.name)
    value, text = _sample(cls, field, default)
    flag, key = flag_of(field), flag_of(field).lstrip("-")
    from_flag = _outcome([*base, flag, text])
    path = tmp_path / f"run{suffix}"
    # the file's typed value, and the flag's text as a string (YAML reads 5e-5 as text, for one)
    for doc in ({key: value}, {key: text}):
        path.write_text(yaml.safe_dump(doc) if suffix == ".yaml" else json.dumps(doc))
        from_file = _outcome([*base, "--config", str(path)])
        if isinstance(from_flag, str):  # refused (the option needs another): in the same words, naming file and key
            assert from_file == from_flag.replace(flag, f"--config {path}: {key}", 1)
        else:
            assert from_file == from_flag
            assert getattr(_part(from_file, cls), field.name) != default  # the value given is the one used


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("key, value, problem", [
    ("model_name_or_path", 5, "model_name_or_path: expected a string (quote it), got 5"),
    ("learning_rate", [1, 2], "learning_rate: expected a number, got [1, 2]"),
    ("learning_rate", None, "learning_rate: needs a value, got null"),
    ("learning_rate", -1, "learning_rate must be a finite number > 0, got -1"),
    ("block_size", 64.9, "block_size: expected an integer, got 64.9"),
    ("block_size", 1, "block_size must be at least 2"),
    ("save_steps", True, "save_steps: expected an integer, got True"),
    ("lisa_state_policy", "forget", "lisa_state_policy: invalid choice: 'forget' (choose from park, reset, keep)"),
    ("lisa_layer_weights", {"a": 1}, "lisa_layer_weights: expected text, got {'a': 1}"),
    ("lisa_layer_weights", [0, 0, 1], "lisa_layer_weights has 1 non-zero entries, fewer than "
                                      "--lisa_activated_layers=2"),
    ("report_to", "mlflowx", "report_to names unknown tracker(s) mlflowx"),
    ("demo", "maybe", "demo: expected a boolean (true/false/1/0), got 'maybe'"),
    ("config", "other.yaml", "config: a config file cannot name another one"),
    ("learning_rat", 1, "unknown option 'learning_rat'"),
])
def test_config_file_errors_are_one_line_naming_the_file_and_key(tmp_path, capsys, suffix, key, value, problem):
    path = tmp_path / f"run{suffix}"
    path.write_text(yaml.safe_dump({key: value}) if suffix == ".yaml" else json.dumps({key: value}))
    err = error_of(["--config", str(path), "--output_dir", str(tmp_path / "out")], capsys)
    assert f"error: --config {path}: {problem}" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_binary_config_file_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(bytes(range(256)))
    err = error_of(["--config", str(path)], capsys)
    assert f"error: --config {path}: not a text file" in err and len(err.strip().splitlines()) == 1


def test_a_flag_without_effect_is_accepted_with_a_warning_in_a_file_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataloader_num_workers: 4\nmax_steps: 3\n")
    with pytest.warns(UserWarning, match="dataloader_num_workers: no effect"):
        from_file = parse_options(["--config", str(path)])
    with pytest.warns(UserWarning, match="--dataloader_num_workers: no effect"):
        from_flags = parse_options(["--dataloader_num_workers", "4", "--max_steps", "3"])
    assert from_file.training == from_flags.training


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 5e-5\nmax_steps: 7\nmodel_name_or_path: m\noutput_dir: out\n")
    opts = parse_options(["--config", str(path), "--learning_rate", "1e-5"])
    assert (opts.training.learning_rate, opts.training.max_steps, opts.model.model_name_or_path) == (1e-5, 7, "m")
    assert opts.out_dir == Path("out")


def test_axolotl_lisa_keys_are_our_options(tmp_path):
    expected = parse_options(["--lisa_activated_layers", "3", "--lisa_interval_steps", "7",
                              "--lisa_layers_attribute", "model.layers"]).lisa
    assert parse_options(["--lisa_n_layers", "3", "--lisa_step_interval", "7",
                          "--lisa_layers_attribute", "model.layers"]).lisa == expected
    path = tmp_path / "axolotl.yaml"
    path.write_text("lisa_n_layers: 3\nlisa_step_interval: 7\nlisa_layers_attribute: model.layers\n")
    assert parse_options(["--config", str(path)]).lisa == expected


def test_axolotl_layers_attribute_finds_the_layers(tmp_path, capsys):
    """axolotl's default lisa_layers_attribute, model.layers, is a path from the CausalLM, as ours."""
    path = tmp_path / "axolotl.yaml"
    path.write_text("lisa_n_layers: 1\nlisa_step_interval: 2\nlisa_layers_attribute: model.layers\n")
    assert main(["--demo", "--config", str(path), "--output_dir", str(tmp_path / "out"), *FAST]) == 0
    assert "1 of 8 layers every 2 steps" in capsys.readouterr().out


# ------------------------------------------------------------------------------- one-line errors, not tracebacks

@pytest.mark.parametrize("argv, flag", [
    (["--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1)"),
    (["--adam_beta2", "1.0"], "--adam_beta2 must be in [0, 1)"),
    (["--adam_epsilon", "-1"], "--adam_epsilon must be a finite number >= 0"),
    (["--report_to", "mlflowx"], "--report_to names unknown tracker(s) mlflowx"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number > 0, got inf"),
    (["--max_steps", "-2"], "--max_steps must be > 0, or -1"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be >= 1, got 0"),
    (["--max_steps", "-1", "--num_train_epochs", "inf"], "--num_train_epochs must be a finite number > 0"),
])
def test_out_of_range_values_are_refused_before_loading(tmp_path, capsys, argv, flag):
    err = error_of(["--demo", "--output_dir", str(tmp_path / "out"), *argv], capsys)
    assert f"lisa-finetune: error: {flag}" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_output_dir_problems_name_output_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    err = error_of(["--demo", "--output_dir", str(tmp_path / "file" / "out"), *FAST], capsys)
    assert "error: --output_dir" in err and "--output_model_path" not in err, err
    err = error_of(["--demo", "--output_dir", str(tmp_path / "o"), "--output_model_path",
                    str(tmp_path / "file" / "m"), *FAST], capsys)
    assert "error: --output_model_path" in err, err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_model_weights_are_a_one_line_error(tmp_path, capsys, tok, damage):
    from lisa_trainer.demo import build_demo_model, demo_dataset_path

    model_dir = tmp_path / "model"
    build_demo_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00not safetensors" * 64)
    err = error_of(["--model_name_or_path", str(model_dir), "--dataset_path", str(demo_dataset_path()),
                    "--output_dir", str(tmp_path / "out"), *FAST], capsys)
    line = [x for x in err.splitlines() if x.startswith("lisa-finetune: error:")]
    assert "Traceback" not in err and len(line) == 1, err
    assert f"--model_name_or_path {model_dir}: cannot read {weights}" in line[0]


def test_the_start_line_counts_offloaded_layers_parameters(tmp_path, capsys, monkeypatch):
    from lisa_trainer.demo import build_demo_model, build_demo_tokenizer
    from lisa_trainer.trainer import LisaTrainer

    def interrupted(self, resume_from_checkpoint=None, *, claim=None):  # the start line is printed before training
        raise KeyboardInterrupt

    monkeypatch.setattr(LisaTrainer, "train", interrupted)
    argv = ["--demo", "--output_model_path", str(tmp_path / "out"), "--gradient_checkpointing", "1",
            "--lisa_offload_frozen_layers", "4", *FAST]
    assert main(argv) == 130
    n_params = sum(p.numel() for p in build_demo_model(build_demo_tokenizer(), seed=0).parameters())
    assert f"{n_params / 1e6:.2f}M parameters" in capsys.readouterr().out


def test_a_peft_adapter_or_model_is_refused(tmp_path, capsys, monkeypatch):
    peft = pytest.importorskip("peft")
    import transformers

    from lisa_trainer.demo import build_demo_model, build_demo_tokenizer, demo_dataset_path

    def lora_model():
        return peft.get_peft_model(build_demo_model(build_demo_tokenizer(), seed=0), peft.LoraConfig(r=4))

    lora_model().save_pretrained(tmp_path / "adapter")  # adapter_config.json + the adapter weights
    rest = ["--dataset_path", str(demo_dataset_path()), "--output_model_path", str(tmp_path / "out"), *FAST]
    err = error_of(["--model_name_or_path", str(tmp_path / "adapter"), *rest], capsys)
    assert "--model_name_or_path" in err and "a peft adapter (adapter_config.json)" in err
    assert "merge_and_unload()" in err

    # A name whose loading brings adapters with the model (as a hub adapter repository's does).
    build_demo_tokenizer().save_pretrained(tmp_path / "named")
    build_demo_model(build_demo_tokenizer(), seed=0).config.save_pretrained(tmp_path / "named")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: lora_model())
    err = error_of(["--model_name_or_path", str(tmp_path / "named"), *rest], capsys)
    assert "--model_name_or_path" in err and "is a peft model" in err and "merge_and_unload()" in err


def test_an_empty_held_out_split_says_why(tmp_path, capsys):
    data = tmp_path / "one.json"
    data.write_text(json.dumps({"type": "text2text", "instances": [{"input": "Two plus two?", "output": "Four."}]}))
    argv = ["--dataset_path", str(data), "--output_dir", str(tmp_path / "out"), "--validation_split_percentage", "10",
            *FAST]
    why = "--validation_split_percentage 10 gave an empty held-out split: the data has a single sequence"
    with pytest.warns(UserWarning, match=why):
        assert main(argv) == 0
    assert f"held-out loss n/a ({why}" in capsys.readouterr().out


def test_resuming_with_another_batch_size_warns_where_the_data_continues(demo_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(demo_run[1], out)  # written with --per_device_train_batch_size 2, checkpoints at steps 2 and 4
    argv = ["--demo", "--output_model_path", str(out), "--resume_from_checkpoint", str(out / "checkpoint-2"), *FAST,
            "--per_device_train_batch_size", "4"]
    with pytest.warns(UserWarning) as seen:
        assert main(argv) == 0
    message = next(str(w.message) for w in seen if "resuming with" in str(w.message))
    assert message.startswith("resuming with --per_device_train_batch_size 4 x --gradient_accumulation_steps 1 = 4 "
                              "sequences per step; the checkpoint was written with --per_device_train_batch_size 2 x "
                              "--gradient_accumulation_steps 1 = 2")
    assert "continues at epoch 0, sequence 8 of the data order instead of epoch 0, sequence 4" in message
