"""The benchmark harness and bench_finetune at its tiny CPU size: every method runs and reports every figure."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common
from benchmarks.bench_finetune import SHAPES

ROOT = Path(__file__).resolve().parents[2]

METHODS = ("full", "lora", "lisa-park", "lisa-park-torch", "lisa-reset", "lisa-keep", "lisa-public", "trainer-lisa",
           "trainer-lisa-find-unused")
HAS_PEFT = importlib.util.find_spec("peft") is not None


def test_percentiles_and_summary():
    assert common.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert common.percentile([5.0], 20) == 5.0
    s = common.summarize([float(x) for x in range(1, 11)])
    assert (s["median_ms"], s["p20_ms"], s["p80_ms"], s["repeats"]) == (5.5, 2.8, 8.2, 10)
    with pytest.raises(ValueError):
        common.percentile([], 50)


def test_time_fn_and_copy_bandwidth_on_cpu():
    calls = []
    t = common.time_fn(lambda: calls.append(1), warmup=2, repeats=5, device="cpu")
    assert len(calls) == 7 and t["repeats"] == 5
    assert 0 <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
    with pytest.raises(ValueError):
        common.time_fn(lambda: None, repeats=0, device="cpu")
    bw = common.measure_copy_bandwidth("cpu", nbytes=1 << 20, repeats=3)
    assert bw["bytes"] == 1 << 20 and bw["gbps"] > 0


def test_write_results_environment_and_results_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LISA_BENCH_RESULTS", str(tmp_path / "chosen"))
    path = common.write_results("unit", {"rows": [1, 2]}, device="cpu")
    assert path == tmp_path / "chosen" / "unit-cpu.json"
    data = json.loads(path.read_text())
    assert data["rows"] == [1, 2]
    env = data["environment"]
    for key in ("device", "torch", "triton", "transformers", "python", "git_commit", "date_utc"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["date_utc"].endswith("Z")
    # An explicit folder (a benchmark's --results-dir) wins over the variable; without either, benchmarks/results.
    explicit = common.write_results("unit", {}, device="cpu", results_dir=tmp_path / "res")
    assert explicit == tmp_path / "res" / "unit-cpu.json"
    monkeypatch.delenv("LISA_BENCH_RESULTS")
    assert common.results_folder() == ROOT / "benchmarks" / "results"


def test_table_formatting():
    text = common.format_table([{"method": "full", "ms": 12.345, "gb": None}, {"method": "lisa-park", "ms": 1.5}],
                               title="t")
    lines = text.splitlines()
    assert lines[0] == "t" and lines[1].split() == ["method", "ms", "gb"]
    assert lines[3].split() == ["full", "12.3", "-"] and lines[4].split() == ["lisa-park", "1.5", "-"]


@pytest.fixture(scope="module")
def finetune_tiny(tmp_path_factory):
    """One CPU run of every method: 3 steps, K=2, so each LISA method crosses one switch after its warm-up step."""
    results = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as the CLI runs it
    cmd = [sys.executable, "-m", "benchmarks.bench_finetune", "--shape", "tiny", "--device", "cpu", "--steps", "3",
           "--interval", "2", "--warmup", "1", "--results-dir", str(results)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((results / "finetune-tiny-cpu.json").read_text()), proc.stdout, results


def test_finetune_reports_every_method_with_its_figures(finetune_tiny):
    data, stdout, results = finetune_tiny
    by = {r["method"]: r for r in data["results"]}
    assert list(by) == list(METHODS)
    assert data["config"]["shape"] == "tiny" and data["config"]["steps"] == 3
    assert data["environment"]["device_type"] == "cpu"
    for method, r in by.items():
        if method == "lora" and not HAS_PEFT:
            assert r["status"].startswith("unavailable"), r
            continue
        assert r["status"] == "ok", r
        assert r["median_step_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["p20_step_ms"] <= r["median_step_ms"] <= r["p80_step_ms"]
        assert len(r["losses"]) == len(r["step_times_ms"]) == 3 and math.isfinite(r["loss_final"])
        assert r["device_state_gb"] > 0
        assert r["peak_allocated_gb"] is None and r["peak_reserved_gb"] is None  # no GPU figures on CPU
        if "lisa" in method:
            assert r["switch_steps"] == [2] and isinstance(r["switch_stall_ms"], float)
        else:
            assert r["switch_steps"] == [] and r["switch_stall_ms"] is None
    # Same model, same data: every method starts from the same loss.
    firsts = {r["loss_first"] for r in by.values() if r["status"] == "ok"}
    assert max(firsts) - min(firsts) < 1e-5
    for method in METHODS:
        assert method in stdout
    assert (results / "finetune-tiny-cpu.png").stat().st_size > 0


def test_finetune_memory_figures_tell_the_state_policies_apart(finetune_tiny):
    """After the switch, "keep" and the public style hold two periods' layers of state, "park" and "reset" one."""
    by = {r["method"]: r for r in finetune_tiny[0]["results"]}
    state = {m: by[m]["device_state_gb"] for m in METHODS if by[m]["status"] == "ok"}
    assert state["lisa-park"] == pytest.approx(state["lisa-reset"])
    # torch AdamW parks like FusedAdamW (the same host bytes); it holds dense embedding state, ours moments for the
    # touched rows only (build_optimizer's default), so on the device the two differ by part of the embedding's
    # fp32 moments.
    cfg = SHAPES["tiny"]["config"]
    embedding_moments_gb = cfg["vocab_size"] * cfg["hidden_size"] * 4 * 2 / 1e9
    for torch_adamw, ours in (("lisa-park-torch", "lisa-park"), ("lisa-public", "lisa-keep")):
        assert 0 < state[torch_adamw] - state[ours] < embedding_moments_gb
    assert by["lisa-park-torch"]["host_state_gb"] == pytest.approx(by["lisa-park"]["host_state_gb"])
    assert state["lisa-park"] < state["lisa-keep"] < state["full"]
    assert by["lisa-park"]["host_state_gb"] > 0 and by["lisa-keep"]["host_state_gb"] is None
    # Only the active set is trainable at the end; the public style and ours train the same parameters.
    assert by["lisa-park"]["trainable_params"] < by["full"]["trainable_params"]
    assert by["lisa-public"]["params_ever_updated"] == by["lisa-keep"]["params_ever_updated"]
    comparisons = finetune_tiny[0]["comparisons"]
    assert comparisons["memory_figure"] == "device_state_gb"
    assert comparisons["park_memory_vs_full"] == pytest.approx(state["lisa-park"] / state["full"])


