import pytest
import torch

from fedssl.algorithms.aggregate import ServerState, server_step, weighted_average
from fedssl.messages import Update


def update(client_id, n, **arrays):
    return Update(client_id=client_id, arrays={k: torch.tensor(v) for k, v in arrays.items()}, num_examples=n)


def test_weighted_average_by_example_count():
    updates = [update(0, 1, w=[1.0, 2.0], b=[0.0]), update(1, 3, w=[5.0, 6.0], b=[4.0])]
    avg = weighted_average(updates)
    # (1*1 + 3*5)/4 = 4, (1*2 + 3*6)/4 = 5, (0 + 3*4)/4 = 3
    assert torch.allclose(avg["w"], torch.tensor([4.0, 5.0]))
    assert torch.allclose(avg["b"], torch.tensor([3.0]))


def test_integer_arrays_are_rounded_back():
    updates = [update(0, 1, count=10), update(1, 1, count=13)]
    avg = weighted_average(updates)
    assert avg["count"].dtype == torch.int64 and int(avg["count"]) == 12  # 11.5 rounds to even


def test_no_examples_is_an_error():
    with pytest.raises(ValueError):
        weighted_average([update(0, 0, w=[1.0])])


def test_plain_fedavg_step_returns_the_average():
    state = ServerState(params={"w": torch.tensor([10.0])})
    new = server_step(state, {"w": torch.tensor([4.0])})
    assert torch.equal(new.params["w"], torch.tensor([4.0]))
    assert new.momentum is None


def test_server_learning_rate():
    state = ServerState(params={"w": torch.tensor([10.0])})
    new = server_step(state, {"w": torch.tensor([4.0])}, lr=0.5)
    assert torch.allclose(new.params["w"], torch.tensor([7.0]))  # 10 - 0.5 * (10 - 4)


def test_fedavgm_momentum_accumulates():
    state = ServerState(params={"w": torch.tensor([10.0])})
    first = server_step(state, {"w": torch.tensor([8.0])}, lr=1.0, momentum=0.9)
    # velocity 2, params 10 - 2 = 8
    assert torch.allclose(first.params["w"], torch.tensor([8.0]))
    assert torch.allclose(first.momentum["w"], torch.tensor([2.0]))
    second = server_step(first, {"w": torch.tensor([7.0])}, lr=1.0, momentum=0.9)
    # velocity 0.9*2 + (8-7) = 2.8, params 8 - 2.8 = 5.2
    assert torch.allclose(second.momentum["w"], torch.tensor([2.8]))
    assert torch.allclose(second.params["w"], torch.tensor([5.2]))
