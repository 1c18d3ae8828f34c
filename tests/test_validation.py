"""Bad input raises ValueError/IndexError naming the argument, before any kernel runs."""

import pytest
import torch

import fastpeft


def _good(**overrides):
    args = dict(q=torch.randn(2, 4, 3, 8), k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8),
                prefix_k=torch.randn(3, 2, 4, 8), prefix_v=torch.randn(3, 2, 4, 8),
                prefix_index=torch.tensor([0, 2]), prefix_lengths=torch.tensor([4, 0, 2]),
                key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    args.update(overrides)
    return args


def test_good_arguments_run():
    assert fastpeft.prefix_attention(**_good()).shape == (2, 4, 3, 8)


@pytest.mark.parametrize("overrides, error, words", [
    (dict(q=torch.randn(2, 4, 8)), ValueError, "q must be 4-D"),
    (dict(v=torch.randn(2, 2, 6, 8)), ValueError, "k and v"),
    (dict(q=torch.randn(2, 3, 3, 8)), ValueError, "multiple of the kv heads"),
    (dict(q=torch.randn(2, 4, 6, 8)), ValueError, "S >= L"),
    (dict(q=torch.randn(3, 4, 3, 8)), ValueError, "k must be"),
    (dict(q=torch.randn(2, 4, 3, 8, dtype=torch.float16)), ValueError, "one dtype"),
    (dict(q=torch.randint(0, 3, (2, 4, 3, 8))), ValueError, "dtype"),
    (dict(prefix_v=torch.randn(3, 2, 5, 8)), ValueError, "prefix_k and prefix_v"),
    (dict(prefix_k=torch.randn(3, 1, 4, 8), prefix_v=torch.randn(3, 1, 4, 8)), ValueError, "prefix_k must have"),
    (dict(prefix_index=None), ValueError, "prefix_index [B] is required"),
    (dict(prefix_index=torch.tensor([0, 3])), IndexError, "prefix_index"),
    (dict(prefix_index=torch.tensor([-1, 0])), IndexError, "prefix_index"),
    (dict(prefix_index=torch.tensor([0.0, 1.0])), ValueError, "prefix_index must have an integer dtype"),
    (dict(prefix_index=torch.tensor([0, 1, 2])), ValueError, "prefix_index must have shape"),
    (dict(prefix_lengths=torch.tensor([5, 0, 2])), ValueError, "prefix_lengths"),
    (dict(prefix_lengths=torch.tensor([4, 0])), ValueError, "prefix_lengths must have shape"),
    (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(key_padding_mask=torch.ones(2, 5)), ValueError, "key_padding_mask must be bool"),
    (dict(prefix_k=torch.randn(2, 4, 8), prefix_v=torch.randn(2, 4, 8)), ValueError, "prefix_index is only"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(q=torch.randn(2, 4, 3, 300), k=torch.randn(2, 2, 5, 300), v=torch.randn(2, 2, 5, 300),
          prefix_k=torch.randn(3, 2, 4, 300), prefix_v=torch.randn(3, 2, 4, 300)), ValueError, "head size"),
])
def test_bad_input_names_the_argument(overrides, error, words):
    with pytest.raises(error) as info:
        fastpeft.prefix_attention(**_good(**overrides))
    assert words in str(info.value)


def test_device_mismatch_is_a_value_error():
    meta = torch.randn(2, 2, 5, 8, device="meta")
    with pytest.raises(ValueError, match="one device"):
        fastpeft.prefix_attention(**_good(k=meta, v=meta))


def test_unknown_backend_env(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "magic")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND"):
        fastpeft.prefix_attention(**_good())
