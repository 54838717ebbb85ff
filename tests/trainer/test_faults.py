"""Faults a real run meets: two runs in one folder, NaN training, a full disk, a file-size limit, a read-only or
misnamed output folder, damaged checkpoints, a block size the model cannot take, a save killed half-way, a resume
in the middle of a LISA period, a run log cut short or unwritable. Each ends with one line naming the path, flag or
limit, and loses nothing."""

import errno
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time

import pytest
import torch
from crash import crash_after

from lisa_trainer.checkpoint import MODEL_FILE, STATE_FILE, CheckpointError, CheckpointWriteError, list_checkpoints, read_checkpoint_state
from lisa_trainer.cli import main
from lisa_trainer import LisaConfig
from lisa_trainer.data import load_and_tokenize
from lisa_trainer.demo import build_demo_model, build_demo_tokenizer, demo_dataset_path
from lisa_trainer.run_folder import LOCK_FILE, RunFolderError
from lisa_trainer import runlog
from lisa_trainer.runlog import LOG_FILE, read_log
from lisa_trainer.sampler import parse_layer_weights
from lisa_trainer.trainer import LisaTrainer, LisaTrainingArguments, TrainingDiverged

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


@pytest.fixture(scope="module")
def data(tok):
    return load_and_tokenize(demo_dataset_path(), tok, block_size=48)


def trainer(out, tok, data, **kw):
    args = dict(output_dir=str(out), learning_rate=3e-3, max_steps=8, per_device_train_batch_size=3, warmup_steps=0,
                progress=False, save_model=False, seed=5)
    args.update(kw)
    lisa = LisaConfig(n_active_layers=2, interval_steps=3, seed=11, state_policy="keep")
    return LisaTrainer(build_demo_model(tok, seed=1, **SMALL), tok, data, LisaTrainingArguments(**args), lisa)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 (n_positions=64) with the demo's byte tokenizer, saved as a Hugging Face model folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_demo_tokenizer()
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=4, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def gpt2_run(model_dir, out, *more):
    return ["--model_name_or_path", str(model_dir), "--dataset_path", str(demo_dataset_path()),
            "--output_model_path", str(out), "--block_size", "32", "--per_device_train_batch_size", "2",
            "--lisa_interval_steps", "2", "--lisa_state_policy", "keep", "--disable_tqdm", *more]


