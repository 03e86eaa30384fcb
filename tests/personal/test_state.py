"""The client state store: in memory, spilled to disk beyond a limit, and through checkpoints."""

import pytest
import torch

from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.federation.checkpoint import load_checkpoint
from fedssl.federation.run import run_federation
from fedssl.federation.state import ClientStateStore
from fedssl.run_dir import CHECKPOINT


def state_of(client_id: int) -> dict[str, torch.Tensor]:
    return {"personal/fc.weight": torch.full((2, 3), float(client_id)), "count": torch.tensor([client_id])}


def assert_same_states(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for client_id in a:
        assert sorted(a[client_id]) == sorted(b[client_id])
        for name in a[client_id]:
            assert torch.equal(a[client_id][name], b[client_id][name]), (client_id, name)


def test_states_beyond_the_limit_are_spilled_to_one_file_each_and_read_back(tmp_path):
    store = ClientStateStore(max_in_memory=2, directory=tmp_path / "states")
    for client_id in range(5):
        store.put(client_id, state_of(client_id))
    assert len(store) == 5 and store.in_memory == 2
    # the three least recently used are on disk, one file each, and no temporary files are left
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == ["client0.pt", "client1.pt", "client2.pt"]
    for client_id in range(5):
        assert torch.equal(store.get(client_id)["personal/fc.weight"], state_of(client_id)["personal/fc.weight"])
        assert store.in_memory <= 2
    assert store.get(99) == {} and 99 not in store


def test_peek_reads_a_spilled_state_without_moving_it(tmp_path):
    store = ClientStateStore(max_in_memory=1, directory=tmp_path)
    store.put(0, state_of(0))
    store.put(1, state_of(1))
    assert torch.equal(store.peek(0)["count"], torch.tensor([0]))
    assert (tmp_path / "client0.pt").is_file() and store.in_memory == 1


def test_a_new_state_replaces_the_spilled_one(tmp_path):
    store = ClientStateStore(max_in_memory=1, directory=tmp_path)
    store.put(0, state_of(0))
    store.put(1, state_of(1))  # spills client 0
    store.put(0, state_of(7))
    assert torch.equal(store.get(0)["count"], torch.tensor([7]))
    assert len(store) == 2


def test_state_dict_holds_every_state_and_loads_into_a_store_with_another_limit(tmp_path):
    store = ClientStateStore(max_in_memory=1, directory=tmp_path / "a")
    for client_id in range(4):
        store.put(client_id, state_of(client_id))
    saved = store.state_dict()
    assert sorted(saved) == [0, 1, 2, 3]
    restored = ClientStateStore(max_in_memory=2, directory=tmp_path / "b")
    restored.load_state_dict(saved)
    assert restored.in_memory == 2 and len(restored) == 4
    assert_same_states(restored.state_dict(), saved)
    in_memory_only = ClientStateStore()
    in_memory_only.load_state_dict(saved)
    assert in_memory_only.in_memory == 4
    assert_same_states(in_memory_only.state_dict(), saved)


def test_without_a_directory_a_temporary_one_is_used(tmp_path):
    store = ClientStateStore(max_in_memory=0)
    store.put(3, state_of(3))
    assert store.in_memory == 0 and store.path(3).is_file()
    assert torch.equal(store.get(3)["count"], torch.tensor([3]))


@pytest.mark.parametrize("algorithm", ["fedper", "ditto"])
def test_a_resumed_run_with_spilled_states_ends_exactly_as_an_uninterrupted_one(tiny_recipe, tmp_path, algorithm):
    spill = [f"algorithm.name={algorithm}", "federation.states_in_memory=1", "train.local_steps=2"]
    whole = load_recipe(tiny_recipe, [*spill, "federation.rounds=3", f"federation.state_dir={tmp_path / 'whole'}"])
    run_federation(whole, tmp_path / "uninterrupted")

    first = load_recipe(tiny_recipe, [*spill, "federation.rounds=2", f"federation.state_dir={tmp_path / 'first'}"])
    run_federation(first, tmp_path / "resumed")
    killed = load_checkpoint(tmp_path / "resumed" / CHECKPOINT)
    # the checkpoint holds every client's state, though only one was held in memory
    assert len(killed["client_states"]) > 1
    assert len(list((tmp_path / "first").glob("client*.pt"))) == len(killed["client_states"]) - 1
    # resumed with another spill directory and limit: where states live never changes results
    again = load_recipe(tiny_recipe, [*spill, "federation.rounds=3", "federation.states_in_memory=2",
                                      f"federation.state_dir={tmp_path / 'again'}"])
    run_federation(again, tmp_path / "resumed", resume=True)

    a = load_checkpoint(tmp_path / "uninterrupted" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "resumed" / CHECKPOINT)
    assert_same_states(a["client_states"], b["client_states"])
    for name, value in a["server_state"]["params"].items():
        assert torch.equal(value, b["server_state"]["params"][name]), name
    personal = [k for state in a["client_states"].values() for k in state if k.startswith("personal/")]
    assert personal, "the personal arrays are among the client states"


def test_a_negative_memory_limit_names_the_key(tiny_recipe):
    with pytest.raises(UserError, match="federation.states_in_memory"):
        load_recipe(tiny_recipe, ["federation.states_in_memory=-1"])
