"""Decoder-layer discovery and always-trainable modules on tiny random-weight models of many architectures."""

import pytest
import torch
import transformers
from torch import nn

from lisa_trainer.layers import always_trainable_modules, find_decoder_layers, layer_candidates

N_LAYERS = 3
_TOKENS = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **_TOKENS)

# (config class, kwargs, decoder-layer path, always-trainable paths, tied). The paths are where transformers 5.x
# keeps these modules; discovery must find them without being told. HEAD stands for the path of
# get_output_embeddings(), which moved between 5.x releases for some models (GPT-NeoX: embed_out -> lm_head).
HEAD = object()
ARCHITECTURES = {
    "llama": ("LlamaConfig", _DECODER, "model.layers", ["model.embed_tokens", HEAD, "model.norm"], False),
    "mistral": ("MistralConfig", _DECODER, "model.layers", ["model.embed_tokens", HEAD, "model.norm"], False),
    "qwen2": ("Qwen2Config", _DECODER, "model.layers", ["model.embed_tokens", HEAD, "model.norm"], False),
    "qwen3": ("Qwen3Config", _DECODER, "model.layers", ["model.embed_tokens", HEAD, "model.norm"], False),
    "gemma": ("GemmaConfig", _DECODER, "model.layers", ["model.embed_tokens", "model.norm"], True),
    "gemma2": ("Gemma2Config", _DECODER, "model.layers", ["model.embed_tokens", "model.norm"], True),
    "phi": ("PhiConfig", {**_DECODER, "num_key_value_heads": 4}, "model.layers",
            ["model.embed_tokens", HEAD, "model.final_layernorm"], False),
    "phi3": ("Phi3Config", _DECODER, "model.layers", ["model.embed_tokens", HEAD, "model.norm"], False),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64, **_TOKENS),
             "transformer.h", ["transformer.wte", "transformer.ln_f"], True),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                       num_attention_heads=4, max_position_embeddings=64, **_TOKENS),
                 "gpt_neox.layers", ["gpt_neox.embed_in", HEAD, "gpt_neox.final_layer_norm"], False),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=64, **_TOKENS),
            "model.decoder.layers", ["model.decoder.embed_tokens", "model.decoder.final_layer_norm"], True),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4, **_TOKENS),
               "transformer.h", ["transformer.word_embeddings", "transformer.ln_f"], True),
    "mixtral": ("MixtralConfig", {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}, "model.layers",
                ["model.embed_tokens", HEAD, "model.norm"], False),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=N_LAYERS, n_head=4, **_TOKENS),
              "transformer.h", ["transformer.word_embeddings", "transformer.ln_f"], True),
}


def tiny_causal_lm(arch: str) -> nn.Module:
    config_name, kwargs, *_ = ARCHITECTURES[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**kwargs)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_discovers_decoder_layers_and_always_trainable(arch):
    _, _, layers_path, always_paths, tied = ARCHITECTURES[arch]
    model = tiny_causal_lm(arch)

    path, layers = find_decoder_layers(model)
    assert path == layers_path
    assert layers is model.get_submodule(layers_path) and len(layers) == N_LAYERS

    always = always_trainable_modules(model)
    head_path = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    assert list(always) == [head_path if p is HEAD else p for p in always_paths]
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    # Every always-trainable parameter is counted once, and none lies inside the decoder layers.
    params = [p for m in always.values() for p in m.parameters()]
    assert len({id(p) for p in params}) == len(params)
    in_layers = {id(p) for p in layers.parameters()}
    assert not any(id(p) in in_layers for p in params)
    assert model.get_input_embeddings().weight in params


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_user_layers_attribute_wins(arch):
    model = tiny_causal_lm(arch)
    auto_path, _ = find_decoder_layers(model)
    # A longer list of identical blocks elsewhere in the model: discovery keeps the decoder layers (they sit beside
    # the input embeddings), and the user's choice is used verbatim when given.
    model.extra_blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(7)])
    assert find_decoder_layers(model)[0] == auto_path  # discovery is unaffected: not beside the embeddings
    path, layers = find_decoder_layers(model, layers_attribute="extra_blocks")
    assert path == "extra_blocks" and len(layers) == 7


