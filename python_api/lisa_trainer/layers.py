"""Find a causal LM's decoder layers and its always-trainable modules by structure, not by class name.

LISA needs two things from a model: the list of N decoder blocks it samples from, and the modules that train in
every period (input embeddings, output head, final norm). The public implementations look the layer list up in a
table keyed by model class (LMFlow asserts on anything not in it) or take the first `nn.ModuleList` they meet
(ms-swift, which picks a vision tower or an MoE expert list when one comes first). Here the layer list is the
longest `nn.ModuleList` of two or more structurally identical blocks (same class, same parameter names and
shapes) that is not nested inside another such list, so every decoder-only architecture in transformers is found
without knowing its name; a user's dotted `layers_attribute` always wins.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["find_decoder_layers", "always_trainable_modules", "decoder_modules", "layer_candidates", "LayerCandidate",
           "outlier_ratios", "refuse_peft_model"]

ALWAYS_TRAINABLE_DEFAULT = ("input_embeddings", "output_embeddings", "final_norm")
_CHOOSE_HINT = (
    "choose the list yourself with `--lisa_layers_attribute PATH` on the command line or "
    "`layers_attribute=PATH` in LisaConfig / find_decoder_layers (PATH is a dotted module path such as "
    "'model.layers')"
)


@dataclass(frozen=True)
class LayerCandidate:
    """One `nn.ModuleList` of the model, as discovery sees it."""

    path: str
    length: int
    block_classes: tuple[str, ...]  # distinct class names of its elements
    identical: bool  # all elements share class, parameter names and shapes
    n_params: int

    def describe(self) -> str:
        kind = "identical blocks" if self.identical else "mixed blocks"
        return f"{self.path!r}: {self.length} x {'/'.join(self.block_classes)} ({kind}, {self.n_params:,} params)"


def _signature(module: nn.Module) -> tuple:
    return (type(module), tuple((name, tuple(p.shape)) for name, p in module.named_parameters()))


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def layer_candidates(model: nn.Module) -> list[LayerCandidate]:
    """Every `nn.ModuleList` with at least two parameterised elements, in module order."""
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        blocks = list(module)
        if not all(_has_params(b) for b in blocks):
            continue
        signatures = {_signature(b) for b in blocks}
        classes = tuple(dict.fromkeys(type(b).__name__ for b in blocks))
        n_params = sum(p.numel() for p in module.parameters())
        found.append(LayerCandidate(path, len(blocks), classes, len(signatures) == 1, n_params))
    return found


def _is_nested(path: str, others: list[str]) -> bool:
    return any(path != o and path.startswith(o + ".") for o in others)


def find_decoder_layers(model: nn.Module, layers_attribute: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return `(dotted path, module list)` of the decoder layers LISA samples from.

    With `layers_attribute` the list at that dotted path is used, whatever discovery would pick. Otherwise the
    longest `nn.ModuleList` of >= 2 structurally identical blocks that is not inside another such list (an MoE
    expert list inside each layer is longer than a tiny model's layer list, but nested). A list held by the same
    module as the input embeddings comes first (a multimodal model's text decoder, not its longer vision tower);
    ties go to the larger list. Lists whose blocks share a class but not all shapes (hybrid models) are used only
    when no fully identical list exists.
    """
    if layers_attribute is not None:
        path = _without_wrapper_prefix(model, layers_attribute)
        return path, _resolve_layers_attribute(model, path)

    candidates = layer_candidates(model)
    for strict in (True, False):
        pool = [c for c in candidates if (c.identical if strict else len(c.block_classes) == 1)]
        paths = [c.path for c in pool]
        pool = [c for c in pool if not _is_nested(c.path, paths)]
        if pool:
            beside_embeddings = _embedding_holder_paths(model)
            best = max(pool, key=lambda c: (c.path.rpartition(".")[0] in beside_embeddings, c.length, c.n_params))
            return best.path, model.get_submodule(best.path)

    listing = "\n".join("  " + c.describe() for c in candidates) or "  (the model has no nn.ModuleList of >= 2 blocks)"
    raise ValueError(
        f"could not find the decoder layers of {type(model).__name__}: no nn.ModuleList of two or more "
        f"structurally identical blocks. Candidates:\n{listing}\nTo use one, {_CHOOSE_HINT}."
    )


def _without_wrapper_prefix(model: nn.Module, path: str) -> str:
    """LMFlow writes the path from the object holding the CausalLM as `model` ("model.model.layers" for a Llama):
    when the path does not resolve as given but does without that leading "model.", the latter is meant."""
    head, _, rest = path.partition(".")
    if head == "model" and rest and not _resolves(model, path) and _resolves(model, rest):
        return rest
    return path


