"""Checkpoints under torchrun (2 CPU processes, gloo): every rank writes its own shards through
torch.distributed.checkpoint, parked state goes from the host bank to the file and back without visiting the device,
rank 0's host memory grows by about one tensor while saving (not by the checkpoint), a rank killed while saving
leaves the previous checkpoint newest and resumable, the final FSDP model is written in Hugging Face shards, and
nothing in a checkpoint is unpickled.

Resume and resharding (2 ranks -> 1 process, 1 -> 2, FSDP <-> data-parallel) are in test_distributed.py, beside the
runs they compare with.
"""

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ranks import free_port, rank_entry

from lisa_trainer import LisaConfig
from lisa_trainer.data import load_and_tokenize
from lisa_trainer.demo import build_demo_model, build_demo_tokenizer, demo_dataset_path
from lisa_trainer.trainer import LisaTrainer, LisaTrainingArguments

WORLD = 2
# Big enough that a checkpoint (~130 MB) dwarfs its largest tensor (an MLP matrix, 2 MiB; 1 MiB per FSDP shard) and
# the interpreter's own noise; small enough for a few CPU steps a second.
MEDIUM = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1)

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


def _trainer(out, tok, data, shape, **kw):
    args = dict(output_dir=str(out), learning_rate=3e-3, max_steps=5, per_device_train_batch_size=2,
                gradient_accumulation_steps=1, progress=False, save_model=False, ddp_timeout=60,
                lr_scheduler_type="constant", fsdp=True)
    args.update(kw)
    lisa = LisaConfig(n_active_layers=2, interval_steps=2, state_policy="park", seed=0)
    return LisaTrainer(build_demo_model(tok, seed=0, **shape), tok, data, LisaTrainingArguments(**args), lisa)


def _host_memory_kib() -> tuple[int, int]:
    """(resident set now, its peak since the last reset), in KiB."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM"))


def _peak_growth_during(fn) -> int:
    """Bytes by which this process's resident set peaked above where it was when `fn` started (Linux: writing 5 to
    clear_refs resets the peak to the current resident set)."""
    Path("/proc/self/clear_refs").write_text("5")
    before, _ = _host_memory_kib()
    fn()
    _, peak = _host_memory_kib()
    return (peak - before) * 1024


class _DeviceVisits:
    """Counts the calls that bring parked state to its device: the bank's restores and prefetches, and a parked
    moment's copy on its device. `undo` holds what to put back."""

    def __init__(self, undo: list):
        from lisa_kernels.host_state_bank import HostStateBank
        from lisa_kernels.state_parking import ParkedState

        self.calls = []
        for cls, name in ((HostStateBank, "restore"), (HostStateBank, "prefetch"), (ParkedState, "materialize")):
            real = getattr(cls, name)

            def counting(*args, _real=real, _name=f"{cls.__name__}.{name}", **kwargs):
                self.calls.append(_name)
                return _real(*args, **kwargs)

            undo.append((cls, name, real))
            setattr(cls, name, counting)


def _bank_contents(trainer) -> dict[str, dict[str, torch.Tensor]]:
    names = {p: n for n, p in trainer.model.named_parameters()}
    return {names[p]: {k: v.read() for k, v in trainer.optimizer.state[p].items() if hasattr(v, "read")}
            for p in trainer.optimizer.state_parker.parked_params}


