"""bench_memory: the meta-device accounting equals the bytes real tensors take, method by method, period by period."""
import json

import pytest
import torch

from benchmarks import bench_memory
from lisa_trainer import LayerSampler

pytest.importorskip("peft")

PERIODS, INTERVAL, N_ACTIVE = 4, 2, 2
ARGS = bench_memory.parse_args(["--shapes", "tiny", "--periods", str(PERIODS), "--interval", str(INTERVAL),
                                "--n-active", str(N_ACTIVE), "--seq-len", "32", "--loss-chunk", "8"])
RESIDENT = ("params", "grads", "optimizer_state")


@pytest.fixture(scope="module")
def runs(pytorch_optimizer_path):
    """Every variant on the tiny shape: on CPU with real tensors (real backward, real host state bank), and on meta."""
    torch.manual_seed(0)
    return {device: {name: bench_memory.account("tiny", variant, torch.device(device), ARGS)
                     for name, variant in bench_memory.VARIANTS.items()}
            for device in ("cpu", "meta")}


@pytest.mark.parametrize("name", list(bench_memory.VARIANTS))
def test_meta_accounting_equals_real_allocations(runs, name):
    real, meta = runs["cpu"][name]["per_period"], runs["meta"][name]["per_period"]
    for key in (*RESIDENT, "host", "layers_sampled"):
        assert meta[key] == real[key], key
    assert all(b > 0 for b in real["params"]) and all(b > 0 for b in real["grads"])
    assert runs["meta"][name]["trainable_params"] == runs["cpu"][name]["trainable_params"]


def test_keep_creeps_and_park_stays_flat(runs):
    per = {name: r["per_period"] for name, r in runs["meta"].items()}

    def resident(name):
        return [sum(per[name][k][i] for k in RESIDENT) for i in range(PERIODS)]

    assert len(set(resident("lisa-park"))) == 1 and len(set(resident("lisa-reset"))) == 1
    assert resident("lisa-park") == resident("lisa-reset")
    for creeping in ("lisa-keep", "lisa-public"):
        assert resident(creeping) == sorted(resident(creeping)) and resident(creeping)[-1] > resident(creeping)[0]
    assert per["lisa-keep"]["layers_sampled"][-1] > N_ACTIVE
    assert resident("lisa-keep")[-1] > resident("lisa-park")[-1]
    # bf16 moments halve the optimizer state and the parked bytes
    assert per["lisa-park-bf16-moments"]["optimizer_state"][0] * 2 == per["lisa-park"]["optimizer_state"][0]
    assert per["lisa-park-bf16-moments"]["host"][-1] * 2 == per["lisa-park"]["host"][-1]


