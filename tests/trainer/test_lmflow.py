"""LMFlow's LISA scripts run unchanged: their flags verbatim on a tiny local model and conversation data, and the
options that come with them (templates, trackers, --use_lisa 0, a config file, LMFlow's layer path)."""

import importlib.util
import json

import pytest
import torch
import yaml

from lisa_trainer.cli import main
from lisa_trainer.runlog import read_log
from tiny_model import save_tiny_model

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")

FAST = ["--max_steps", "4", "--lisa_interval_steps", "2", "--block_size", "48", "--per_device_train_batch_size", "2",
        "--disable_tqdm"]


@pytest.fixture(scope="module")
def lmflow_inputs(tmp_path_factory):
    """A saved tiny Llama with its tokenizer, and a conversation dataset in LMFlow's format."""
    root = tmp_path_factory.mktemp("lmflow")
    save_tiny_model(root / "model")
    turns = [("Name a colour.", "Blue."), ("Two plus two?", "Four."), ("Capital of Italy?", "Rome."),
             ("Say hi.", "Hi!")]
    instances = [{"system": "Answer briefly.", "messages": [{"role": "user", "content": q},
                                                            {"role": "assistant", "content": a}]} for q, a in turns]
    (root / "data").mkdir()
    (root / "data" / "train.json").write_text(json.dumps({"type": "conversation", "instances": instances}))
    return root


def current_script(root, out):
    """scripts/run_finetune_with_lisa.sh, flag for flag (paths replaced)."""
    return ["--model_name_or_path", str(root / "model"), "--trust_remote_code", "0", "--dataset_path",
            str(root / "data"), "--output_dir", str(out), "--overwrite_output_dir", "--conversation_template", "llama3",
            "--use_lisa", "1", "--lisa_activated_layers", "1", "--lisa_interval_steps", "20", "--disable_group_texts",
            "1", "--num_train_epochs", "1", "--block_size", "512", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--learning_rate", "2e-5", "--lr_scheduler_type", "cosine", "--bf16",
            "--torch_dtype", "bfloat16", "--validation_split_percentage", "0", "--logging_steps", "20", "--do_train",
            "--ddp_timeout", "72000", "--save_steps", "5000", "--use_flash_attention", "0", "--gradient_checkpointing",
            "0", "--dataloader_num_workers", "8", "--report_to", "wandb", "--run_name", "finetune_lisa", "--seed", "42"]


def archived_script(root, out, optim="paged_adamw_32bit"):
    """scripts/archive/run_finetune_with_lisa.sh, flag for flag (paths and its shell variables filled in)."""
    return ["--model_name_or_path", str(root / "model"), "--trust_remote_code", "0", "--dataset_path",
            str(root / "data"), "--output_dir", str(out), "--overwrite_output_dir", "--conversation_template", "llama3",
            "--num_train_epochs", "1", "--learning_rate", "1e-5", "--disable_group_texts", "1", "--block_size", "512",
            "--per_device_train_batch_size", "1", "--bf16", "--torch_dtype", "bfloat16", "--run_name", "finetune",
            "--optim", optim, "--validation_split_percentage", "0", "--logging_steps", "20", "--do_train",
            "--ddp_timeout", "72000", "--save_steps", "5000", "--dataloader_num_workers", "1",
            "--gradient_checkpointing", "1", "--use_flash_attention", "0", "--gradient_accumulation_steps", "1",
            "--use_lisa", "1", "--lisa_activated_layers", "1", "--lisa_interval_steps", "20"]


def test_lmflow_script_runs_unchanged(lmflow_inputs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    with pytest.warns(UserWarning) as seen:
        assert main(current_script(lmflow_inputs, out)) == 0
    messages = " | ".join(str(w.message) for w in seen)
    assert "--dataloader_num_workers: no effect" in messages
    assert "the model trains in the dtype it was loaded in (bfloat16)" in messages  # --bf16 on a CPU, told truly
    if importlib.util.find_spec("wandb") is None:
        assert "--report_to wandb: the 'wandb' package is not installed" in messages
    model = AutoModelForCausalLM.from_pretrained(out)  # the model is in --output_dir, as LMFlow writes it
    assert next(model.parameters()).dtype == torch.bfloat16
    summary = read_log(out / "train_log.jsonl")[-1]
    assert summary["kind"] == "summary" and summary["steps"] == 4  # one epoch of 4 conversations, batch 1
    assert "Traceback" not in capsys.readouterr().err


def test_archived_script_with_a_paged_optimizer(lmflow_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    if importlib.util.find_spec("bitsandbytes") is None:
        assert main(archived_script(lmflow_inputs, out)) == 2
        assert "--optim paged_adamw_32bit needs the bitsandbytes package" in capsys.readouterr().err
        assert main(archived_script(lmflow_inputs, out, optim="adamw_torch")) == 0
    else:
        assert main(archived_script(lmflow_inputs, out)) == 0
    assert (out / "model.safetensors").is_file()


def test_lmflow_layer_path_and_use_lisa_0(lmflow_inputs, tmp_path):
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(lmflow_inputs / "model"), "--dataset_path", str(lmflow_inputs / "data"),
            "--output_dir", str(out), "--conversation_template", "chatml", *FAST, "--block_size", "160"]
    assert main([*args, "--lisa_layers_attribute", "model.model.layers", "--lisa_activated_layers", "1"]) == 0
    assert all(len(r["active_layers"]) == 1 for r in read_log(out / "train_log.jsonl") if r["kind"] == "step")
    assert main([*args, "--use_lisa", "0", "--overwrite_output_dir"]) == 0
    assert all(r["active_layers"] == [0, 1, 2] for r in read_log(out / "train_log.jsonl") if r["kind"] == "step")


def test_a_config_file_with_flags_overriding_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"demo": True, "max_steps": 3, "learning_rate": 2e-3, "block_size": 48,
                                      "lisa_activated_layers": 3, "per_device_train_batch_size": 2,
                                      "disable_tqdm": True}))
    out = tmp_path / "out"
    assert main(["--config", str(config), "--output_dir", str(out), "--max_steps", "2"]) == 0
    config_record = next(r for r in read_log(out / "train_log.jsonl") if r["kind"] == "config")
    assert config_record["args"]["learning_rate"] == 2e-3 and config_record["lisa"]["n_active_layers"] == 3
    assert config_record["max_steps"] == 2  # the flag wins over the file


def test_a_config_file_error_names_the_file_and_option(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"lisa_activated_layer": 2}))
    assert main(["--config", str(config)]) == 2
    assert f"--config {config}: unknown option 'lisa_activated_layer'" in capsys.readouterr().err


def test_report_to_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    assert main(["--demo", "--output_dir", str(out), "--report_to", "tensorboard", "--run_name", "tb", *FAST]) == 0
    assert list((out / "runs" / "tb").glob("events.out.tfevents.*"))


def test_other_lmflow_flags_are_accepted_with_one_warning(tmp_path):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"--use_lora, --lora_r, --dataloader_pin_memory: no effect") as seen:
        code = main(["--demo", "--output_dir", str(out), *FAST, "--use_lora", "1", "--lora_r", "8",
                     "--dataloader_pin_memory=False"])
    assert code == 0
    assert sum("no effect in lisa-finetune" in str(w.message) for w in seen) == 1
