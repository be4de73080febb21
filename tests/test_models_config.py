import dataclasses
import json

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.models import (
    ARCHS,
    ArchSpec,
    ClassifierConfig,
    ModelConfig,
    build_model,
    register_arch,
)
from nestlearn.nn.titans import NeuralMemoryConfig
from nestlearn.nn.transformer import SwiGLU
from nestlearn.training.recipes import get_recipe
from nestlearn.training.runconfig import RunConfig, apply_overrides, field_names


def test_defaults_and_round_trip():
    config = ModelConfig(dim=96, heads=4)
    assert config.mlp_width == 256  # 8 * 96 / 3 = 256, already a multiple of 8
    assert ModelConfig(dim=100, heads=2).mlp_width == 272  # 266.7 rounded up to 8
    assert ModelConfig(dim=100, heads=2, mlp_hidden=64).mlp_width == 64
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.fingerprint() == ModelConfig.from_dict(config.to_dict()).fingerprint()
    assert config.fingerprint() != ModelConfig(dim=96, heads=2).fingerprint()
    assert set(ARCHS) == {"transformer", "hope", "hope-attention", "titans", "titans-mag"}


@pytest.mark.parametrize(("fields", "message"), [
    ({"arch": "rnn"}, r"arch: got 'rnn'; allowed: one of \['transformer'"),
    ({"vocab_size": 0}, "vocab_size: got 0; allowed: an int >= 1"),
    ({"dim": 16.0}, "dim: got 16.0"),
    ({"dim": 16, "heads": 3}, "heads: got 3; allowed: a divisor of dim=16"),
    ({"dim": 12, "heads": 4}, "even head size"),
    ({"layers": True}, "layers: got True"),
    ({"mlp_hidden": -1}, "mlp_hidden"),
    ({"tie_embeddings": 1}, "tie_embeddings: got 1; allowed: true or false"),
    ({"norm_eps": 0}, "norm_eps"),
    ({"attention": {"rope_base": 1.0}}, "attention.rope_base"),
    ({"attention": {"window": 0}}, "attention.window: got 0"),
    ({"arch": "titans-mag"},
     "attention.window: got None; allowed: an int >= 1 for arch 'titans-mag'"),
    ({"arch": "hope-attention", "attention": {"window": 4}},
     "attention.window: got 4; allowed: None for arch 'hope-attention'"),
    ({"arch": "titans", "attention": {"window": 4}},
     "attention: got dict; allowed: None for arch 'titans' .it has no attention."),
    ({"arch": "titans", "memory": {"chunk_size": 0}}, "memory.chunk_size: got 0"),
    ({"arch": "titans", "memory": {"chunk_sizes": 4}}, r"memory keys: got \['chunk_sizes'\]"),
    ({"arch": "titans", "memory": {"dim": 32}}, r"memory keys: got \['dim'\]"),
    ({"arch": "hope", "cms": {"inner_lr": -1.0}}, "cms.inner_lr"),
    ({"arch": "hope", "cms": "fast"}, "cms: got str; allowed: a CMSConfig"),
    ({"cms": {"chunk_sizes": (2,)}}, "cms: got dict; allowed: None for arch 'transformer'"),
])
def test_bad_values_name_field_value_and_allowed(fields, message):
    with pytest.raises(NestlearnError, match=message):
        ModelConfig(**fields)


def test_unknown_keys_are_refused():
    with pytest.raises(NestlearnError, match="dimension"):
        ModelConfig.from_dict({"arch": "transformer", "dimension": 3})


def test_classifier_config():
    config = ClassifierConfig(ModelConfig(), num_classes=4, pooling="last")
    assert ClassifierConfig.from_dict(config.to_dict()) == config
    with pytest.raises(NestlearnError, match="pooling"):
        ClassifierConfig(ModelConfig(), 4, "max")
    with pytest.raises(NestlearnError, match="num_classes"):
        ClassifierConfig(ModelConfig(), 1)
    with pytest.raises(NestlearnError, match="backbone"):
        ClassifierConfig("transformer", 3)