def test_finetune_with_frozen_layers_in_host_memory_trains_alike_with_less_device_state():
    """--offload-frozen-layers (with --gradient-checkpointing): the same losses, the frozen layers' weights off the
    device; --memory-limit-gb is refused without a positive value."""
    from benchmarks import bench_finetune

    runs = {}
    for offload in (0, 8):
        args = bench_finetune.parse_args(["--shape", "tiny", "--device", "cpu", "--steps", "3", "--interval", "2",
                                          "--methods", "lisa-park", "--gradient-checkpointing",
                                          "--offload-frozen-layers", str(offload)])
        device, dtype, _ = bench_finetune.resolve(args)
        runs[offload] = bench_finetune.run_method("lisa-park", args, device, dtype, isolated=False)
    assert runs[0]["status"] == runs[8]["status"] == "ok"
    assert runs[0]["losses"] == runs[8]["losses"]
    cfg = SHAPES["tiny"]["config"]
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    layer_bytes = 4 * (2 * h * h + 2 * h * h // 2 + 3 * h * i + 2 * h)  # fp32 on CPU; k/v: 2 of 4 heads
    frozen = cfg["num_hidden_layers"] - 2
    assert runs[0]["device_state_gb"] - runs[8]["device_state_gb"] == pytest.approx(frozen * layer_bytes / 1e9)
    with pytest.raises(SystemExit):
        bench_finetune.parse_args(["--offload-frozen-layers", "4"])  # without --gradient-checkpointing


def test_finetune_chunked_loss_equals_the_model_loss():
    from benchmarks import bench_finetune
    from lisa_trainer.loss import ChunkedCausalLMLoss

    model = bench_finetune.build_model("tiny", torch.device("cpu"), torch.float32, 0)
    batch = bench_finetune.make_batches(SHAPES["tiny"]["config"]["vocab_size"], 2, 17, 1, 0)[0]
    plain = bench_finetune.step_loss(model, batch, None)
    chunked = bench_finetune.step_loss(model, batch, ChunkedCausalLMLoss(model))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
