"""Sampling options in the controller (auto weights, coverage-balanced) and the quality benchmark's quick mode."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from lisa_trainer import LisaConfig, LisaController, build_optimizer
from lisa_trainer.sampler import parse_layer_weights
from lisa_trainer.sampler import auto_layer_weights

REPO = Path(__file__).resolve().parents[2]
N_LAYERS = 6


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=N_LAYERS,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                      max_position_embeddings=16)
    return transformers.AutoModelForCausalLM.from_config(config)


def run(model, optimizer, controller, steps):
    schedule = []
    for step in steps:
        controller.on_step_begin(step)
        ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        controller.on_step_end(step)
        schedule.append(controller.active_layers)
    return schedule


@pytest.mark.usefixtures("pytorch_optimizer_path")
@pytest.mark.parametrize("stop", [9, 10])  # in the middle of period 4, at the start of period 5
def test_auto_weights_survive_a_state_dict_round_trip(stop):
    cfg = LisaConfig(n_active_layers=2, interval_steps=2, seed=3, layer_weights="auto", state_policy="keep")
    total = 20
    model = tiny_llama()
    opt = build_optimizer(model, cfg, lr=1e-2)
    ctrl = LisaController(model, opt, cfg)
    schedule = run(model, opt, ctrl, range(total))
    # The weights the run used are the pure function of its own log; they moved away from uniform.
    weights = auto_layer_weights(ctrl.period_log, N_LAYERS, 9)
    assert weights is not None and len(set(weights)) > 1 and min(weights) > 0
    assert ctrl.layers_for_period(9) == ctrl.sampler.layers_for_period(9, weights) == schedule[18]

    model = tiny_llama()
    opt = build_optimizer(model, cfg, lr=1e-2)
    ctrl = LisaController(model, opt, cfg)
    run(model, opt, ctrl, range(stop))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), json.loads(json.dumps(ctrl.state_dict()))))
    assert saved[2]["layer_weights"] == "auto" and saved[2]["sampling"] == "uniform"

    model = tiny_llama()
    model.load_state_dict(saved[0])
    opt = build_optimizer(model, cfg, lr=1e-2)
    ctrl = LisaController(model, opt, cfg, start_step=stop)
    opt.load_state_dict(saved[1])
    ctrl.load_state_dict(saved[2])
    # Every period the log already decides is the same; with a checkpoint at a period boundary, all of them.
    decided = stop // 2 + 1  # periods whose weights use only periods that ended before the checkpoint
    assert [ctrl.layers_for_period(p) for p in range(decided + 1)] == schedule[:2 * decided + 1:2]
    resumed = run(model, opt, ctrl, range(stop, total))
    if stop % cfg.interval_steps == 0:
        assert resumed == schedule[stop:]


@pytest.mark.usefixtures("pytorch_optimizer_path")
def test_balanced_sampling_in_the_controller_trains_every_layer_equally():
    cfg = LisaConfig(n_active_layers=2, interval_steps=1, seed=0, sampling="balanced", state_policy="reset")
    model = tiny_llama()
    opt = build_optimizer(model, cfg, lr=1e-2)
    ctrl = LisaController(model, opt, cfg)
    schedule = run(model, opt, ctrl, range(2 * N_LAYERS // 2))  # two cycles of 3 periods
    counts = [sum(i in layers for layers in schedule) for i in range(N_LAYERS)]
    assert counts == [2] * N_LAYERS
    other = LisaController(model, opt, LisaConfig(n_active_layers=2, interval_steps=1, seed=0))
    with pytest.raises(ValueError, match="sampling='uniform' but this run has sampling='balanced'"):
        ctrl.load_state_dict(other.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer_weights="automatic"), "layer_weights must be None, 'auto', 'outlier' or a sequence"),
    (dict(sampling="stratified"), "sampling must be one of"),
    (dict(sampling="balanced", layer_weights="auto"), "sampling 'balanced'.*takes no"),
    (dict(sampling="balanced", layer_weights=[1, 1, 1, 1]), "sampling 'balanced'.*takes no"),
    (dict(layer_weights="auto", track_update_norms=False), "needs LisaConfig.track_update_norms=True"),
])
def test_config_refuses_contradictory_sampling_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LisaConfig(**kwargs)


def test_cli_accepts_auto_weights():
    assert parse_layer_weights("auto") == "auto"
    assert parse_layer_weights("1,2") == [1.0, 2.0]


def test_quality_benchmark_quick_mode_runs_and_reports(tmp_path):
    """--quick on an empty cache: pretrains a tiny model in seconds, fine-tunes every method, prints the tables."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}  # as users run it
    cmd = [sys.executable, "-m", "benchmarks.bench_quality", "--quick", "--device", "cpu",
           "--cache", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "results" / "quality-quick-cpu.json").read_text())
    assert not data["pretraining"]["from_cache"] and list((tmp_path / "cache").glob("pretrained-*.pt"))
    assert {r["method"] for r in data["best_per_method"]} == {"full", "lora-r4", "lisa-park", "lisa-reset",
                                                              "lisa-keep"}
    for r in data["methods"] + data["sampling_runs"]:
        assert r["eval_loss"] > 0 and r["train_seconds"] > 0 and r["device_state_mb"] > 0
    options = [row["option"] for row in data["sampling"]]
    assert options[0] == "lisa-park γ=1 K=2" and any("balanced" in o for o in options)
    assert any("weights=auto" in o for o in options) and any("γ=2" in o for o in options)
    assert data["sampling"][0]["mean_vs_uniform"] == 0
    assert data["environment"]["device_type"] == "cpu" and data["environment"]["git_commit"]
    assert "Best learning rate per method" in proc.stdout and "LISA sampling over seeds" in proc.stdout
    assert (tmp_path / "results" / "quality-quick-cpu.png").stat().st_size > 0
    # Same model, park and keep do the same arithmetic (only where the moments live differs).
    by = {r["method"]: r for r in data["methods"]}
    assert by["lisa-park"]["eval_loss"] == by["lisa-keep"]["eval_loss"]


