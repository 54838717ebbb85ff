"""A tiny random-weight Llama trained by a `LisaController`: what the controller and sampling-rule tests share."""

import torch
import transformers

from lisa_kernels import FusedAdamW, StateParker

N_LAYERS = 4


def record_parker_calls(optimizer):
    """Records which parker method the controller called with which params (empty calls are not recorded: the
    step hook asks to unpark what has a grad, usually nothing)."""
    parker, calls = StateParker.of(optimizer), []
    for kind in ("park", "unpark", "prefetch"):
        def recording(params, *args, _kind=kind, _method=getattr(parker, kind), **kwargs):
            params = list(params)
            if params:
                calls.append((_kind, params))
            _method(params, *args, **kwargs)
        setattr(parker, kind, recording)
    return calls


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(config)


def make_optimizer(model, cls=None):
    # Weight decay > 0: a frozen weight that wrongly reached the optimizer would visibly shrink.
    params = list(model.parameters())
    return (cls or FusedAdamW)(params, lr=1e-2, weight_decay=0.1)


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(3, 64, (2, 8), generator=g)


def train_step(model, optimizer, controller, step, set_to_none=True):
    controller.on_step_begin(step)
    ids = batch(step)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    controller.on_step_end(step)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def layer_of(name):
    prefix = "model.layers."
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def on_device(optimizer, p):
    """Whether `p` has optimizer state tensors in `optimizer.state` (not parked, not dropped)."""
    return any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in optimizer.state.get(p, {}).values())


def state_layers(controller, optimizer):
    """Layers with at least one parameter whose optimizer state sits in `optimizer.state` (on the device)."""
    return {i for i in range(controller.n_layers)
            if any(on_device(optimizer, p) for p in controller.layer_parameters(i))}
