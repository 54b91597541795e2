import json

import pytest
import torch

from conftest import REF
from inference import MAX_TEXT_LENGTH, get_text_input_ids_and_mask, tokenizer_encode

CASES = json.loads((REF / "tokenizer_cases.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["input"][:20] for c in CASES])
def test_tokenizer_matches_reference(case):
    ids, text = tokenizer_encode(case["input"], return_normalized_text=True)
    assert text == case["normalized"]
    assert ids.tolist() == case["ids"]


def test_tokenizer_without_normalisation_or_bos():
    assert tokenizer_encode("a:b", append_bos=False, normalize=False).tolist() == list(b"a:b")


def test_batch_ids_and_mask_pad_and_truncate():
    ids, mask = get_text_input_ids_and_mask(["ab", "abcd"], max_length=None, normalize=False)
    assert ids.shape == (2, 5) and ids.dtype == torch.int32
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert ids[0].tolist() == [0, 97, 98, 0, 0]

    ids, mask = get_text_input_ids_and_mask(["abcdef"], max_length=4, normalize=False)
    assert ids.tolist() == [[0, 97, 98, 99]] and mask.all()

    ids, mask = get_text_input_ids_and_mask(["ab"], max_length=MAX_TEXT_LENGTH, normalize=False, pad_to_max=True)
    assert ids.shape == (1, MAX_TEXT_LENGTH) and int(mask.sum()) == 3

    ids, mask = get_text_input_ids_and_mask(["ab"], max_length=MAX_TEXT_LENGTH, normalize=False, pad_to_max=False)
    assert ids.shape == (1, 3)


def test_return_normalized_text():
    _, _, texts = get_text_input_ids_and_mask(["hi: there"], max_length=None, return_normalized_text=True)
    assert texts == ["[S1] hi, there"]
