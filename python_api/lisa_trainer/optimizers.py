"""The optimizer of a LISA run: one over every parameter, frozen or not, so a layer frozen now trains when sampled.

`build_optimizer` gives `lisa_kernels.FusedAdamW` (the default, ``optim="adamw_lisa"``) or the optimizer another
`optim` name gives in Hugging Face's Trainer; `unwrap_optimizer` finds the optimizer that owns the state inside
accelerate's wrapper.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lisa_kernels import FusedAdamW, HostStateBank

from .arguments import BITSANDBYTES_OPTIMIZERS, EMBEDDING_STATE_DTYPES, OPTIMIZERS, LisaConfig
from .layers import embedding_weight, refuse_peft_model
from .options import OptionError

__all__ = ["build_optimizer", "unwrap_optimizer"]

logger = logging.getLogger(__name__)


def unwrap_optimizer(optimizer):
    """The optimizer that owns the state (accelerate's AcceleratedOptimizer wraps the real one)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def row_sparse_embedding_state(model: nn.Module, cfg: LisaConfig, optim: str) -> bool:
    """Whether `build_optimizer` gives the input embedding row-sparse moments: FusedAdamW, the embedding not tied
    to the head (whose gradient is dense), and `cfg.sparse_embedding_state`."""
    embedding = embedding_weight(model, "input")
    tied = embedding is not None and embedding is embedding_weight(model, "output")
    return optim == "adamw_lisa" and cfg.sparse_embedding_state and embedding is not None and not tied


def build_optimizer(model: nn.Module, cfg: LisaConfig | None = None, lr: float = 1e-5, weight_decay: float = 0.0,
                    *, optim: str = "adamw_lisa", **adamw_kwargs):
    """An optimizer over ALL of `model`'s parameters, frozen or not: `lisa_kernels.FusedAdamW` by default, or the
    one `optim` names (`OPTIMIZERS`; `adamw_kwargs` such as betas and eps go to the AdamW family).

    Frozen parameters cost nothing there (a parameter whose `.grad` is None is skipped: no state, no reads), and
    a layer frozen now is already in the optimizer when LISA samples it later. Weight decay applies to matrices
    only: biases and norm weights (1-D) go to a second group with `weight_decay=0.0`.
    The input embedding and the output head get a group each, with `cfg.embedding_state_dtype` moments; with
    FusedAdamW the input embedding's moments are row-sparse (`cfg.sparse_embedding_state`, exact) unless the head is
    tied to it. `cfg` with state_policy="park" gives FusedAdamW its host state bank (otherwise none is created);
    the controller attaches a `StateParker` to any of the others.
    """
    if cfg is not None and not isinstance(cfg, LisaConfig):
        raise TypeError(f"cfg must be a LisaConfig or None, got {type(cfg).__name__}")
    refuse_peft_model(model)
    ours = optim == "adamw_lisa"
    if ours and cfg is not None and cfg.state_policy == "park":
        adamw_kwargs.setdefault("state_bank", HostStateBank())
    cfg = cfg if cfg is not None else LisaConfig()
    embedding, head = embedding_weight(model, "input"), embedding_weight(model, "output")
    tied = embedding is not None and head is embedding
    sparse = row_sparse_embedding_state(model, cfg, optim)
    if ours and embedding is not None:
        logger.info("input embedding %s: %s AdamW state%s", tuple(embedding.shape), "row-sparse" if sparse else "dense",
                    " (tied to the output head, whose gradient is dense)" if tied else "")
    # None leaves the optimizer's own state_dtype (a build_optimizer keyword) to these groups too.
    lean = {} if cfg.embedding_state_dtype is None or not ours else {
        "state_dtype": EMBEDDING_STATE_DTYPES[cfg.embedding_state_dtype]}
    own_group = [p for p in (embedding, head) if p is not None]
    decay, no_decay = [], []
    for p in model.parameters():
        if not any(p is q for q in own_group):
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if embedding is not None:
        groups.append({"params": [embedding], "weight_decay": weight_decay, **({"sparse_rows": sparse} if ours else {}),
                       **lean})
    if head is not None and not tied:
        groups.append({"params": [head], "weight_decay": weight_decay, **lean})
    if ours:
        return FusedAdamW(groups, lr=lr, weight_decay=weight_decay, **adamw_kwargs)
    if optim in ("adamw_torch", "adamw_torch_fused"):
        fused = {"fused": True} if optim == "adamw_torch_fused" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **fused, **adamw_kwargs)
    if optim == "adafactor":
        from transformers.optimization import Adafactor

        # Hugging Face Trainer's settings for optim="adafactor": the given lr, no relative step or scaling.
        return Adafactor(groups, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if optim in BITSANDBYTES_OPTIMIZERS:
        import bitsandbytes

        return getattr(bitsandbytes.optim, BITSANDBYTES_OPTIMIZERS[optim])(groups, lr=lr, weight_decay=weight_decay,
                                                                            **adamw_kwargs)
    raise OptionError("LisaTrainingArguments", "optim", f"must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")
