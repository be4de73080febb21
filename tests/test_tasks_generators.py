"""The task generators: each answer is what the task says, nothing leaks, lengths are right."""

from __future__ import annotations

import random
import re

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.losses import IGNORE_INDEX
from nestlearn.tasks import copy as copy_task
from nestlearn.tasks import formal, mqar, niah
from nestlearn.tasks.example import NO_TAG, collate, with_tags
from nestlearn.tasks.haystack import clean_text


def test_mqar_answers_are_the_values_bound_to_the_queried_keys():
    vocab = mqar.MQARVocab(keys=20, values=10)
    for seed in range(20):
        example = mqar.mqar_example(random.Random(seed), pairs=8, queries=5, vocab=vocab)
        tokens = example.tokens
        context = tokens[1:17]
        assert tokens[0] == mqar.BOS and len(tokens) == 1 + 2 * 8 + 2 * 5
        keys, values = context[0::2], context[1::2]
        assert len(set(keys)) == 8
        assert all(2 <= k < 22 for k in keys) and all(22 <= v < 32 for v in values)
        bound = dict(zip(keys, values, strict=True))
        queried = [tokens[a - 1] for a in example.answers]
        assert len(set(queried)) == 5  # no query repeats, so earlier answers give nothing away
        for answer, distance in zip(example.answers, example.tags["distance"], strict=True):
            query = tokens[answer - 1]
            assert tokens[answer] == bound[query]
            assert tokens[answer - 1 - distance] == query  # the key's position in the context
        assert set(example.tags["pairs"]) == {8}


def test_mqar_is_seeded_and_refuses_more_pairs_than_keys():
    a = mqar.mqar_example(random.Random(3), pairs=6)
    assert a == mqar.mqar_example(random.Random(3), pairs=6)
    assert a != mqar.mqar_example(random.Random(4), pairs=6)
    with pytest.raises(NestlearnError, match="pairs: got 9"):
        mqar.mqar_example(random.Random(0), pairs=9, vocab=mqar.MQARVocab(keys=8))


def test_copy_repeats_the_sequence_and_scores_both_occurrences():
    example = copy_task.copy_example(random.Random(1), length=7)
    tokens = example.tokens
    assert len(tokens) == 2 + 2 * 7 and tokens[0] == copy_task.BOS and tokens[8] == copy_task.SEP
    assert tokens[1:8] == tokens[9:16]
    first = [a for a, o in zip(example.answers, example.tags["occurrence"], strict=True) if o == 1]
    second = [a for a, o in zip(example.answers, example.tags["occurrence"], strict=True)
              if o == 2]
    assert first == list(range(1, 8)) and second == list(range(9, 16))


@pytest.mark.parametrize("name", list(formal.LANGUAGES))
def test_formal_labels_follow_the_recognizer_and_lengths_stay_in_range(name):
    rng = random.Random(0)
    lang = formal.language(name)
    members = 0
    for _ in range(200):
        example = formal.formal_example(rng, name, 4, 24)
        tokens = example.tokens
        text = "".join(formal.ALPHABET[t - 5] for t in tokens[1:-2])
        assert tokens[0] == formal.BOS and tokens[-2] == formal.QUERY
        assert example.answers == (len(tokens) - 1,)
        assert 4 <= len(text) <= 24 and example.tags["length"] == (len(text),)
        assert set(text) <= set(lang.alphabet)
        member = lang.recognize(text)
        assert tokens[-1] == (formal.ACCEPT if member else formal.REJECT)
        assert example.tags["member"] == (int(member),)
        members += member
    assert 70 <= members <= 130  # both classes, about half each


def test_formal_recognizers_on_known_strings():
    assert formal.is_parity("0110") and not formal.is_parity("0111") and formal.is_parity("")
    assert formal.is_aa_star("aaaa") and not formal.is_aa_star("aaa")
    assert formal.is_abab_star("abababab") and not formal.is_abab_star("ababa")
    assert not formal.is_abab_star("abba")
    assert formal.is_anbn("aaabbb") and not formal.is_anbn("aabbb") and not formal.is_anbn("abab")
    assert formal.is_anbncn("aabbcc") and not formal.is_anbncn("aabcc")
    assert not formal.is_anbncn("abcabc")
    assert formal.is_shuffle2("([)]") and formal.is_shuffle2("[(])()")
    assert not formal.is_shuffle2(")(") and not formal.is_shuffle2("([)")
    assert not formal.is_shuffle2("(]")