def _resolves(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _resolve_layers_attribute(model: nn.Module, path: str) -> nn.ModuleList:
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError as err:
        hint = ", ".join(repr(c.path) for c in layer_candidates(model)) or "none found"
        raise ValueError(
            f"layers_attribute={path!r} does not name a submodule of {type(model).__name__} ({err}); "
            f"module lists in this model: {hint}"
        ) from None
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        raise ValueError(
            f"layers_attribute={path!r} names a {type(module).__name__}, not a non-empty nn.ModuleList of "
            f"decoder layers"
        )
    return module


def embedding_module(model: nn.Module, role: str) -> nn.Module | None:
    """`model.get_input_embeddings()` (role "input") or `model.get_output_embeddings()` ("output", the LM head); None
    for a model without one (the getter missing, not implemented, or returning None)."""
    getter = getattr(model, f"get_{role}_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


def embedding_weight(model: nn.Module, role: str) -> nn.Parameter | None:
    """The weight of `embedding_module(model, role)`, if it has one."""
    weight = getattr(embedding_module(model, role), "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


def _embedding_holder_paths(model: nn.Module) -> set[str]:
    """Paths of the modules that directly hold the input embeddings (where the decoder layers usually sit)."""
    emb = embedding_module(model, "input")
    if emb is None:
        return set()
    holders = set()
    for path, module in model.named_modules():
        if any(child is emb for child in module.children()):
            holders.add(path)
    return holders


def _is_norm_like(module: nn.Module) -> bool:
    """A normalisation module: LayerNorm/RMSNorm/GroupNorm, or any leaf whose parameters are all 1-D.

    Custom RMSNorm classes (LlamaRMSNorm, GemmaRMSNorm, ...) are plain modules with one 1-D weight, so the
    structural rule catches them without a name list. Embeddings and Linear have 2-D weights; dropout and rotary
    embeddings have no parameters.
    """
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    if any(_has_params(child) for child in module.children()):
        return False
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.dim() == 1 for p in params)


def _find_final_norms(model: nn.Module, layers_path: str) -> list[str]:
    """Norm-like children of the module holding the layer list (the final norm), outside the layers.

    When there are several (Bloom has a norm after its embeddings and one after its layers), the ones registered
    after the layer list are the final norm by every transformers convention; if none is registered after it (OPT
    registers `final_layer_norm` before `layers`), all of them are returned.
    """
    holder_path, _, attr = layers_path.rpartition(".")
    holder = model.get_submodule(holder_path) if holder_path else model
    norms, after = [], []
    seen_layers = False
    for name, child in holder.named_children():
        if name == attr:
            seen_layers = True
            continue
        if _is_norm_like(child):
            full = f"{holder_path}.{name}" if holder_path else name
            norms.append(full)
            if seen_layers:
                after.append(full)
    return after or norms


def _module_path(model: nn.Module, target: nn.Module) -> str | None:
    for path, module in model.named_modules():
        if module is target:
            return path
    return None


def always_trainable_modules(
    model: nn.Module,
    include: tuple[str, ...] | list[str] | None = None,
    layers_attribute: str | None = None,
) -> dict[str, nn.Module]:
    """Modules that train in every LISA period, as `{dotted path: module}` in a stable order.

    `include` holds roles and/or dotted module paths; `None` means the paper's set plus the final norm:
    `"input_embeddings"` (`model.get_input_embeddings()`), `"output_embeddings"` (`model.get_output_embeddings()`,
    the LM head) and `"final_norm"` (found structurally next to the decoder layers). An empty sequence makes
    nothing always trainable. A head whose parameters are all tied to the input embeddings is left out, so a tied
    weight is never counted or toggled twice.
    """
    if isinstance(include, str):
        raise TypeError("always_trainable must be a sequence of roles or module paths, not a single string")
    include = ALWAYS_TRAINABLE_DEFAULT if include is None else tuple(include)
    layers_path, layers = find_decoder_layers(model, layers_attribute)
    in_layers = {id(p) for p in layers.parameters()}

    result: dict[str, nn.Module] = {}

    def add(path: str, module: nn.Module) -> None:
        params = unique_parameters([*result.values(), module], per_module=True)[-1]
        if not params or any(id(p) in in_layers for p in params):
            return  # tied away entirely, or part of the decoder layers (those are LISA's to toggle)
        result[path] = module

    for entry in include:
        if entry in ("input_embeddings", "output_embeddings"):
            module = embedding_module(model, entry.removesuffix("_embeddings"))
            if module is None:
                if entry == "input_embeddings" or include is not ALWAYS_TRAINABLE_DEFAULT:
                    warnings.warn(f"always_trainable: {type(model).__name__} has no {entry} "
                                  f"(get_{entry}() is missing or returns None); nothing added for it", stacklevel=2)
                continue  # e.g. a base model without an LM head
            add(_module_path(model, module) or entry, module)
        elif entry == "final_norm":
            for path in _find_final_norms(model, layers_path):
                add(path, model.get_submodule(path))
        else:
            try:
                module = model.get_submodule(entry)
            except AttributeError:
                raise ValueError(
                    f"always_trainable entry {entry!r} is neither a role ({', '.join(ALWAYS_TRAINABLE_DEFAULT)}) "
                    f"nor a submodule of {type(model).__name__}"
                ) from None
            if any(id(p) in in_layers for p in module.parameters()):
                raise ValueError(
                    f"always_trainable entry {entry!r} lies inside the decoder layers {layers_path!r}; LISA samples "
                    f"those, so they cannot be always trainable"
                )
            add(entry, module)
    return result


def refuse_peft_model(model: nn.Module) -> None:
    """Raise ValueError for a model carrying peft adapters (a `PeftModel`, or adapters added to a transformers
    model): LISA trains the full weights of its sampled layers and of the embeddings and head, and the adapters'
    `save_pretrained` writes the adapter weights only, so what was trained would not be saved."""
    peft_module = next((m for m in model.modules() if type(m).__module__.split(".")[0] == "peft"), None)
    if peft_module is None:
        return
    raise ValueError(
        f"{type(model).__name__} is a peft model ({type(peft_module).__name__}: LoRA or other adapters). LISA trains "
        f"full weights of the decoder layers and the embeddings, which peft's save_pretrained (adapter weights only) "
        f"would drop. Merge the adapters into the model first (model = model.merge_and_unload()) and train that with "
        f"LISA, or train the adapters alone, without LISA")


def unique_parameters(modules, per_module: bool = False) -> list:
    """Parameters of `modules`, each shared (tied) parameter once, in first-seen order; with `per_module`, one list
    per module (a tied parameter in the first module that has it)."""
    groups, seen = [], set()
    for module in modules:
        group = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in group)
        groups.append(group)
    return groups if per_module else [p for group in groups for p in group]


# outlier_ratios: OWS's threshold M for a weight-only score (why 7, not the paper's 13: `sampler.OUTLIER_FLOOR`).
OUTLIER_THRESHOLD = 7.0


def outlier_ratios(layers, threshold: float = OUTLIER_THRESHOLD) -> list[float]:
    """Per layer: the share of its matrix entries (parameters of 2 or more dimensions) whose magnitude exceeds
    `threshold` times the mean magnitude over all of the layer's matrices. One matrix at a time, summed in fp64; an
    FSDP2 shard is gathered whole for it (a collective: every rank calls this)."""
    ratios = []
    for layer in layers:
        mats = [p for p in layer.parameters() if p.dim() >= 2]
        count = sum(p.numel() for p in mats)
        if not count:
            raise ValueError(f"layer_weights='outlier': a decoder layer ({type(layer).__name__}) has no weight matrix")
        mean = sum(float(_full(p).abs().sum(dtype=torch.float64)) for p in mats) / count
        ratios.append(sum(int((_full(p).abs() > threshold * mean).sum()) for p in mats) / count)
    return ratios


def _full(p: nn.Parameter) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (DTensor), the parameter's data otherwise."""
    return p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()


def decoder_modules(layers) -> tuple[list[str], list[list[nn.Parameter]], list[int]]:
    """The sampling units of module-wise LISA: every module inside a decoder layer that holds parameters of its own
    (attention q/k/v/o projections, MLP gate/up/down, norms, a layer's own bias...), found by structure.

    Returns (names "<layer>.<path in the layer>", each unit's parameters, each unit's layer index), in layer and
    module order; a parameter shared within a layer belongs to the first module that holds it."""
    names, params, layer_of = [], [], []
    for i, layer in enumerate(layers):
        seen = set()
        for path, module in layer.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            if own:
                seen.update(id(p) for p in own)
                names.append(f"{i}.{path}" if path else str(i))
                params.append(own)
                layer_of.append(i)
    return names, params, layer_of


def enable_gradient_checkpointing(model: nn.Module) -> Callable[[], None]:
    """Recompute each decoder layer's activations in backward, non-reentrant: it keeps gradients flowing to
    trainable layers behind frozen ones (and to the input embedding), and runs the layer's leaf modules again, which
    `lisa_trainer.frozen_weights` relies on. Turns the model's KV cache off (it is useless in training).

    Returns a function that gives the model back as it was: `use_cache` as before, and, unless it already
    checkpointed, checkpointing off and without the input embedding's forward hook that transformers adds with it."""
    was_on = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    had_input_hooks = bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))
    use_cache = getattr(model.config, "use_cache", None)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if use_cache:
        model.config.use_cache = False

    def restore() -> None:
        if use_cache is not None:
            model.config.use_cache = use_cache
        if was_on:
            return
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        # transformers' disable leaves the hook that its enable added (for input_ids models); it removes it with this
        added_input_hooks = getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None)
        if added_input_hooks and not had_input_hooks:
            model.disable_input_require_grads()

    return restore
