"""The Hugging Face integration (``nestlearn.hf``): every arch behind ``AutoModelForCausalLM``,
``generate`` equal to nestlearn's own (greedy; sampling with the same seed), top-k, top-p, EOS,
streaming, the cache, the loss, folder round trips and the tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from model_cases import ARCHS_WIRED, VOCAB, random_ids, tiny_model
from nestlearn.data.tokenizers import BPETokenizer, ByteTokenizer
from nestlearn.errors import NestlearnError
from nestlearn.hf import (
    NestlearnCache,
    NestlearnForCausalLM,
    from_hf,
    hf_classes,
    load_hf_folder,
    save_hf_folder,
    to_hf,
)
from nestlearn.models import ARCHS, build_model, from_pretrained, generate, save_pretrained


def hf_model(arch: str, dtype: torch.dtype = torch.float32) -> NestlearnForCausalLM:
    return to_hf(tiny_model(arch, dtype=dtype).eval())


@pytest.mark.parametrize("arch", ARCHS_WIRED)
def test_greedy_generate_equals_nestlearn_generate(arch):
    model = hf_model(arch)
    assert type(model).__name__ == hf_classes(arch)[1].__name__
    ids = random_ids(2, 7)
    expected = generate(from_hf(model), ids, max_new_tokens=9, temperature=0.0)
    out = model.generate(ids, max_new_tokens=9, do_sample=False)
    assert torch.equal(out, expected)


def test_sampling_with_the_same_seed_equals_nestlearn_sampling():
    model = hf_model("hope")
    ids = random_ids(2, 5, seed=1)
    torch.manual_seed(7)
    expected = generate(from_hf(model), ids, 12, temperature=0.8, top_k=6)
    torch.manual_seed(7)
    out = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=6,
                         top_p=1.0)
    assert torch.equal(out, expected)
    torch.manual_seed(8)
    other = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=6,
                           top_p=1.0)
    assert not torch.equal(other, expected)  # sampling does sample


def test_top_k_one_and_tiny_top_p_reduce_sampling_to_greedy():
    model = hf_model("titans")
    ids = random_ids(2, 6, seed=2)
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
    for options in ({"top_k": 1}, {"top_p": 1e-6, "top_k": 0}):
        torch.manual_seed(0)
        out = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, **options)
        assert torch.equal(out, greedy), options


def test_eos_stops_generation_and_pads_finished_rows():
    model = hf_model("hope-attention")
    ids = random_ids(2, 6, seed=3)
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
    eos = int(greedy[0, 6 + 2])  # the third new token of row 0
    first = next(i for i in range(8) if int(greedy[0, 6 + i]) == eos)
    out = model.generate(ids[:1], max_new_tokens=8, do_sample=False, eos_token_id=eos)
    assert torch.equal(out, greedy[:1, :6 + first + 1])
    pad = (eos + 1) % VOCAB
    both = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                          pad_token_id=pad)
    assert torch.equal(both[0, :6 + first + 1], greedy[0, :6 + first + 1])
    assert (both[0, 6 + first + 1:] == pad).all()


class Collect(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1).clone())

    def end(self) -> None:
        self.ended = True


def test_streamer_receives_the_prompt_then_each_token():
    model = hf_model("hope")
    ids = random_ids(1, 5, seed=4)
    streamer = Collect()
    out = model.generate(ids, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert streamer.ended and len(streamer.chunks) == 1 + 6
    assert torch.equal(torch.cat(streamer.chunks), out[0])


def test_forward_carries_the_state_in_the_cache_and_computes_the_loss():
    model = hf_model("hope", dtype=torch.float64)
    ids = random_ids(2, 11, seed=5)
    full, _ = from_hf(model)(ids)
    first = model(ids[:, :4])
    cache = first.cache
    assert isinstance(cache, NestlearnCache) and cache.get_seq_length() == 4
    second = model(ids[:, 4:], cache=cache)
    assert second.cache is cache and cache.seen_tokens == 11
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full,
                               rtol=1e-10, atol=1e-10)
    labels = ids.clone()
    labels[0, 5] = -100
    loss = model(ids, labels=labels, use_cache=False).loss
    manual = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, VOCAB),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, manual)
    assert model(ids, use_cache=False).cache is None
    # a cache returned by generate continues the stream: the same tokens as one call
    result = model.generate(ids[:, :6], max_new_tokens=3, do_sample=False,
                            return_dict_in_generate=True)
    assert result.cache.seen_tokens == 6 + 3 - 1
    more = model.generate(result.sequences, cache=result.cache, max_new_tokens=4,
                          do_sample=False)
    assert torch.equal(more, model.generate(ids[:, :6], max_new_tokens=7, do_sample=False))


def test_every_arch_is_registered_with_the_auto_classes():
    for arch in ARCHS:
        config_cls, model_cls = hf_classes(arch)
        assert config_cls.model_type == "nestlearn_" + arch.replace("-", "_")
        config = AutoConfig.for_model(config_cls.model_type)
        assert type(config) is config_cls and config.model_config().arch == arch
        assert type(AutoModelForCausalLM.from_config(config)) is model_cls


@pytest.mark.parametrize("arch", ["titans-mag", "hope"])
def test_nestlearn_folder_to_hf_folder_and_back(arch, tmp_path):
    model = tiny_model(arch, dtype=torch.float64)
    save_pretrained(model, tmp_path / "nestlearn")
    save_hf_folder(tmp_path / "nestlearn", tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert type(loaded) is hf_classes(arch)[1] and loaded.dtype == torch.float64
    back = load_hf_folder(tmp_path / "hf")
    assert back.config == model.config
    save_pretrained(back, tmp_path / "again")
    again = from_pretrained(tmp_path / "again")
    expected = model.state_dict()
    assert again.state_dict().keys() == expected.keys()
    for name, tensor in again.state_dict().items():
        assert tensor.dtype == torch.float64 and torch.equal(tensor, expected[name]), name


def test_hf_folder_carries_the_tokenizer_and_its_eos(tmp_path):
    tokenizer = BPETokenizer.train(["the king and the queen, the crown\n"] * 30, vocab_size=300)
    torch.manual_seed(0)
    model = build_model(tiny_model("hope").config.replace_field("vocab_size", 300))
    save_hf_folder(model, tmp_path / "hf", tokenizer=tokenizer)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the king and the crown"
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (0, 1)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.generation_config.eos_token_id == tokenizer.eod_id
    with pytest.raises(NestlearnError, match="tokenizer: got ByteTokenizer"):
        save_hf_folder(model, tmp_path / "byte", tokenizer=ByteTokenizer())


def test_bad_input_is_one_clear_error():
    model = hf_model("transformer")
    ids = random_ids(2, 5)
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    with pytest.raises(NestlearnError, match="attention_mask: got zeros"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert torch.equal(model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=2, do_sample=False),
                       model.generate(ids, max_new_tokens=2, do_sample=False))
    with pytest.raises(NestlearnError, match="num_beams: beam search is not supported"):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    with pytest.raises(NestlearnError, match=r"forward: got arguments \['inputs_embeds'\]"):
        model(ids, inputs_embeds=torch.zeros(2, 5, 16))
    config_cls = hf_classes("hope")[0]
    with pytest.raises(NestlearnError, match="arch 'transformer'; allowed: 'hope'"):
        config_cls(nestlearn=model.config.nestlearn)
    with pytest.raises(NestlearnError, match="arch: got 'nope'"):
        hf_classes("nope")
    with pytest.raises(NestlearnError, match="model: got Linear"):
        to_hf(torch.nn.Linear(2, 2))


def test_the_core_never_imports_transformers():
    code = ("import sys, nestlearn, nestlearn.models, nestlearn.training, nestlearn.cli, "
            "nestlearn.data, nestlearn.evaluate; "
            "assert not {'transformers', 'lm_eval'} & set(sys.modules), 'imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_export_cli_writes_a_run_as_a_hf_folder(tmp_path, capsys):
    from nestlearn.cli import main
    from nestlearn.training import load_trained
    from trainkit import tiny_sets, write_corpus

    corpus = write_corpus(tmp_path / "verse.txt", paragraphs=60)
    run = tmp_path / "run"
    assert main(["train", "--recipe", "tiny-hope", "--out", str(run), "--no-progress",
                 *tiny_sets(f"data.corpus={corpus}", "train.steps=1")]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "byte tokenizer" in captured.err
    model, _, tokenizer, _ = load_trained(run)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.generation_config.eos_token_id is None
    ids = torch.tensor([[tokenizer.eod_id, *tokenizer.encode("The king")]])
    assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False),
                       generate(model, ids, 6, temperature=0.0))
    assert main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
