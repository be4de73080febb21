import dataclasses

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.models.llama import modeling_llama

from nestlearn.cli import main
from nestlearn.errors import NestlearnError
from nestlearn.hf import load_hf_folder, stack_levels_from_hf, transformer_from_llama
from nestlearn.models import generate
from nestlearn.nn.cms import ContinuumMemoryState

VOCAB = 23


def _llama(dtype=torch.float64, seed=0, **overrides) -> LlamaForCausalLM:
    """A tiny Llama with random weights (norm gains too, so every weight matters)."""
    fields = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 24,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default",
                                                        "rope_theta": 500.0},
              "tie_word_embeddings": False, **overrides}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **fields))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0, 0.3)
    return model.to(dtype).eval()


def _rms_norm_float64(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_float64(self, x, position_ids):
    theta = self.config.rope_parameters["rope_theta"]
    dim = self.inv_freq.shape[0] * 2
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = position_ids[..., None].double() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@pytest.fixture
def llama_in_float64(monkeypatch):
    """Llama's RMSNorm and RoPE compute in float32 whatever the model's dtype; the same
    formulas without that cast make the float64 reference for exact comparisons."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_float64)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", _rotary_float64)


def _ids(length=19, batch=2, seed=3):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("tied", [False, True])
def test_llama_converts_to_an_exact_transformer(llama_in_float64, kv_heads, tied):
    source = _llama(num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    model = transformer_from_llama(source)
    assert model.config.arch == "transformer" and model.config.tie_embeddings is tied
    assert model.config.attention.rope_base == 500.0 and model.config.norm_eps == 1e-5
    ids = _ids()
    with torch.no_grad():
        expected = source(ids).logits
    got, _ = model(ids)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", ["sequential", "independent"])
def test_stacked_levels_give_exactly_the_llama_logits_at_zero_inner_rate(llama_in_float64,
                                                                         variant):
    source = _llama()
    stacked = stack_levels_from_hf(source, cms_chunk_sizes=(2, 6), cms={"variant": variant})
    assert stacked.config.arch == "hope-attention"
    ids = _ids()
    with torch.no_grad():
        expected = source(ids).logits
        prompt_tokens = source.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    got, _ = stacked(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(generate(stacked, ids[:, :5], 6, temperature=0), prompt_tokens)


def test_float32_llama_matches_its_own_float32_computation():
    source = _llama(dtype=torch.float32)
    stacked = stack_levels_from_hf(source, cms_chunk_sizes=(4,))
    assert next(stacked.parameters()).dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        expected = source(ids).logits
    got, _ = stacked(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_positive_inner_rate_levels_learn_from_the_llama_start(llama_in_float64):
    source = _llama()
    stacked = stack_levels_from_hf(source, cms_chunk_sizes=(4, 8), cms_inner_lr=0.5)
    ids = _ids(12)
    with torch.no_grad():
        expected = source(ids).logits
    got, state = stacked(ids)
    # The slow level holding each Llama MLP first updates at position 8 (its chunk boundary);
    # the fresh fast level has zero output and a zero local target (CMS.md), so it stays put.
    torch.testing.assert_close(got[:, :8], expected[:, :8], rtol=0, atol=1e-10)
    assert not torch.allclose(got[:, 8:], expected[:, 8:])
    for block_state, layer in zip(state.blocks, source.model.layers, strict=True):
        w_gate = _cms_states(block_state)[0].levels[1].weights[0]
        assert w_gate.shape == (2, *layer.mlp.gate_proj.weight.shape)
        assert not torch.allclose(w_gate, layer.mlp.gate_proj.weight.expand_as(w_gate))
    _, frozen_state = stack_levels_from_hf(source, cms_chunk_sizes=(4, 8))(ids)
    for block_state, layer in zip(frozen_state.blocks, source.model.layers, strict=True):
        w_gate = _cms_states(block_state)[0].levels[1].weights[0]
        torch.testing.assert_close(w_gate.expand_as(layer.mlp.gate_proj.weight),
                                   layer.mlp.gate_proj.weight, rtol=0, atol=0)


def _cms_states(tree):
    """The ``ContinuumMemoryState`` objects inside a block's state."""
    if isinstance(tree, ContinuumMemoryState):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [found for item in tree for found in _cms_states(item)]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [found for field in dataclasses.fields(tree)
                for found in _cms_states(getattr(tree, field.name))]
    return []


def test_hope_arch_takes_the_llama_mlps():
    source = _llama()
    stacked = stack_levels_from_hf(source, arch="hope", cms_chunk_sizes=(2, 6))
    assert stacked.config.arch == "hope"
    for block, layer in zip(stacked.backbone.blocks, source.model.layers, strict=True):
        torch.testing.assert_close(block.cms.initial[1].w_gate, layer.mlp.gate_proj.weight)
        torch.testing.assert_close(block.cms.initial[1].w_down, layer.mlp.down_proj.weight)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 8}, "head_dim"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
     "rope_type"),
])
def test_inexact_llama_options_are_refused(overrides, field):
    with pytest.raises(NestlearnError, match=rf"hf_model\.config\.[a-z_.]*{field}"):
        transformer_from_llama(_llama(dtype=torch.float32, **overrides))


def test_gpt2_and_other_models_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(NestlearnError, match="GPT-2 cannot be stacked exactly"):
        stack_levels_from_hf(gpt2)
    with pytest.raises(NestlearnError, match="hf_model"):
        stack_levels_from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(NestlearnError, match="arch"):
        stack_levels_from_hf(_llama(dtype=torch.float32), arch="titans")


def test_stack_command_writes_a_hope_folder_equal_to_the_llama(llama_in_float64, tmp_path,
                                                              capsys):
    source = _llama()
    source.save_pretrained(tmp_path / "llama")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")), eos_token="w1")
    tokenizer.save_pretrained(tmp_path / "llama")
    argv = ["stack", "--from-hf", str(tmp_path / "llama"), "--out", str(tmp_path / "hope"),
            "--cms-chunk-sizes", "2,6", "--mlp-level", "0"]
    assert main(argv) == 0
    stacked = load_hf_folder(tmp_path / "hope")
    assert stacked.config.arch == "hope-attention"
    assert stacked.config.cms.chunk_sizes == (2, 6)
    assert AutoTokenizer.from_pretrained(tmp_path / "hope").get_vocab() == vocab
    ids = _ids()
    with torch.no_grad():
        expected = source(ids).logits
    got, _ = stacked(ids)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert main(["stack", "--from-hf", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "from_hf" in capsys.readouterr().err
