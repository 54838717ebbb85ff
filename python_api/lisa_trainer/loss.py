"""The trainer's next-token loss from the decoder's final hidden states and the LM head, never the whole logits.

A Hugging Face causal LM computes ``lm_head(base_model(...).last_hidden_state)``. :class:`ChunkedCausalLMLoss` runs
the base model itself and hands the hidden states and the head's weight to
:func:`lisa_kernels.causal_lm_cross_entropy`, which builds the logits one tile at a time: at 1024 tokens and a 128k
vocabulary that avoids 0.5 GB of fp32 logits and their gradient. Which module is the base model and which is the
head is read from the model (``base_model``, ``get_output_embeddings()``); Gemma-2's final-logit soft-cap is
applied. Once, on the first batch, the logits the pieces give for a few tokens are compared with the model's own
(in eval mode, without gradients): a model that does anything else between the last hidden state and its logits
(Cohere's ``logit_scale``, a custom head, a wrapper) falls back to the plain loss with one warning naming why.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from lisa_kernels.linear_cross_entropy import causal_lm_cross_entropy

from .data import IGNORE_INDEX
from .layers import embedding_module

PROBE_TOKENS = 16


class ChunkedCausalLMLoss:
    """``loss(batch)``: the summed next-token cross-entropy over the batch's trained tokens (``labels`` other than
    ``IGNORE_INDEX``, shifted by one), or ``None`` when the model's structure is not understood and the caller must
    compute the plain loss. ``reason`` says why it does not apply (``None`` while it does)."""

    def __init__(self, model):
        self.model = model
        self.reason = _structure_problem(model)
        self._probed = self.reason is not None
        if self.reason:
            _warn_fallback(self.reason)

    def _parts(self):
        return self.model.base_model, embedding_module(self.model, "output"), getattr(self.model.config, "final_logit_softcapping", None)

    def _hidden(self, base, batch):
        out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _probe(self, batch) -> str | None:
        """Whether lm_head(base_model(x)) reproduces model(x).logits on the first sequence's first tokens."""
        probe = {k: batch[k][:1, :PROBE_TOKENS] for k in ("input_ids", "attention_mask")}
        base, head, softcap = self._parts()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                expected = self.model(**probe).logits.float()
                logits = F.linear(self._hidden(base, probe), head.weight, head.bias).float()
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
        except Exception as e:  # noqa: BLE001 - any failure means the structure is not the one assumed
            return f"calling {type(base).__name__} and the head separately failed ({type(e).__name__}: {e})"
        finally:
            self.model.train(was_training)
        if logits.shape != expected.shape:
            return f"the head gives logits of shape {tuple(logits.shape)}, the model {tuple(expected.shape)}"
        # Same ops in the same dtype give the same logits; a scale, a bias or another transform after the head
        # moves them by far more than this rounding allowance (bf16 autocast: 2**-8 relative).
        scale = expected.abs().max().clamp_min(1.0)
        if not torch.allclose(logits, expected, rtol=1e-2, atol=1e-2 * float(scale)):
            return "the model transforms its logits after the head (they differ from lm_head(last hidden state))"
        return None

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self._probed:
            self._probed = True
            self.reason = self._probe(batch)
            if self.reason:
                _warn_fallback(self.reason)
        if self.reason:
            return None
        base, head, softcap = self._parts()
        return causal_lm_cross_entropy(
            self._hidden(base, batch), head.weight, batch["labels"], head.bias, softcap=softcap,
            ignore_index=IGNORE_INDEX, reduction="sum",
        )


def _structure_problem(model) -> str | None:
    head = embedding_module(model, "output")
    if not isinstance(head, torch.nn.Linear):
        return (f"{type(model).__name__} has no nn.Linear output embedding "
                f"(get_output_embeddings() gives {type(head).__name__})")
    base = getattr(model, "base_model", None)
    if not isinstance(base, torch.nn.Module) or base is model:
        return f"{type(model).__name__} has no separate base_model to give the final hidden states"
    return None


def _warn_fallback(reason: str) -> None:
    warnings.warn(f"chunked_loss: using the plain loss (whole logits) because {reason}", stacklevel=3)