def _scenarios(rank: int, out: Path) -> None:
    from lisa_trainer.fsdp_weights import save_sharded_model

    tok = build_demo_tokenizer()
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    results = {}
    # Parked state: the checkpoint at step 5 holds layer 1's moments, parked since period 2 (steps 4-5).
    t = _trainer(out / "park", tok, data, SMALL, save_steps=5)
    t.train()
    restore = []
    try:
        visits = _DeviceVisits(restore)
        t.save_checkpoint()  # again, counted: the same step, replaced atomically
        saved_visits = list(visits.calls)
        resumed = _trainer(out / "park_resumed", tok, data, SMALL)
        resumed.resume(out / "park" / "checkpoint-5")
        loaded_visits = visits.calls[len(saved_visits):]
    finally:
        for cls, name, real in restore:
            setattr(cls, name, real)
    results["park"] = {"saved_visits": saved_visits, "loaded_visits": loaded_visits,
                       "bank": _bank_contents(t), "resumed_bank": _bank_contents(resumed)}
    # Host memory of rank 0 while saving, FSDP and data-parallel; and while writing the final model.
    for run, fsdp in (("memory_fsdp", True), ("memory_ddp", False)):
        t = _trainer(out / run, tok, data, MEDIUM, fsdp=fsdp, max_steps=3)
        t.train()
        growth = _peak_growth_during(t.save_checkpoint)
        local = [p.to_local() if fsdp else p for p in t.model.parameters()]
        results[run] = {"growth": growth, "largest": max(x.numel() * x.element_size() for x in local)}
        if fsdp:
            results["model_growth"] = _peak_growth_during(
                lambda: save_sharded_model(t.model, out / "model", t.dist, tokenizer=tok, max_shard_bytes=20 << 20))
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            results["model"] = get_model_state_dict(
                t.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            results["largest_whole"] = max(p.numel() * p.element_size() for p in t.model.parameters())
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.start_processes(rank_entry, args=(WORLD, free_port(), _scenarios, str(out)), nprocs=WORLD, join=True,
                       start_method="spawn")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_parked_state_goes_to_the_file_and_back_without_visiting_the_device(runs):
    _, ranks = runs
    for r in range(WORLD):
        park = ranks[r]["park"]
        assert park["saved_visits"] == [] and park["loaded_visits"] == []
        assert park["bank"] and all(".layers.1." in name for name in park["bank"])
        assert park["resumed_bank"].keys() == park["bank"].keys()
        for name, moments in park["bank"].items():
            assert moments.keys() == park["resumed_bank"][name].keys() == {"exp_avg", "exp_avg_sq"}, name
            for key, value in moments.items():
                assert torch.equal(park["resumed_bank"][name][key], value), (r, name, key)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_rank0_host_memory_while_saving_is_one_tensor_not_the_checkpoint(runs):
    """Rank 0's peak resident set above where the save started. What a save allocates: the host copy of the piece
    being written (none for a CPU tensor; one for a parked moment, read from the bank, or a device tensor), the
    safetensors header and JSON index (~100 bytes per piece), DCP's plans (a few hundred bytes per piece and rank,
    gathered on rank 0) and the Python objects of a few hundred pieces: under 4 MiB here. So the bound is twice the
    largest piece plus 4 MiB, against a checkpoint of ~100 MB that one process gathering it would hold whole."""
    out, ranks = runs
    fixed = 4 << 20
    for run in ("memory_fsdp", "memory_ddp"):
        measured = ranks[0][run]
        size = _size(out / run / "checkpoint-3")
        assert size > 40 * measured["largest"]  # the bound below means something
        assert measured["growth"] <= 2 * measured["largest"] + fixed, (run, measured, size)
        print(f"{run}: rank 0 peak growth {measured['growth'] / 2**20:.1f} MiB while saving a "
              f"{size / 2**20:.1f} MiB checkpoint ({measured['growth'] / size:.3f} of it); largest piece "
              f"{measured['largest'] / 2**20:.1f} MiB")
    # The final model: one whole tensor gathered at a time (each rank holds it during the all-gather).
    growth = ranks[0]["model_growth"]
    assert growth <= 2 * ranks[0]["largest_whole"] + fixed, growth


def test_the_final_fsdp_model_is_written_in_hugging_face_shards(runs):
    from transformers import AutoModelForCausalLM

    out, ranks = runs
    folder = out / "model"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    assert all(f.stat().st_size <= 20 << 20 for f in folder.glob("model-*.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for name, w in ranks[0]["model"].items():
        assert torch.equal(loaded.state_dict()[name], w), name


def test_a_sharded_checkpoint_holds_no_pickle(runs):
    """Every file is JSON, safetensors or the tokenizer's text: none is read with pickle."""
    out, _ = runs
    ckpt = out / "park" / "checkpoint-5"
    for f in ckpt.rglob("*"):
        if f.is_file():
            assert f.suffix in (".json", ".safetensors"), f
            if f.suffix == ".json":
                json.loads(f.read_text())


# ------------------------------------------------------------------------------------ a rank dies while saving


def _killed_while_saving(rank: int, out: Path) -> None:
    """Rank `KILLED` is killed (SIGKILL: no message, no cleanup) half-way through writing its shards of
    checkpoint-3."""
    from lisa_trainer import sharded_storage

    tok = build_demo_tokenizer()
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    t = _trainer(out, tok, data, SMALL, save_steps=1, ddp_timeout=30)
    if rank == int(os.environ["KILLED"]):
        write, written = sharded_storage.write_tensor, []

        def killed(f, tensor):
            written.append(1)
            if t.step == 3 and len(written) > 2:
                f.flush()  # a partly written file is on disk
                os.kill(os.getpid(), signal.SIGKILL)
            return write(f, tensor)

        sharded_storage.write_tensor = killed
    try:
        t.train()
    except BaseException as e:
        (out / f"rank{rank}.err").write_text(f"{type(e).__name__}: {e}")
        raise


@pytest.mark.parametrize("killed", [1, 0])
def test_a_rank_killed_while_saving_leaves_the_previous_checkpoint_newest_and_resumable(tmp_path, tok, killed):
    from lisa_trainer.checkpoint import latest_checkpoint, remove_stale_temp_folders

    os.environ["KILLED"] = str(killed)  # inherited by the spawned ranks
    try:
        context = mp.start_processes(rank_entry, args=(WORLD, free_port(), _killed_while_saving, str(tmp_path)),
                                     nprocs=WORLD, join=False, start_method="spawn")
        for p in context.processes:
            p.join(120)
    finally:
        del os.environ["KILLED"]
    codes = [p.exitcode for p in context.processes]
    assert codes[killed] == -signal.SIGKILL and codes[1 - killed] == 1, codes
    survivor = (tmp_path / f"rank{1 - killed}.err").read_text()
    assert survivor.startswith("DistributedError"), survivor
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    # A surviving rank 0 removed its temporary folder; a killed rank 0's is removed by the next run.
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint-3.tmp-")]
    assert len(left) == (1 if killed == 0 else 0)
    assert remove_stale_temp_folders(tmp_path) == left and latest_checkpoint(tmp_path).name == "checkpoint-2"
    # Resumable, here in one process (2 ranks -> 1).
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    t = _trainer(tmp_path / "resumed", tok, data, SMALL, fsdp=False, per_device_train_batch_size=4)
    assert t.resume(latest_checkpoint(tmp_path)) == 2


# ---------------------------------------------------------------------------------------- formats and errors


def test_a_checkpoint_of_another_format_is_refused_by_name(tmp_path, tok):
    from lisa_trainer.checkpoint import CheckpointError

    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"format_version": 3}))
    t = _trainer(tmp_path / "run", tok, data, SMALL, fsdp=False)
    with pytest.raises(CheckpointError, match=r"checkpoint-1/trainer_state.json: checkpoint format 3, this version "
                                              r"reads 2 \(and format 1, trainer_state.pt\)"):
        t.resume(ckpt)
