"""A saved tiny Llama with the demo's byte-level tokenizer, for tests that run `lisa-finetune` on a model folder."""

from pathlib import Path

from lisa_trainer.demo import build_demo_model, build_demo_tokenizer

# 3 layers, so LISA has a choice; 1024 positions, so the README's --block_size 1024 runs as is.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=1024)


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """The tiny model and its tokenizer saved in `folder` (as `from_pretrained` reads them); returns `folder`."""
    tok = build_demo_tokenizer()
    build_demo_model(tok, seed=seed, **TINY).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
