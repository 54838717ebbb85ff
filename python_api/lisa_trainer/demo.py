"""The embedded default: a small random-weight Llama, a byte-level tokenizer and the sample data shipped here.

Nothing is downloaded. The tokenizer has one token per UTF-8 byte (256) plus BOS, EOS and PAD, so any text can be
encoded and the model's starting loss is about ln(vocab) = 5.6; the shipped sample data (English prose,
question/answer pairs and short conversations, about 22 KB) is enough for the loss to fall visibly in a minute on
a laptop CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEMO_DATA_DIR = Path(__file__).resolve().parent / "data"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# 8 decoder layers, so LISA has a real choice (2 of 8 per period by default); hidden 128 keeps a CPU step ~0.1 s.
DEMO_MODEL = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def demo_dataset_path() -> Path:
    return DEMO_DATA_DIR


def build_demo_tokenizer():
    """A byte-level tokenizer built in memory (``tokenizers`` model wrapped in ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD]
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for the byte values
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=DEMO_MODEL["max_position_embeddings"]
    )


def build_demo_model(tokenizer, *, seed: int = 0, **overrides):
    """A random-weight ``LlamaForCausalLM`` sized for the demo; ``overrides`` change ``LlamaConfig`` fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(DEMO_MODEL, **overrides)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )
    gen = torch.random.fork_rng(devices=[])  # build with the seed without disturbing the caller's RNG
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model