def test_sections_take_the_models_width_and_keep_what_was_asked_for():
    config = ModelConfig(arch="hope", dim=32, heads=4, memory={"chunk_size": 8})
    assert config.memory.dim == 32 and config.memory.heads == 4 and config.memory.head_dim == 8
    assert config.memory.inner_chunk_size == 16  # the model's default for HOPE
    assert config.memory.eta_max is None  # derived from the chunk sizes when used
    assert config.cms.dim == 32 and config.cms.hidden is None
    assert config.cms_layer_config().level_hidden == (config.mlp_width,) * 2
    wider = dataclasses.replace(config, dim=64)
    assert wider.memory.dim == 64 and wider.memory.head_dim == 16 and wider.cms.dim == 64
    assert wider.memory.chunk_size == 8
    assert "dim" not in config.to_dict()["memory"] and "dim" not in config.to_dict()["cms"]
    # a layer config works as a section too; its width is replaced by the model's
    memory = NeuralMemoryConfig(dim=8, heads=1, chunk_size=5)
    titans = ModelConfig(arch="titans", dim=16, heads=2, memory=memory)
    assert titans.memory.chunk_size == 5 and titans.memory.dim == 16
    assert ModelConfig.from_dict(json.loads(json.dumps(titans.to_dict()))) == titans


def test_every_arch_is_one_registry_entry_with_its_sections():
    for name, spec in ARCHS.items():
        config = ModelConfig(arch=name, attention={"window": 4} if name == "titans-mag" else None)
        assert (config.attention is not None) == (spec.attention != "none")
        assert (config.cms is not None) == spec.cms
        assert type(config.memory) is (spec.memory or type(None))
        block = spec.build_block(config)
        assert callable(block)


def test_a_new_arch_is_one_function_and_one_entry():
    name = "test-mlp-only"

    class MLPOnly(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.mlp = SwiGLU(config.dim, config.mlp_width)

        def init_state(self, batch, *, device=None, dtype=None):
            return None  # stateless: nothing carries over between segments

        def forward(self, x, state=None):
            return x + self.mlp(x), state

    register_arch(ArchSpec(name, MLPOnly, "an MLP per block, no mixing"))
    try:
        model = build_model(ModelConfig(arch=name, vocab_size=11, dim=8, heads=2))
        logits, _ = model(torch.randint(0, 11, (2, 5)))
        assert logits.shape == (2, 5, 11)
        with pytest.raises(NestlearnError, match="already registered"):
            register_arch(ArchSpec(name, MLPOnly, "again"))
    finally:
        del ARCHS[name]


def test_set_reaches_every_section_and_refuses_what_the_model_sets():
    config = get_recipe("tiny-hope")
    config = apply_overrides(config, ["model.cms.inner_lr=0.01", "model.memory.chunk_size=32",
                                      "model.memory.memory_target=self", "model.dim=64"])
    assert config.model.cms.inner_lr == 0.01 and config.model.cms.level_inner_lr == (0.01, 0.01)
    assert config.model.memory.chunk_size == 32 and config.model.memory.memory_target == "self"
    assert config.model.memory.dim == 64 and config.model.cms.dim == 64
    assert RunConfig.from_dict(json.loads(config.to_json())) == config
    names = field_names(config)
    assert "model.cms.inner_lr" in names and "model.memory.chunk_size" in names
    assert "model.memory.dim" not in names and "model.cms.norm_eps" not in names
    with pytest.raises(NestlearnError, match=r"model\.memory\.dim is set by model\.dim"):
        apply_overrides(config, ["model.memory.dim=32"])
    with pytest.raises(NestlearnError, match=r"'model\.attention' is not used"):
        apply_overrides(config, ["model.attention.window=8"])
    with pytest.raises(NestlearnError, match="chunk_size: got 0"):
        apply_overrides(config, ["model.memory.chunk_size=0"])


def test_changing_arch_keeps_the_sections_the_new_arch_uses():
    hope = apply_overrides(get_recipe("tiny-hope"), ["model.cms.inner_lr=0.01"])
    attention = apply_overrides(hope, ["model.arch=hope-attention"]).model
    assert attention.cms == hope.model.cms and attention.memory is None
    assert attention.attention.window is None
    titans = apply_overrides(hope, ["model.arch=titans"]).model
    assert isinstance(titans.memory, NeuralMemoryConfig) and titans.cms is None
    mag = apply_overrides(get_recipe("tiny-transformer"),
                          ["model.attention.window=8", "model.arch=titans-mag"]).model
    assert mag.attention.window == 8
    back = apply_overrides(get_recipe("tiny-transformer"),
                           ["model.attention.window=8", "model.arch=hope-attention"]).model
    assert back.attention.window is None  # hope-attention's attention is global


@pytest.mark.parametrize(("arch", "sets", "limited"), [
    ("transformer", [], True),
    ("transformer", ["model.attention.window=8"], False),
    ("hope-attention", [], True),
    ("hope", [], False),
    ("titans", [], False),
])
def test_generation_limits_the_context_of_global_attention_only(arch, sets, limited):
    from nestlearn.cli.generate import default_context

    config = apply_overrides(get_recipe(f"tiny-{arch}"), sets)
    assert default_context(config) == (config.data.seq_len if limited else None)
