"""The memory features decided in one place (lisa_trainer.memory): what applies under each process layout, every rule
that joins options, the frozen-weight offload's lifetime, and the single-process stand-in of DataParallel."""

import logging

import pytest
import torch

from lisa_trainer import LisaConfig, LisaController, LisaTrainingArguments
from lisa_trainer.distributed import OneProcess
from lisa_trainer.memory import BackwardThenStep, MemoryFeatures, StepInsideBackward
from lisa_trainer.options import OptionError
from lisa_trainer.run_folder import RunFolderError, claim_output_dir

from tiny_model import TINY

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


def tiny(tok):
    from lisa_trainer.demo import build_demo_model

    return build_demo_model(tok, seed=0, **TINY)


def args(tmp_path, **fields):
    return LisaTrainingArguments(output_dir=str(tmp_path), **fields)


@pytest.mark.parametrize("processes, fsdp", [(1, False), (2, False), (2, True), (1, True)])
def test_each_feature_is_decided_once_for_the_process_layout(tok, tmp_path, processes, fsdp, caplog):
    model = tiny(tok)
    with caplog.at_level(logging.INFO, logger="lisa_trainer"):
        memory = MemoryFeatures(model, LisaConfig(), args(tmp_path), processes=processes, fsdp=fsdp)
        memory.take_model()
    sharded = fsdp and processes > 1  # one process with fsdp=True trains unsharded
    assert memory.config.sparse_embedding_state is not sharded
    assert [g.get("sparse_rows") for g in memory.optimizer.param_groups if g.get("sparse_rows")] == \
        ([] if sharded else [True])
    assert (memory.chunked_loss is None) is sharded
    assert model.get_input_embeddings().sparse is (processes == 1)  # the all-reduce takes dense gradients
    assert isinstance(memory.backward, BackwardThenStep)
    said = caplog.text
    assert "optimizer step: after backward" in said and "frozen layers' weights: on the device" in said
    assert "frozen layers' optimizer state: parked in host memory" in said
    if sharded:
        assert "row-sparse embedding state: off (FSDP" in said and "chunked loss: off (FSDP" in said
    memory.release_model()
    assert model.get_input_embeddings().sparse is False  # as the model was given


@pytest.mark.parametrize("config, fields, processes, named", [
    (LisaConfig(), dict(optimizer_in_backward=True, max_grad_norm=0.0), 2, "--optimizer_in_backward"),
    (LisaConfig(granularity="module"), dict(optimizer_in_backward=True, max_grad_norm=0.0), 1,
     "--lisa_granularity"),
    (LisaConfig(offload_frozen_layers=1), {}, 1, "--gradient_checkpointing"),
    (LisaConfig(offload_frozen_layers=1), dict(gradient_checkpointing=True), 2, "one process"),
])
def test_every_rule_joining_options_and_layout_is_refused_in_one_place(tok, tmp_path, config, fields, processes,
                                                                       named):
    from lisa_trainer.cli_options import OPTION_CLASSES
    from lisa_trainer.options import command_line_message

    with pytest.raises(OptionError) as refused:
        MemoryFeatures.check(config, args(tmp_path, **fields), processes)
    assert named in command_line_message(refused.value, OPTION_CLASSES, {})
    with pytest.raises(OptionError):  # the component refuses it the same way
        MemoryFeatures(tiny(tok), config, args(tmp_path, **fields), processes=processes)


@pytest.mark.parametrize("fields, name", [(dict(max_grad_norm=1.0), "max_grad_norm"),
                                          (dict(max_grad_norm=0.0, gradient_accumulation_steps=2),
                                           "gradient_accumulation_steps"),
                                          (dict(max_grad_norm=0.0, optim="adamw_torch"), "optim")])
def test_the_step_inside_backward_is_refused_with_what_it_needs_when_the_arguments_are_built(tmp_path, fields, name):
    with pytest.raises(OptionError, match=name):
        args(tmp_path, optimizer_in_backward=True, **fields)
    ok = args(tmp_path, optimizer_in_backward=True, max_grad_norm=0.0)
    assert ok.optimizer_in_backward


def test_the_step_inside_backward_is_the_strategy_chosen_for_it(tok, tmp_path):
    memory = MemoryFeatures(tiny(tok), LisaConfig(), args(tmp_path, optimizer_in_backward=True, max_grad_norm=0.0))
    assert isinstance(memory.backward, StepInsideBackward)
    grad_norm, taken = memory.backward.step(memory.model, float("nan"))  # no backward ran: nothing was stepped
    assert taken is False and grad_norm != grad_norm


def test_the_component_owns_the_offload_from_the_controllers_switch_to_the_hand_back(tok, tmp_path):
    model = tiny(tok)
    config = LisaConfig(n_active_layers=1, interval_steps=1, offload_frozen_layers=1)
    memory = MemoryFeatures(model, config, args(tmp_path, gradient_checkpointing=True))
    memory.take_model()
    controller = LisaController(model, memory.optimizer, memory.config)
    memory.attach(controller)
    assert memory.offload is not None and memory.offload.offloaded == controller.frozen_layers[:1]
    for step in range(3):  # each switch offloads the new period's lowest frozen layer
        controller.on_step_begin(step)
        assert memory.offload.offloaded == controller.frozen_layers[:1]
        assert not set(memory.offload.offloaded) & set(controller.active_layers)
    with memory.weights_on_device():
        assert memory.offload.offloaded == ()
    assert memory.offload.offloaded == controller.frozen_layers[:1]
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    controller.release_model()
    memory.release_model()  # closed: every weight on its device, the hooks and host copies gone
    assert memory.offload is None
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())
    assert all(p.untyped_storage().size() > 0 for p in model.parameters())
    controller.on_step_begin(3)  # training goes on: the controller takes the model, the offload comes back
    assert memory.offload is not None and memory.offload.offloaded == controller.frozen_layers[:1]
    memory.release_model()


def test_one_process_stands_in_for_data_parallel():
    one = OneProcess()
    assert (one.rank, one.world_size, one.is_main, one.fsdp) == (0, 1, True, False)
    assert one.sum(3, 4.5) == [3, 4.5] and one.shard([1, 2, 3]) == [1, 2, 3]
    assert one.broadcast_object({"a": 1}) == {"a": 1} and one.eval_batches(range(0, 9, 3)) == range(0, 9, 3)
    assert one.eval_sums(2.0, 5) == (2.0, 5) and one.finish_gradients() == {}
    assert not one.sharded_checkpoints
    error = ValueError("mine")
    assert one.explain_failure(error) is error
    loss = (torch.ones(2, requires_grad=True) * 3).sum()
    one.backward(loss, last=True)


def test_a_folder_is_claimed_once_and_the_trainer_follows_the_callers_claim(tok, tmp_path):
    from lisa_trainer.data import load_and_tokenize
    from lisa_trainer.demo import demo_dataset_path
    from lisa_trainer.runlog import read_log
    from lisa_trainer.trainer import LisaTrainer

    out = tmp_path / "run"
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=32)
    trainer = LisaTrainer(tiny(tok), tok, data, args(out, max_steps=2, per_device_train_batch_size=2, progress=False,
                                                     save_model=False), LisaConfig(n_active_layers=1))
    with claim_output_dir(out) as claim:
        with pytest.raises(RunFolderError, match="another run"):  # not re-entrant: the lock is held once
            with claim_output_dir(out):
                pass
        trainer.train(claim=claim)
    config = next(r for r in read_log(out / "train_log.jsonl") if r["kind"] == "config")
    assert config["run_id"] == claim.run_id