def test_wrong_layers_attribute_names_the_path():
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match=r"layers_attribute='model\.blocks'.*'model\.layers'"):
        find_decoder_layers(model, layers_attribute="model.blocks")
    with pytest.raises(ValueError, match=r"layers_attribute='model\.norm' names a LlamaRMSNorm"):
        find_decoder_layers(model, layers_attribute="model.norm")


class _Block(nn.Module):
    def __init__(self, width=8, experts=0):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        if experts:
            self.experts = nn.ModuleList([nn.Linear(width, width) for _ in range(experts)])


class _Toy(nn.Module):
    """A decoder-only model written from scratch: no transformers class names to lean on."""

    def __init__(self, blocks, vision=None):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = blocks
        self.final = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16, bias=False)
        if vision is not None:
            self.vision = vision

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_nested_expert_lists_are_not_mistaken_for_layers():
    # 8 experts per block outnumber the 3 blocks, but they sit inside the blocks.
    model = _Toy(nn.ModuleList([_Block(experts=8) for _ in range(3)]))
    assert find_decoder_layers(model)[0] == "blocks"


def test_text_decoder_beside_embeddings_beats_longer_vision_tower():
    vision = nn.Module()
    vision.layers = nn.ModuleList([_Block(width=4) for _ in range(6)])
    model = _Toy(nn.ModuleList([_Block() for _ in range(3)]), vision=vision)
    assert find_decoder_layers(model)[0] == "blocks"
    assert list(always_trainable_modules(model)) == ["embed", "head", "final"]


def test_mixed_blocks_are_a_fallback_and_nothing_found_lists_candidates():
    hybrid = _Toy(nn.ModuleList([_Block(width=8), _Block(width=8), _Block(width=8)]))
    hybrid.blocks[1].proj = nn.Linear(8, 8, bias=False)  # same class, different parameters
    assert find_decoder_layers(hybrid)[0] == "blocks"

    odd = _Toy(nn.ModuleList([_Block(), nn.Linear(8, 8)]))
    assert [c.path for c in layer_candidates(odd)] == ["blocks"]
    with pytest.raises(ValueError) as err:
        find_decoder_layers(odd)
    message = str(err.value)
    assert "'blocks': 2 x _Block/Linear (mixed blocks" in message
    assert "--lisa_layers_attribute" in message and "layers_attribute=" in message


def test_always_trainable_is_configurable():
    model = tiny_causal_lm("llama")
    assert list(always_trainable_modules(model, include=())) == []
    assert list(always_trainable_modules(model, include=["final_norm"])) == ["model.norm"]
    assert list(always_trainable_modules(model, include=["lm_head", "model.rotary_emb"])) == ["lm_head"]  # no params
    with pytest.raises(ValueError, match="'model.nope' is neither a role"):
        always_trainable_modules(model, include=["model.nope"])
    with pytest.raises(ValueError, match="inside the decoder layers"):
        always_trainable_modules(model, include=["model.layers.1.mlp"])


def test_tied_head_listed_once_untied_bias_kept():
    model = _Toy(nn.ModuleList([_Block() for _ in range(2)]))
    model.head = nn.Linear(8, 16, bias=True)
    model.head.weight = model.embed.weight  # tied weight, own bias: the head stays, its weight counted once
    always = always_trainable_modules(model)
    assert list(always) == ["embed", "head", "final"]
    model.head = nn.Linear(8, 16, bias=False)
    model.head.weight = model.embed.weight  # fully tied: nothing left to list
    assert list(always_trainable_modules(model)) == ["embed", "final"]


def test_llava_text_decoder_not_the_longer_vision_tower():
    text = transformers.LlamaConfig(**{**_DECODER, "num_hidden_layers": 3})
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=5))
    assert [c.path for c in layer_candidates(model)] == ["model.vision_tower.encoder.layers",
                                                         "model.language_model.layers"]
    assert find_decoder_layers(model)[0] == "model.language_model.layers"
    assert list(always_trainable_modules(model)) == [
        "model.language_model.embed_tokens", "lm_head", "model.language_model.norm"]
