"""The client state store: in memory, spilled to disk beyond a limit, and through checkpoints."""

import pytest
import torch

from fedssl.config.load import load_recipe
from fedssl.errors import UserError
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.engine.run import run_federation
from fedssl.inprocess.state import MANIFEST, ClientStateStore, checkpointed_states
from fedssl.run_dir import CHECKPOINT, CLIENT_STATES


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


def test_a_checkpoint_of_many_states_writes_only_the_changed_ones_and_names_the_rest(tmp_path):
    store = ClientStateStore(max_in_memory=2, directory=tmp_path / "spill")
    snapshots = tmp_path / "client_states"
    for client_id in range(2):
        store.put(client_id, state_of(client_id))
    assert sorted(store.state_dict(snapshots, 1)) == [0, 1]  # all fit in memory: held whole
    for client_id in range(2, 5):
        store.put(client_id, state_of(client_id))
    first = store.state_dict(snapshots, 2)
    assert first[MANIFEST]["clients"].tolist() == [0, 1, 2, 3, 4] and first[MANIFEST]["rounds"].tolist() == [2] * 5
    store.put(3, state_of(30))  # a round later, one client changed: one file written
    second = store.state_dict(snapshots, 3)
    assert second[MANIFEST]["rounds"].tolist() == [2, 2, 2, 3, 2]
    names = sorted(p.name for p in snapshots.iterdir())
    # client 3's file of round 2 stays until the checkpoint naming its successor has been written
    assert names == sorted([f"client{c}-r2.pt" for c in range(5)] + ["client3-r3.pt"])
    store.state_dict(snapshots, 4)
    assert not (snapshots / "client3-r2.pt").exists() and (snapshots / "client3-r3.pt").exists()

    # resumed from the second checkpoint: states are read from their files when asked for, none up front
    (snapshots / "client9-r4.pt").write_bytes(b"written after the checkpoint")
    restored = ClientStateStore(max_in_memory=1, directory=tmp_path / "spill2")
    restored.load_state_dict(second, snapshots)
    assert restored.in_memory == 0 and len(restored) == 5 and not (snapshots / "client9-r4.pt").exists()
    assert torch.equal(restored.get(3)["count"], torch.tensor([30]))
    assert_same_states(checkpointed_states(second, snapshots), {c: state_of(30 if c == 3 else c) for c in range(5)})


@pytest.mark.parametrize("manifest", [{"clients": torch.tensor([1.0]), "rounds": torch.tensor([1])},
                                      {"clients": torch.tensor([1, 2]), "rounds": torch.tensor([1])}, [1, 2]])
def test_a_malformed_manifest_is_refused(tmp_path, manifest):
    with pytest.raises(ValueError, match="manifest"):
        ClientStateStore().load_state_dict({MANIFEST: manifest}, tmp_path)


def test_without_a_directory_a_temporary_one_is_used(tmp_path):
    store = ClientStateStore(max_in_memory=0)
    store.put(3, state_of(3))
    assert store.in_memory == 0 and store.path(3).is_file()
    assert torch.equal(store.get(3)["count"], torch.tensor([3]))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedper", "ditto"])
def test_a_resumed_run_with_spilled_states_ends_exactly_as_an_uninterrupted_one(tiny_recipe, tmp_path, algorithm):
    spill = [f"algorithm.name={algorithm}", "federation.execution.states_in_memory=1", "train.local_steps=2"]
    whole = load_recipe(tiny_recipe, [*spill, "federation.rounds=3", f"federation.execution.state_dir={tmp_path / 'whole'}"])
    run_federation(whole, tmp_path / "uninterrupted")

    first = load_recipe(tiny_recipe, [*spill, "federation.rounds=2", f"federation.execution.state_dir={tmp_path / 'first'}"])
    run_federation(first, tmp_path / "resumed")
    killed = load_checkpoint(tmp_path / "resumed" / CHECKPOINT)
    # more states than fit in memory: the checkpoint names one snapshot file per client instead of holding them
    snapshots = killed["client_states"][MANIFEST]
    assert len(snapshots["clients"]) > 1
    assert len(list((tmp_path / "first").glob("client*.pt"))) == len(snapshots["clients"]) - 1
    files = {p.name for p in (tmp_path / "resumed" / CLIENT_STATES).iterdir()}
    assert {f"client{c}-r{r}.pt" for c, r in zip(snapshots["clients"].tolist(), snapshots["rounds"].tolist())} <= files
    # resumed with another spill directory and limit: where states live never changes results
    again = load_recipe(tiny_recipe, [*spill, "federation.rounds=3", "federation.execution.states_in_memory=2",
                                      f"federation.execution.state_dir={tmp_path / 'again'}"])
    run_federation(again, tmp_path / "resumed", resume=True)

    a = load_checkpoint(tmp_path / "uninterrupted" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "resumed" / CHECKPOINT)
    states = checkpointed_states(a["client_states"], tmp_path / "uninterrupted" / CLIENT_STATES)
    assert_same_states(states, checkpointed_states(b["client_states"], tmp_path / "resumed" / CLIENT_STATES))
    for name, value in a["server_state"]["params"].items():
        assert torch.equal(value, b["server_state"]["params"][name]), name
    personal = [k for state in states.values() for k in state if k.startswith("personal/")]
    assert personal, "the personal arrays are among the client states"


def test_a_negative_memory_limit_names_the_key(tiny_recipe):
    with pytest.raises(UserError, match="federation.execution.states_in_memory"):
        load_recipe(tiny_recipe, ["federation.execution.states_in_memory=-1"])