def error_line(err: str) -> str:
    """The one error line (other lines may be library warnings); never a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("lisa-finetune: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------ one run per folder


def test_a_second_run_in_the_same_folder_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, gpt2_dir, capsys):
    """The first run is another process (killed later); the second and third run here, in the test's process."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # FusedAdamW's PyTorch path: the Triton interpreter would only slow it down
    first = subprocess.Popen([sys.executable, "-m", "lisa_trainer.cli", *gpt2_run(gpt2_dir, out, "--max_steps", "10000")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock, deadline = out / LOCK_FILE, time.monotonic() + 120
        while first.poll() is None and time.monotonic() < deadline and not (lock.is_file() and lock.read_text().strip()):
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()
        assert main(gpt2_run(gpt2_dir, out, "--max_steps", "1")) == 2
        line = error_line(capsys.readouterr().err)
        assert f"--output_dir {out}: another run (pid {first.pid}) is using this output folder" in line
    finally:
        first.kill()
        first.communicate()
    assert main(gpt2_run(gpt2_dir, out, "--max_steps", "1", "--overwrite_output_dir")) == 0  # no stale lock


def test_a_new_run_leaves_an_older_runs_checkpoints_alone_and_latest_is_its_own(tmp_path, tok, data):
    old = trainer(tmp_path, tok, data, max_steps=4, save_steps=2)
    old.train()
    old_log = (tmp_path / "train_log.jsonl").read_bytes()
    with pytest.raises(RunFolderError, match="another run's files.*train_log.jsonl.*--overwrite_output_dir"):
        trainer(tmp_path, tok, data, max_steps=3, save_steps=1).train()
    assert (tmp_path / "train_log.jsonl").read_bytes() == old_log  # refused before touching anything

    new = trainer(tmp_path, tok, data, max_steps=3, save_steps=1, save_total_limit=1, overwrite_output_dir=True, seed=6)
    new.train()
    assert new.run_id != old.run_id
    # The new run replaced the old checkpoint-2 with its own, then pruned only its own checkpoints to the newest one;
    # the old run's checkpoint-4 stays, newest by step but not this run's.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    resumed = trainer(tmp_path, tok, data, max_steps=3, save_steps=1, seed=6)
    resumed.train(resume_from_checkpoint="latest")
    assert resumed.run_id == new.run_id
    steps = [r["step"] for r in read_log(tmp_path / "train_log.jsonl") if r["kind"] == "step"]
    assert steps == [1, 2, 3]  # resumed at 3 (its own), not at the old run's 4


# ------------------------------------------------------------------------------------------ non-finite training


def test_nan_training_skips_steps_then_stops_without_saving_nan_weights(tmp_path, gpt2_dir, capsys):
    out = tmp_path / "out"
    argv = gpt2_run(gpt2_dir, out, "--learning_rate", "1e10", "--max_steps", "20", "--save_steps", "1",
                    "--max_nonfinite_steps", "3", "--max_grad_norm", "0")
    assert main(argv) == 1
    line = error_line(capsys.readouterr().err)
    steps = [r for r in read_log(out / "train_log.jsonl") if r["kind"] == "step"]
    skipped = [r["step"] for r in steps if r.get("skipped")]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    assert f"stopped at step {skipped[-1]}" in line and "lower learning rate" in line
    assert not (out / MODEL_FILE).exists()  # no final model
    from safetensors.torch import load_file

    for ckpt in list_checkpoints(out):  # every checkpoint written holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / MODEL_FILE).values()), ckpt


def test_non_finite_weights_are_never_saved(tmp_path, tok, data):
    t = trainer(tmp_path, tok, data)
    t.train_step()
    t.save_checkpoint()
    with torch.no_grad():
        t.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="model.layers.1.mlp.down_proj.weight"):
        t.save_model(tmp_path / "final")
    with pytest.raises(TrainingDiverged):
        t.save_checkpoint()
    assert not (tmp_path / "final").exists() and [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]


# ------------------------------------------------------------------------------------------------ environment


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a small tmpfs (root only); skipped where this process may not mount."""
    mounted = []

    def mount(size: int, *, read_only: bool = False):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("making a small filesystem needs root and mount(8)")
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_during_a_save_keeps_the_earlier_checkpoint(tmp_path, tok, data, mount_tmpfs):
    probe = trainer(tmp_path / "probe", tok, data)
    probe.train_step()
    size = sum(f.stat().st_size for f in probe.save_checkpoint().iterdir())
    disk = mount_tmpfs(size * 3 // 2)  # room for one checkpoint, not two
    t = trainer(disk / "out", tok, data, max_steps=3, save_steps=1)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-2: cannot write the checkpoint: no space left on"):
        t.train()
    assert [p.name for p in list_checkpoints(disk / "out")] == ["checkpoint-1"]
    assert read_checkpoint_state(disk / "out" / "checkpoint-1")["trainer"]["step"] == 1
    assert not any(p.name.startswith(".checkpoint-") for p in (disk / "out").iterdir())  # no half-written folder


def test_file_size_limit_during_a_save_is_one_line(tmp_path, gpt2_dir, capsys):
    limit = 40_000  # the tiny GPT-2's model.safetensors is ~230 KB; the log stays far below
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # Python ignores SIGXFSZ: a write fails with EFBIG
    try:
        code = main(gpt2_run(gpt2_dir, out, "--max_steps", "2", "--save_steps", "1"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    line = error_line(capsys.readouterr().err)
    assert code == 1 and "checkpoint-1: cannot write the checkpoint" in line and f"(ulimit -f) of {limit} bytes" in line
    assert not any("checkpoint-" in p.name for p in out.iterdir())


def test_unusable_output_folders_are_named_before_the_model_loads(tmp_path, mount_tmpfs, capsys, monkeypatch):
    import lisa_trainer.demo

    def no_model(*a, **k):
        raise AssertionError("the model was built before the output folder was checked")

    monkeypatch.setattr(lisa_trainer.demo, "build_demo_model", no_model)
    (tmp_path / "a_file").write_text("")
    assert main(["--demo", "--output_dir", str(tmp_path / "a_file" / "out"), "--output_model_path", str(tmp_path / "m")]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--output_dir" in line and f"{tmp_path / 'a_file'} is a file" in line

    read_only = mount_tmpfs(1 << 20, read_only=True)
    assert main(["--demo", "--output_model_path", str(read_only)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--output_model_path {read_only}: not writable (Read-only file system)" in line


@pytest.mark.parametrize("damaged", [MODEL_FILE, STATE_FILE])
def test_a_truncated_checkpoint_file_is_named(tmp_path, tok, data, damaged):
    t = trainer(tmp_path, tok, data, max_steps=2, save_steps=2)
    t.train()
    path = tmp_path / "checkpoint-2" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"checkpoint-2/{damaged}: damaged or truncated") as err:
        trainer(tmp_path, tok, data, max_steps=2, save_steps=2).train(resume_from_checkpoint="latest")
    assert "\n" not in str(err.value)


def test_block_size_is_checked_against_the_models_positions(tmp_path, gpt2_dir, capsys):
    assert main(gpt2_run(gpt2_dir, tmp_path / "out", "--max_steps", "1", "--block_size", "128")) == 2
    line = error_line(capsys.readouterr().err)
    assert "--block_size 128 exceeds the model's n_positions=64" in line
    assert main(["--demo", "--output_model_path", str(tmp_path / "demo"), "--block_size", "1"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--block_size must be at least 2" in line and "--dataset_path" not in line


# ------------------------------------------------------------------------------------------------------ smaller


def test_a_killed_saves_folders_are_cleared_at_startup(tmp_path, tok, data):
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # a pid whose process has ended
    alive = os.getppid()
    (tmp_path / f".checkpoint-4.tmp-{gone.pid}").mkdir(parents=True)
    (tmp_path / f".checkpoint-6.tmp-{alive}").mkdir()
    (tmp_path / f".checkpoint-8.old-{gone.pid}").mkdir()  # killed between moving checkpoint-8 aside and replacing it
    (tmp_path / f".checkpoint-8.old-{gone.pid}" / STATE_FILE).touch()
    trainer(tmp_path, tok, data, max_steps=1, overwrite_output_dir=True).train()
    assert not (tmp_path / f".checkpoint-4.tmp-{gone.pid}").exists()
    assert (tmp_path / f".checkpoint-6.tmp-{alive}").exists()  # maybe still saving: left alone
    assert (tmp_path / "checkpoint-8" / STATE_FILE).exists() and not (tmp_path / f".checkpoint-8.old-{gone.pid}").exists()


def test_a_period_cut_by_a_resume_logs_the_same_update_norms(tmp_path, tok, data):
    """Periods of 3 steps, checkpoint at step 4: period 1 (steps 3-5) is cut; its record must match the full run's."""
    trainer(tmp_path / "full", tok, data, save_steps=4).train()

    crash_after(trainer(tmp_path / "part", tok, data, save_steps=4), 5)
    trainer(tmp_path / "part", tok, data, save_steps=4).train(resume_from_checkpoint="latest")

    def periods(out):
        return [r for r in read_log(out / "train_log.jsonl") if r["kind"] == "period"]

    full, resumed = periods(tmp_path / "full"), periods(tmp_path / "part")
    assert [p["period"] for p in full] == [0, 1, 2]
    assert resumed == full  # first_step, partial, layers and every update norm


# ------------------------------------------------------------------------------------------------------ run log

# What a kill or a full disk leaves of a record being appended.
CUT_RECORD = '{"kind": "step", "step": 6, "epoch": 1.2, "loss": 2.71, "lr": 0.003, "grad_'


def killed_while_logging(out, tok, data) -> str:
    """A run with checkpoint-4, killed while appending step 6's record: its log ends in a cut line. Returns the log
    as it was before that line."""
    crash_after(trainer(out, tok, data, save_steps=4), 5)
    whole = (out / LOG_FILE).read_text()
    with open(out / LOG_FILE, "a") as f:
        f.write(CUT_RECORD)
    return whole


def cut_line_warnings(caught, log) -> list[str]:
    return [str(w.message) for w in caught if str(log) in str(w.message)]


@pytest.mark.parametrize("resume", ["latest", "checkpoint-4", "checkpoint-4 --overwrite_output_dir"])
def test_a_cut_last_log_line_is_ignored_and_the_history_kept(tmp_path, tok, data, resume):
    before = killed_while_logging(tmp_path, tok, data)
    log, cut_line = tmp_path / LOG_FILE, len(before.splitlines()) + 1
    resumed = trainer(tmp_path, tok, data, save_steps=4, overwrite_output_dir="overwrite" in resume)
    with pytest.warns(UserWarning) as caught:
        resumed.train(resume_from_checkpoint="latest" if resume == "latest" else tmp_path / resume.split()[0])
    found = cut_line_warnings(caught, log)
    assert len(found) == 1 and f"{log}, line {cut_line}: cut short" in found[0], found
    kept = [line for line in before.splitlines() if json.loads(line)["step"] <= 4]
    assert log.read_text().splitlines()[: len(kept)] == kept  # the history up to the checkpoint, byte for byte
    assert [r["step"] for r in read_log(log) if r["kind"] == "step"] == list(range(1, 9))


def test_a_failed_log_rewrite_at_resume_leaves_the_log_whole(tmp_path, tok, data):
    """The resume rewrites the log without the records after the checkpoint; a write failing half-way (here the
    file-size limit) must leave the old log as it was, and name it."""
    killed_while_logging(tmp_path, tok, data)
    log = tmp_path / LOG_FILE
    whole = log.read_bytes()
    resumed = trainer(tmp_path, tok, data, save_steps=4)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(whole) // 3, hard))  # the config record alone is about half
    try:
        with pytest.raises(OSError, match=rf"{re.escape(str(log))}: cannot write the run log: a file would exceed"), \
                pytest.warns(UserWarning, match="cut short"):
            resumed.train(resume_from_checkpoint="latest")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert log.read_bytes() == whole
    assert [p.name for p in tmp_path.iterdir() if LOG_FILE in p.name] == [LOG_FILE]  # no temporary file left
    with pytest.warns(UserWarning, match="cut short"):
        trainer(tmp_path, tok, data, save_steps=4).train(resume_from_checkpoint="latest")
    assert [r["step"] for r in read_log(log) if r["kind"] == "step"] == list(range(1, 9))


def test_a_full_disk_while_logging_names_the_log(tmp_path, gpt2_dir, capsys, monkeypatch):
    real_open = open

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        return FullDisk(opened) if "a" in mode else opened  # appends fail; the rest works

    monkeypatch.setattr(runlog, "open", open_on_a_full_disk, raising=False)
    out = tmp_path / "out"
    assert main(gpt2_run(gpt2_dir, out, "--max_steps", "2")) == 1
    line = error_line(capsys.readouterr().err)
    assert f"{out / LOG_FILE}: cannot write the run log: no space left on the device of {out}" in line


def test_a_kill_during_the_final_save_logs_the_last_period_once(tmp_path, tok, data):
    """Periods of 3 steps, 7 steps, a checkpoint at step 7: the one-step period 2 is logged when training ends, then
    the final save is killed. The resumed run logs that period again; the log must hold it once."""
    killed = trainer(tmp_path, tok, data, max_steps=7, save_steps=7, save_model=True)

    def killed_save(path):
        raise KeyboardInterrupt

    killed.save_model = killed_save
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    periods = [r for r in read_log(tmp_path / LOG_FILE) if r["kind"] == "period"]
    assert [p["period"] for p in periods] == [0, 1, 2] and periods[-1]["partial"]

    trainer(tmp_path, tok, data, max_steps=7, save_steps=7, save_model=True).train(resume_from_checkpoint="latest")
    records = read_log(tmp_path / LOG_FILE)
    assert [r for r in records if r["kind"] == "period"] == periods
    assert [r["kind"] for r in records].count("summary") == 1 and (tmp_path / MODEL_FILE).is_file()


def test_layer_weights_from_a_log_with_a_cut_line(tmp_path, tok, data, capsys):
    before = killed_while_logging(tmp_path / "run", tok, data)
    log, cut_line = tmp_path / "run" / LOG_FILE, len(before.splitlines()) + 1
    (tmp_path / "whole.jsonl").write_text(before)
    expected = parse_layer_weights(str(tmp_path / "whole.jsonl"))
    with pytest.warns(UserWarning) as caught:
        assert parse_layer_weights(str(log)) == expected
    found = cut_line_warnings(caught, log)
    assert len(found) == 1 and f"{log}, line {cut_line}: cut short" in found[0], found

    damaged = tmp_path / "damaged.jsonl"  # a damaged line that is not the last: no crash leaves that, so refused
    lines = before.splitlines()
    damaged.write_text("\n".join([*lines[:2], lines[2][:30], *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(damaged))}, line 3: not a JSON record"):
        parse_layer_weights(str(damaged))
    with pytest.raises(SystemExit) as exited:  # argparse rejects the value
        main(["--demo", "--output_model_path", str(tmp_path / "out"), "--lisa_layer_weights", str(damaged)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert f"--lisa_layer_weights: {damaged}, line 3: not a JSON record (Unterminated string" in err
