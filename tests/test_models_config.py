import pytest

from nestlearn.errors import NestlearnError
from nestlearn.models import ARCHS, ClassifierConfig, ModelConfig


def test_defaults_and_round_trip():
    config = ModelConfig(dim=96, heads=4)
    assert config.mlp_hidden == 256  # 8 * 96 / 3 = 256, already a multiple of 8
    assert ModelConfig(dim=100, heads=2).mlp_hidden == 272  # 266.7 rounded up to 8
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
    ({"rope_base": 1.0}, "rope_base"),
    ({"window": 0}, "window: got 0"),
    ({"arch": "titans-mag"}, "window: got None; allowed: an int >= 1 for arch 'titans-mag'"),
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
