"""lisa-finetune end to end: the demo, resume, Ctrl-C, the summary, one-line errors naming the flag or path (config
files: test_cli_config_files.py)."""

import json

import pytest
import torch
from cli_runs import FAST, error_of

from lisa_trainer.cli import main
from lisa_trainer.sampler import parse_layer_weights
from lisa_trainer.runlog import read_log

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