def test_row_sparse_embedding_and_lean_embedding_head_moments(runs):
    """Row-sparse state keeps fp32 moments (+ an int64 index) for the touched rows only; bf16 embedding/head moments
    halve those two tensors' moments and leave the decoder layers' alone."""
    cfg = bench_memory.SHAPES["tiny"]["config"]
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    touched = bench_memory.touched_row_count("tiny", ARGS)
    assert touched == 52  # 5% of 1024, rounded up
    state = {name: r["per_period"]["optimizer_state"][0] for name, r in runs["meta"].items()}
    row_moments = hidden * 4 * 2
    assert state["lisa-park"] - state["lisa-park-sparse-embedding"] == (vocab - touched) * row_moments - touched * 8
    assert state["lisa-park"] - state["lisa-park-bf16-embedding-head"] == 2 * vocab * row_moments // 2
    assert (state["lisa-park"] - state["lisa-park-sparse-bf16-embedding-head"]
            == (vocab - touched) * row_moments - touched * 8 + vocab * row_moments // 2 + touched * row_moments // 2)


def test_prefetch_holds_the_incoming_layers_parked_moments(runs):
    """At a period's last step, the next period's incoming layers that have parked state are on the device
    (fp32 moments, two per parameter); without prefetch nothing is."""
    from benchmarks.bench_finetune import SHAPES, build_model
    from lisa_trainer.layers import find_decoder_layers

    _, layers = find_decoder_layers(build_model("tiny", torch.device("meta"), torch.bfloat16, 0))
    layer_moment_bytes = sum(p.numel() for p in layers[0].parameters()) * 4 * 2
    sampler = LayerSampler(SHAPES["tiny"]["config"]["num_hidden_layers"], N_ACTIVE, ARGS.seed)
    trained, expected = set(), []
    for period in range(PERIODS):
        now, nxt = set(sampler.layers_for_period(period)), set(sampler.layers_for_period(period + 1))
        trained |= now
        expected.append(len((nxt - now) & trained) * layer_moment_bytes if period + 1 < PERIODS else 0)
    assert any(expected)
    got = runs["meta"]["lisa-park"]["per_period"]["prefetched"]
    assert got[:-1] == expected[:-1]
    assert set(runs["meta"]["lisa-park-no-prefetch"]["per_period"]["prefetched"]) == {0}
    assert set(runs["cpu"]["lisa-park"]["per_period"]["prefetched"]) == {0}  # the real bank prefetches only to GPUs


def test_activation_terms(runs):
    cfg = bench_memory.SHAPES["tiny"]["config"]
    tokens = ARGS.seq_len * ARGS.batch_size
    for r in runs["meta"].values():
        a = r["activations"]
        assert a["checkpoints"] == cfg["num_hidden_layers"] * tokens * cfg["hidden_size"] * 2
        # the fp32 log-probabilities (tokens x vocab x 4 bytes) count 3 times; a chunk of 8 of 32 tokens keeps 1/4
        vocab_wide = 3 * tokens * cfg["vocab_size"] * 4
        assert a["head"] - a["head_chunked"] == vocab_wide - vocab_wide // 4
        assert a["layer"] > 0
        assert a["total"] == a["checkpoints"] + max(a["layer"], a["head"])
    full, park = runs["meta"]["full"]["activations"], runs["meta"]["lisa-park"]["activations"]
    assert park["layer"] == full["layer"]  # an active layer saves what a fully trained one does


def test_cli_writes_json_and_chart(tmp_path, capsys):
    assert bench_memory.main(["--shapes", "tiny", "--periods", "2", "--interval", "2", "--seq-len", "32",
                              "--variants", "full,lora,lisa-park,lisa-park-bf16-moments",
                              "--results-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "memory-meta.json").read_text())
    assert data["environment"]["device"] == "meta" and data["environment"]["git_commit"]
    c = data["comparisons"]["tiny"]
    assert set(c["savings_vs_lisa_park_bytes"]) == {"chunked_loss", "lisa-park-bf16-moments"}
    assert c["leanest"]["variant"] == "lisa-park-bf16-moments"
    assert [row["variant"] for row in data["table"]] == ["full", "lora", "lisa-park", "lisa-park-bf16-moments"]
    assert (tmp_path / "memory-meta.png").stat().st_size > 0
    assert "lisa-park-bf16-moments" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_memory.parse_args(["--variants", "lisa-nope"])


def test_offloaded_frozen_layers_leave_only_the_active_ones_and_two_staging_layers(runs):
    """With every frozen layer's weights in host memory the device holds the active layers, the embedding, the head
    and the final norm, plus two layers while they compute."""
    from benchmarks.bench_finetune import SHAPES, build_model
    from lisa_trainer.layers import find_decoder_layers

    _, layers = find_decoder_layers(build_model("tiny", torch.device("meta"), torch.bfloat16, 0))
    layer_bytes = sum(p.nbytes for p in layers[0].parameters())
    n_frozen = SHAPES["tiny"]["config"]["num_hidden_layers"] - N_ACTIVE
    for device in ("cpu", "meta"):
        park, offload = runs[device]["lisa-park"], runs[device]["lisa-park-offload-frozen"]
        assert offload["per_period"]["params"] == [p - n_frozen * layer_bytes for p in park["per_period"]["params"]]
        assert offload["per_period"]["offload_staging"] == [2 * layer_bytes] * PERIODS
        assert park["per_period"]["offload_staging"] == [0] * PERIODS


def test_step_in_backward_holds_one_gradient_at_a_time(runs):
    """The step inside backward: at its peak one gradient is alive, the largest (the untied embedding's or head's,
    vocab x hidden bf16), against every trainable tensor's in a step after backward."""
    cfg = bench_memory.SHAPES["tiny"]["config"]
    largest = cfg["vocab_size"] * cfg["hidden_size"] * 2
    for device in ("cpu", "meta"):
        inside, after = runs[device]["lisa-park-step-in-backward"], runs[device]["lisa-park"]
        assert inside["per_period"]["grads"] == [largest] * PERIODS
        assert all(g > 2 * largest for g in after["per_period"]["grads"])
        assert inside["per_period"]["optimizer_state"] == after["per_period"]["optimizer_state"]


def test_sparse_embedding_gradient_holds_one_row_per_token(runs):
    """The row-sparse embedding gradient: the step's tokens' rows (uncoalesced, int64 index each) instead of the
    vocabulary's. The accounting's step is the batch that touches the assumed rows: touched + 1 tokens."""
    cfg = bench_memory.SHAPES["tiny"]["config"]
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    tokens = bench_memory.touched_row_count("tiny", ARGS) + 1
    for device in ("cpu", "meta"):
        dense = runs[device]["lisa-park-sparse-embedding"]["per_period"]["grads"]
        sparse = runs[device]["lisa-park-sparse-embedding-grad"]["per_period"]["grads"]
        assert sparse == [g - vocab * hidden * 2 + tokens * (8 + hidden * 2) for g in dense]


# ---------------------------------------------------------------------------------------------------------------
# Sharded over ranks: FSDP2 on a fake process group

WORLD = 3  # no dimension of the tiny shape divides by 3: every shard size depends on the ceil split
SHARDED = ("full", "lora", "lisa-park")


@pytest.fixture(scope="module")
def sharded():
    """Each of SHARDED on meta, FSDP2 over WORLD ranks, counted on every rank."""
    return {name: [bench_memory.account("tiny", bench_memory.VARIANTS[name], torch.device("meta"), ARGS,
                                        world=WORLD, rank=r) for r in range(WORLD)]
            for name in SHARDED}


def _rows_of_rank(rows: int, rank: int) -> int:
    """Rows of a dim-0 split over WORLD ranks that `rank` holds: pieces of ceil(rows / WORLD), the last ones short."""
    piece = -(-rows // WORLD)
    return max(0, min(piece, rows - rank * piece))


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_ranks_add_up_to_one_process(runs, sharded, name):
    """Every rank's weights, gradients, moments, prefetched and parked moments, summed over the ranks, are the
    unsharded run's, period by period; rank 0 holds more than a third (the ceil split), the last rank less."""
    whole = runs["meta"][name]["per_period"]
    for key in (*RESIDENT, "prefetched", "host"):
        per_rank = [r["per_period"][key] for r in sharded[name]]
        assert [sum(column) for column in zip(*per_rank)] == whole[key], key
    first, last = sharded[name][0]["per_period"]["params"][0], sharded[name][-1]["per_period"]["params"][0]
    assert first * WORLD > whole["params"][0] > last * WORLD
    assert all(r["per_period"]["layers_sampled"] == whole["layers_sampled"] for r in sharded[name])


@pytest.mark.parametrize("rank", range(WORLD))
def test_sharded_lisa_moments_are_the_ceil_split_of_the_trained_tensors(sharded, rank):
    """LISA's fp32 moments on a rank at the first period: for the embedding, head, final norm and the period's
    layers, that rank's rows of each tensor x the other dims x 4 bytes x 2 moments."""
    from benchmarks.bench_finetune import SHAPES, build_model
    from lisa_trainer.layers import find_decoder_layers

    model = build_model("tiny", torch.device("meta"), torch.bfloat16, 0)
    _, layers = find_decoder_layers(model)
    active = LayerSampler(SHAPES["tiny"]["config"]["num_hidden_layers"], N_ACTIVE, ARGS.seed).layers_for_period(0)
    trained = [model.get_input_embeddings().weight, model.get_output_embeddings().weight, model.model.norm.weight,
               *(p for i in active for p in layers[i].parameters())]
    expected = sum(_rows_of_rank(p.shape[0], rank) * p[0].numel() * 4 * 2 for p in trained)
    assert sharded["lisa-park"][rank]["per_period"]["optimizer_state"][0] == expected


def test_fsdp_gathered_terms(sharded):
    """The root and two layers gathered, padded to WORLD x the largest shard; the whole gradients of what trains:
    LISA's and full fine-tuning's root and a whole layer, LoRA's adapters of a layer only."""
    from benchmarks.bench_finetune import build_model
    from lisa_trainer.layers import find_decoder_layers

    model = build_model("tiny", torch.device("meta"), torch.bfloat16, 0)
    _, layers = find_decoder_layers(model)

    def padded(params):
        return sum(WORLD * -(-p.shape[0] // WORLD) * p[0].numel() * 2 for p in params)

    layer, root = padded(layers[0].parameters()), padded(p for n, p in model.named_parameters() if ".layers." not in n)
    assert layer > sum(p.nbytes for p in layers[0].parameters())  # the padding counts
    for name in SHARDED:
        fsdp = sharded[name][0]["fsdp"]
        assert fsdp["root_gathered"] == root
        # LoRA's layers hold their fp32 adapters too (gathered with them)
        assert (fsdp["layers_gathered"] > 2 * layer) if name == "lora" else (fsdp["layers_gathered"] == 2 * layer)
        assert fsdp["total"] == fsdp["root_gathered"] + fsdp["layers_gathered"] + fsdp["grads_unsharded"]
        assert fsdp["uneven"] and all(n.endswith("weight") for n in fsdp["uneven"])
    assert sharded["full"][0]["fsdp"]["grads_unsharded"] == root + layer
    assert sharded["lisa-park"][0]["fsdp"]["grads_unsharded"] == root + layer
    lora = sharded["lora"][0]["fsdp"]  # a layer's trainable part is its adapters: what it gathers beyond the weights
    assert lora["grads_unsharded"] == lora["layers_gathered"] // 2 - layer > 0


def test_size_only_bank_takes_the_real_arena():
    """The arena the size-only bank counts is the one the real bank (unpinned: chunks sized as the native
    extension's) takes for the same parks and releases, chunk growth and reuse included."""
    chunk = 1 << 16
    real = bench_memory.HostStateBank(backend="fallback", pin=False, chunk_bytes=chunk)
    sized = bench_memory.SizeOnlyStateBank(chunk_bytes=chunk)
    plan = [("a", 3000), ("b", 40_000), ("c", 70_000), ("-", "b"), ("d", 20_000), ("e", 30_000), ("-", "a")]
    for name, what in plan:
        for bank, device in ((real, "cpu"), (sized, "meta")):
            if name == "-":
                bank.restore(what)
            else:
                bank.offload(name, torch.empty(what, dtype=torch.float32, device=device))
        assert sized.arena_bytes == real.arena_bytes, (name, what)
        assert sized.bytes_held == real.bytes_held
    assert real.arena_bytes > chunk  # the 280 KB request grew the arena past one chunk
    assert sized.torch_arena_bytes >= sized.arena_bytes


def test_sharded_accounting_needs_meta_and_leaves_no_process_group():
    import os

    import torch.distributed as dist

    with pytest.raises(ValueError, match="meta only"):
        bench_memory.account("tiny", bench_memory.VARIANTS["full"], torch.device("cpu"), ARGS, world=2)
    bench_memory.account("tiny", bench_memory.VARIANTS["full"], torch.device("meta"), ARGS, world=2)
    assert not dist.is_initialized() and "WORLD_SIZE" not in os.environ


def test_cli_fsdp_ranks(tmp_path):
    assert bench_memory.main(["--shapes", "tiny", "--periods", "2", "--interval", "2", "--seq-len", "32",
                              "--variants", "full,lisa-park,lisa-park-step-in-backward", "--fsdp-ranks", "2,4",
                              "--ranks-per-node", "2", "--results-dir", str(tmp_path), "--no-plot"]) == 0
    fsdp = json.loads((tmp_path / "memory-meta.json").read_text())["fsdp"]
    assert [(row["ranks"], row["variant"]) for row in fsdp["table"]] == [(2, "full"), (2, "lisa-park"),
                                                                         (4, "full"), (4, "lisa-park")]
    assert "one process" in fsdp["not_sharded"]["lisa-park-step-in-backward"]
    for row in fsdp["table"]:
        r = fsdp["results"]["tiny"][str(row["ranks"])][row["variant"]]
        assert row["host_node_gb"] * 1e9 == pytest.approx(2 * r["per_period"]["host"][-1])
    park = [row for row in fsdp["table"] if row["variant"] == "lisa-park"]
    assert park[0]["host_rank_gb"] > park[1]["host_rank_gb"] > 0
    for bad in ("1", "8,x"):
        with pytest.raises(SystemExit):
            bench_memory.parse_args(["--fsdp-ranks", bad])
