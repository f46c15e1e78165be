import math

import numpy as np
import pytest
import torch

from models import OneBit


def test_the_two_points_are_all_zeros_and_all_ones():
    x = OneBit(7).x
    assert x.shape == (2, 7)
    assert x[0].sum() == 0 and x[1].sum() == 7


def test_default_weights_are_equal_and_the_entropy_is_ln2():
    data = OneBit(3)
    assert data.w.tolist() == [0.5, 0.5]
    assert data.entropy == pytest.approx(math.log(2))


def test_custom_weights_change_the_entropy_floor():
    assert OneBit(3, (0.25, 0.75)).entropy == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


@pytest.mark.parametrize("n", [0, -3, 1.5, "abc", True])
def test_n_must_be_a_positive_integer(n):
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        OneBit(n)


@pytest.mark.parametrize("w", [(0.5, 0.6), (1.0, 0.0), (1.0,)])
def test_weights_must_be_two_positive_numbers_summing_to_one(w):
    with pytest.raises(ValueError, match="weights must be"):
        OneBit(2, w)


@pytest.mark.parametrize("w", [torch.tensor([0.3, 0.7]), torch.tensor([0.1, 0.9]), np.array([0.3, 0.7]),
                               torch.tensor([0.3, 0.7], dtype=torch.float64)])
def test_weights_may_be_a_1d_tensor_or_array_of_the_two_numbers(w):
    assert OneBit(2, w).weights == tuple(float(str(v)) for v in np.asarray(w))  # the decimals it was made from


@pytest.mark.parametrize("w", [torch.tensor([[0.3, 0.7]]), torch.tensor([0.3, 0.3]), torch.tensor(0.5),
                               torch.tensor([True, False])])
def test_a_tensor_that_is_not_two_such_numbers_is_refused_in_one_line_naming_what_is_wanted(w):
    with pytest.raises(ValueError, match=r"^weights=tensor\(.* is not allowed: weights must be two positive finite "
                                         r"numbers that sum to 1 .*, as a tuple, a list, or a 1-D tensor or array$"):
        OneBit(2, w)