def test_formal_negatives_of_counting_languages_are_not_told_by_length_alone():
    """Among non-members of a^n b^n of even length, some have equal counts (swaps, flips
    that keep the length): a model must read the order, not only count."""
    rng = random.Random(5)
    texts = []
    for _ in range(300):
        example = formal.formal_example(rng, "anbn", 4, 30)
        if example.tags["member"] == (0,):
            texts.append("".join(formal.ALPHABET[t - 5] for t in example.tokens[1:-2]))
    assert any(t.count("a") == t.count("b") for t in texts)


def test_abab_star_non_members_are_not_told_by_length_mod_4_alone():
    rng = random.Random(6)
    lengths = []
    for _ in range(400):
        example = formal.formal_example(rng, "abab-star", 1, 32)
        if example.tags["member"] == (0,):
            lengths.append(example.tags["length"][0])
    share = sum(n % 4 == 0 for n in lengths) / len(lengths)
    assert 0.35 < share < 0.65, share


def test_formal_refuses_a_range_without_members():
    with pytest.raises(NestlearnError, match="length range"):
        formal.draw_string(random.Random(0), formal.language("abab-star"), 5, 7, True)


HAYSTACK = clean_text("Now is the winter of our discontent made glorious summer by this sun "
                      "of York; and all the clouds that lour'd upon our house 1234 in the "
                      "deep bosom of the ocean buried. " * 40)


@pytest.mark.parametrize("name", list(niah.KINDS))
def test_niah_answer_is_the_needle_value_which_occurs_once(name):
    kind = niah.needle_kind(name)
    rng = random.Random(2)
    for length in (256, 512):
        for depth in (0.0, 0.25, 0.5, 1.0):
            haystack = HAYSTACK if kind.real_text else niah.filler_text(length)
            example = niah.niah_example(rng, name, length, depth, haystack)
            text = bytes(example.tokens).decode("ascii")
            assert len(example.tokens) == length
            answer = bytes(example.answer_tokens).decode("ascii")
            assert text.endswith(kind.question() + answer)
            context = text[:-len(answer)]
            assert context.count(answer) == 1
            assert context.count(kind.needle(answer)) == 1
            if name == "s-niah-1":
                assert re.fullmatch(r"[0-9]{5}", answer)
            elif name == "s-niah-2":
                assert re.fullmatch(r"[0-9]{7}", answer)
            else:
                assert re.fullmatch(r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}", answer)
            where = context.index(kind.needle(answer))
            haystack_chars = length - len(kind.needle(answer)) - len(kind.question()) - len(answer)
            assert abs(where - depth * haystack_chars) <= 40  # at the word boundary before
            assert example.tags["depth"] == (round(100 * depth),) * len(answer)


def test_niah_refuses_too_short_and_bad_depth():
    with pytest.raises(NestlearnError, match="length"):
        niah.niah_example(random.Random(0), "s-niah-1", 40, 0.5, niah.filler_text(100))
    with pytest.raises(NestlearnError, match="depth"):
        niah.niah_example(random.Random(0), "s-niah-1", 256, 1.5, niah.filler_text(300))


def test_clean_text_drops_digits_and_non_ascii():
    assert clean_text("Act 3,\n\n  scène 2") == "Act , scne "


def test_collate_aligns_targets_with_the_inputs_that_predict_them():
    short = with_tags([1, 5, 6, 7], [3], length=2)
    long = with_tags([1, 5, 6, 7, 8, 9], [2, 5], length=[4, 5])
    batch = collate([short, long], pad_id=0)
    assert batch.inputs.tolist() == [[1, 5, 6, 0, 0], [1, 5, 6, 7, 8]]
    expected = [[IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX],
                [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX, 9]]
    assert batch.targets.tolist() == expected
    assert batch.tags["length"].tolist() == [[NO_TAG, NO_TAG, 2, NO_TAG, NO_TAG],
                                             [NO_TAG, 4, NO_TAG, NO_TAG, 5]]
    assert torch.equal(batch.scored, batch.targets != IGNORE_INDEX)