def test_moment_dtype_study_quick_mode_compares_the_three_moment_dtypes(tmp_path):
    """--study moment-dtype: fp32, bf16 for the embedding and head, bf16 everywhere; the bf16 moments are what the
    optimizer kept (half the device state of fp32's for the tensors concerned)."""
    from benchmarks import bench_quality

    bench_quality.main(["--quick", "--device", "cpu", "--study", "moment-dtype", "--cache", str(tmp_path / "cache"),
                        "--results-dir", str(tmp_path / "results")])
    data = json.loads((tmp_path / "results" / "quality-moment-dtype-quick-cpu.json").read_text())
    options = [row["option"] for row in data["summary"]]
    assert len(options) == 3 and "float32" in options[0] and "embedding/head moments bfloat16" in options[1]
    assert "all moments bfloat16" in options[2]
    state = {}
    for r in data["runs"]:
        state.setdefault(r["label"], set()).add(r["device_state_mb"])
    fp32, lean_head, lean_all = (min(state[o]) for o in options)
    assert fp32 > lean_head > lean_all


def test_sampling_study_quick_mode_runs_every_rule_at_equal_budget(tmp_path):
    """--study sampling: uniform, auto, outlier and module-wise LISA park; module-wise holds no more device state
    than whole layers (its budget is γ layers' parameters)."""
    from benchmarks import bench_quality

    bench_quality.main(["--quick", "--device", "cpu", "--study", "sampling", "--cache", str(tmp_path / "cache"),
                        "--results-dir", str(tmp_path / "results"), "--ft-steps", "6"])
    data = json.loads((tmp_path / "results" / "quality-sampling-quick-cpu.json").read_text())
    assert data["config"]["ft_steps"] == 6  # --ft-steps: longer (here shorter) runs of the same size
    rows = {row["option"]: row for row in data["summary"]}
    assert list(rows) == ["lisa-park γ=1 K=2", "lisa-park γ=1 K=2 weights=auto", "lisa-park γ=1 K=2 weights=outlier",
                          "lisa-park γ=1 K=2 module-wise"]
    uniform, *_, module = rows.values()
    assert uniform["vs_uniform"] == [0.0] and not uniform["beats_uniform"]
    assert 0 < module["max_device_state_mb"] <= uniform["max_device_state_mb"]


def test_large_size_adds_the_modules_inside_packages_without_moving_any_module():
    """--size large asks about `email.message`, `json`, ... too; a module's split depends on its name alone, so every
    module held out at the full size stays held out, and no test suite becomes text."""
    from benchmarks.bench_quality import SIZES, parse_args, result_name
    from benchmarks.quality_data import split_modules, stdlib_modules

    top, everything = stdlib_modules(), stdlib_modules(packages=True)
    assert SIZES["large"].packages and not SIZES["full"].packages
    assert set(top) < set(everything) and {"email.message", "json", "unittest.mock"} <= set(everything)
    assert not [m for m in everything if {"test", "tests", "idle_test"} & set(m.split("."))]
    small, large = split_modules(top), split_modules(everything)
    for part in small:
        assert set(small[part]) <= set(large[part])
    assert sum(map(len, large.values())) == len(everything)
    assert result_name("-sampling", parse_args(["--size", "large"])) == "quality-sampling-large"
    assert result_name("", parse_args(["--size", "large", "--ft-steps", "480"])) == "quality-large-480steps"
    assert result_name("-sampling", parse_args(["--ft-steps", "240"])) == "quality-sampling-240steps"
