"""Hostile model files, as an attacker would hand them to `fedssl predict`: none runs
code, each ends in one line on stderr and exit code 2.

A .pt2 archive whose shape expressions call Python (torch.export.load hands them to
sympy), pickles inside zips, safetensors files whose header lies, descriptions with
each field wrong; and, with `--trust-model-code`, a real .pt2 still predicts.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fedssl.cli import main
from fedssl.errors import UserError
from fedssl.export import TRUST_FLAG, export_model, load_exported, model_metadata

LABELS = ["a", "b", "c"]
SIZE = 8
SYMBOL = b"Symbol('s31', positive=True, integer=True)"


class Net(torch.nn.Sequential):
    def __init__(self):
        super().__init__(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, len(LABELS)))


class Touch:
    """Pickles into a call that creates `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    """A safetensors export (folder `safe/`) of fedassl's registered CNN, a .pt2 export
    with a dynamic batch dimension, and an image to predict."""
    from fedssl.config.schema import ModelConfig
    from fedssl.models.factory import build_model

    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="fedavg_cnn"), len(LABELS), 1, 28)
    export_model(net, root / "safe" / "model.safetensors",
                 model_metadata(LABELS, 28, 1, model={"name": "fedavg_cnn", "kwargs": {}}))
    export_model(Net(), root / "model.pt2", model_metadata(LABELS, SIZE, 1), "pt2")
    Image.new("L", (SIZE, SIZE), 90).save(root / "face.png")
    return root


def predict(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args: str) -> str:
    """`fedssl predict ARGS` ends with exit code 2 and one line, no traceback; that line."""
    code, out, err = predict(capsys, *args)
    assert code == 2, (out, err)
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedssl: error: "), err
    return lines[0]


# --- formats that carry code -----------------------------------------------------------------------


def sympy_payload(source: Path, target: Path, marker: Path) -> Path:
    """`source` with a shape expression that creates `marker` when torch.export.load reads it."""
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch() or {SYMBOL.decode()}"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as rogue:
        for entry in original.namelist():
            data = original.read(entry)
            if entry.endswith("models/model.json"):
                assert SYMBOL in data  # the dynamic batch dimension
                data = data.replace(SYMBOL, json.dumps(payload)[1:-1].encode())
            rogue.writestr(entry, data)
    return target


@pytest.mark.parametrize("name", ["model.pt2", "model.pt", "model.bin", "model.onnx", "model.safetensors"])
def test_a_pt2_whose_shape_expression_runs_python_runs_nothing(exports, tmp_path, capsys, name):
    marker = tmp_path / "MARKER"
    rogue = sympy_payload(exports / "model.pt2", tmp_path / name, marker)
    if name == "model.safetensors":  # beside a description fedssl accepts
        shutil.copy(exports / "safe" / "model.json", tmp_path / "model.json")
    line = refused(capsys, str(rogue), str(exports / "face.png"))
    assert str(rogue) in line
    if name in ("model.pt2", "model.pt", "model.bin"):
        assert TRUST_FLAG in line and "run any code" in line
    with pytest.raises(UserError):
        load_exported(rogue)
    assert not marker.exists()


def test_the_trust_flag_is_what_lets_a_program_load(exports, tmp_path, capsys):
    """The flag means what it says: the payload then runs (which is why it is needed)."""
    marker = tmp_path / "MARKER"
    rogue = sympy_payload(exports / "model.pt2", tmp_path / "model.pt2", marker)
    predict(capsys, TRUST_FLAG, str(rogue), str(exports / "face.png"))
    assert marker.exists()


def test_with_the_trust_flag_a_real_pt2_predicts(exports, capsys):
    code, out, err = predict(capsys, TRUST_FLAG, str(exports / "model.pt2"), str(exports / "face.png"))
    assert code == 0, err
    path, label, confidence = out.strip().split("\t")
    assert label in LABELS and 0 <= float(confidence) <= 1


@pytest.mark.parametrize("name", ["model.pt2", "model.pt", "model.pth"])
def test_a_pickle_inside_a_zip_is_not_opened(exports, tmp_path, capsys, name):
    marker = tmp_path / "ran"
    torch.save({"inputs": Touch(marker)}, tmp_path / name)  # a zip holding data.pkl
    line = refused(capsys, str(tmp_path / name), str(exports / "face.png"))
    assert TRUST_FLAG in line
    assert not marker.exists()


# --- safetensors files whose header lies -----------------------------------------------------------


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_weights(folder: Path, exports: Path, header: dict | bytes, data: bytes, length: int | None = None) -> Path:
    """A safetensors file from `header` and `data`, beside the real description."""
    folder.mkdir(exist_ok=True)
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes((len(text) if length is None else length).to_bytes(8, "little")
                                               + text + data)
    shutil.copy(exports / "safe" / "model.json", folder / "model.json")
    return folder


def lie(header: dict, data: bytes, how: str) -> tuple[dict | bytes, bytes, int | None]:
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    first, last = entries[0][1], entries[-1][1]
    length = None
    if how == "beyond the file":
        last["data_offsets"] = [o + 1000 for o in last["data_offsets"]]
    elif how == "overlapping":
        size = entries[1][1]["data_offsets"][1] - entries[1][1]["data_offsets"][0]
        entries[1][1]["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]
    elif how == "a dtype of another size":
        first["dtype"] = "F64"
    elif how == "a size that is not its shape's":
        first["data_offsets"][1] -= 4
    elif how == "another shape":
        first["shape"] = list(reversed(first["shape"])) + [1]
    elif how == "a tensor the network lacks":
        header["evil"] = dict(first)
    elif how == "a tensor missing":
        del header[entries[0][0]]
    elif how == "a huge header length":
        length = 1 << 62
    elif how == "a header that is not JSON":
        return b"{not json" + b" " * 20, data, None
    elif how == "a truncated file":
        data = data[: len(data) // 2]
    elif how == "a key twice":
        text = json.dumps(header)
        return (text[:-1] + ", " + json.dumps(entries[0][0]) + ": " + json.dumps(first) + "}").encode(), data, None
    return header, data, length


LIES = {"beyond the file": "leave a gap", "overlapping": "overlap", "a dtype of another size": "F64",
        "a size that is not its shape's": "data offsets", "another shape": "the network expects",
        "a tensor the network lacks": "'evil'", "a tensor missing": "lacks", "a huge header length": "header length",
        "a header that is not JSON": "header is not JSON", "a truncated file": "the file holds",
        "a key twice": "header is not JSON"}


@pytest.mark.parametrize("how", list(LIES))
def test_a_safetensors_header_that_lies_ends_in_one_line(exports, tmp_path, capsys, how):
    header, data = header_of(exports / "safe" / "model.safetensors")
    folder = write_weights(tmp_path / "lying", exports, *lie(header, data, how))
    line = refused(capsys, str(folder), str(exports / "face.png"))
    assert LIES[how] in line and "model.safetensors" in line


def test_weights_that_are_not_the_ones_described(exports, tmp_path, capsys):
    header, data = header_of(exports / "safe" / "model.safetensors")
    folder = write_weights(tmp_path / "other", exports, header, bytes(len(data)))  # zeros, same layout
    assert "SHA-256" in refused(capsys, str(folder / "model.json"), str(exports / "face.png"))


def test_a_missing_half_or_an_empty_folder(exports, tmp_path, capsys):
    shutil.copy(exports / "safe" / "model.safetensors", tmp_path / "model.safetensors")
    assert "model.json does not exist" in refused(capsys, str(tmp_path), str(exports / "face.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "folder without model.safetensors" in refused(capsys, str(empty), str(exports / "face.png"))


# --- descriptions with each field wrong ------------------------------------------------------------


def description(exports: Path) -> dict:
    return json.loads((exports / "safe" / "model.json").read_text())


def with_description(exports: Path, folder: Path, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    shutil.copy(exports / "safe" / "model.safetensors", folder / "model.safetensors")
    (folder / "model.json").write_text(text)
    return folder


def changed(meta: dict, key: str, value) -> dict:
    *parents, last = key.split(".")
    target = meta
    for parent in parents:
        target = target[parent]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return meta


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()  # a change that removes the key
BAD_FIELDS = [
    ("labels", "abc", "labels"), ("labels", {"a": 1}, "labels"), ("labels", [1, 2, 3], "labels"),
    ("labels", [], "labels"), ("labels", ["a", "a", "b"], "distinct"), ("labels", ["a", ""], "labels"),
    ("labels", ["a", "b"], "'fc.weight'"), ("labels", ["a", "b", "c", "d"], "'fc.weight'"),
    ("input.image_size", 0, "input.image_size"), ("input.image_size", 20000, "input.image_size"),
    ("input.image_size", "x", "input.image_size"), ("input.image_size", True, "input.image_size"),
    ("input.image_size", 28.0, "input.image_size"), ("input.image_size", 32, "'fc1.weight'"),
    ("input.channels", 2, "input.channels"), ("input.channels", 3, "input.mean"),
    ("input.std", [0], "input.std"), ("input.std", [-0.5], "input.std"), ("input.std", [math.nan], "input.std"),
    ("input.mean", [math.inf], "input.mean"), ("input.mean", [0.5, 0.5], "input.mean"), ("input", [], "input"),
    ("model.name", "no_such_net", "model.name"), ("model.name", 7, "model.name"),
    ("model.kwargs", {"bogus": 1}, "bogus"), ("model.kwargs", {"num_classes": 5}, "model.kwargs.num_classes"),
    ("model.kwargs", {"act": {"__class__": "os.system"}}, "model.kwargs.act"), ("model.kwargs", "x", "model.kwargs"),
    ("model", DELETE, "no model section"), ("model.extra", 1, "model"), ("weights", DELETE, "no weights section"),
    ("weights.sha256", "0" * 63, "weights.sha256"), ("weights.sha256", "0" * 64, "SHA-256"),
    ("version", 99, "format 99"), ("version", "3", "format '3'"), ("format", "other", "not fedssl's"),
    ("fedssl_version", 1, "fedssl_version"),
]


@pytest.mark.parametrize("key, value, fragment", BAD_FIELDS, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_FIELDS])
def test_a_description_with_a_bad_field_ends_in_one_line(exports, tmp_path, capsys, key, value, fragment):
    text = json.dumps(changed(description(exports), key, value))
    folder = with_description(exports, tmp_path / "bad", text)
    line = refused(capsys, str(folder / "model.safetensors"), str(exports / "face.png"))
    assert fragment in line and "model." in line


@pytest.mark.parametrize("text, fragment", [
    ("{", "not JSON"), ("[" * 100_000 + "]" * 100_000, "not JSON"), ('"labels"', "not fedssl's"),
    ('{"format": "fedssl-model", "format": "fedssl-model"}', "not JSON"), (" " * (2 << 20), "larger than"),
])
def test_a_description_that_is_not_one(exports, tmp_path, capsys, text, fragment):
    folder = with_description(exports, tmp_path / "bad", text)
    assert fragment in refused(capsys, str(folder), str(exports / "face.png"))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 40_000) | st.floats(allow_nan=True)
                    | st.text(max_size=5), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
KEYS = ["format", "version", "labels", "input", "input.image_size", "input.channels", "input.mean", "input.std",
        "model", "model.name", "model.kwargs", "weights", "weights.sha256", "fedssl_version"]


@pytest.mark.slow
@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), JSON | st.just(DELETE)), min_size=1, max_size=3))
def test_any_mutated_description_loads_or_ends_in_one_line(exports, tmp_path_factory, changes):
    meta = description(exports)
    for key, value in changes:
        try:
            changed(meta, key, value)
        except (KeyError, TypeError):  # a parent an earlier change removed or replaced
            pass
    folder = with_description(exports, tmp_path_factory.mktemp("fuzz"), json.dumps(meta))
    try:
        exported = load_exported(folder)
    except UserError as error:
        assert "\n" not in str(error)
    else:
        assert exported.labels and len(exported.predict(exported.read_images([exports / "face.png"]))) == 1
