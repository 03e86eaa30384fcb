"""`fedssl personalize` and `fedssl predict` as a practitioner runs them: a federation
trained by `fedssl run`, their own PNG folder or CSV, the exported model file."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedssl.cli import main
from fedssl.data.dataset import FER2013_CLASSES
from fedssl.data.sources.synthetic_faces import generate_synthetic_faces
from fedssl.data.transforms import to_tensor
from fedssl.export import load_exported
from fedssl.engine.checkpoint import load_checkpoint
from fedssl.launch import launch
from fedssl.personalize import FineTuneOptions, personalize
from fedssl.trained import load_trained

ACC = re.compile(r"held-out accuracy (before|after): +([0-9.]+) \((\d+)/(\d+)\)")


def fedssl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedssl.cli", *args], capture_output=True, text=True, timeout=600)


def assert_user_error(code: int, stderr: str, *fragments: str) -> str:
    """Exit code 2 and one line on stderr, no traceback, naming every fragment."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def accuracies(stdout: str) -> dict[str, tuple[float, int, int]]:
    found = {m[1]: (float(m[2]), int(m[3]), int(m[4])) for m in ACC.finditer(stdout)}
    assert set(found) == {"before", "after"}, stdout
    return found


@pytest.fixture(scope="module")
def _trained_runs() -> dict:
    return {}


@pytest.fixture
def tiny_run(tiny_recipe, _trained_runs) -> Path:
    """The tiny recipe's run directory, trained by `fedssl run` once per module (the
    tmp_path of the first test keeps it for the rest of the session)."""
    if "tiny" not in _trained_runs:
        result = fedssl("run", str(tiny_recipe))
        assert result.returncode == 0, result.stderr
        _trained_runs["tiny"] = tiny_recipe.parent / "runs" / "tiny"
    return _trained_runs["tiny"]


@pytest.fixture
def faces(tmp_path, write_faces) -> Path:
    root = tmp_path / "my_faces"
    write_faces(root)
    return root


@pytest.mark.slow
def test_personalize_head_then_predict_end_to_end(tiny_run, faces, tmp_path):
    out = tmp_path / "personal"
    result = fedssl("personalize", str(tiny_run), "--data", str(faces), "--out", str(out), "--epochs", "3",
                    "--no-progress")
    assert result.returncode == 0, result.stderr
    acc = accuracies(result.stdout)
    assert acc["before"][2] == acc["after"][2] == 14  # 20% of 70 images held out
    assert all(0.0 <= value <= 1.0 for value, _, _ in acc.values())
    assert "56 images to fine-tune on, 14 to evaluate" in result.stdout
    report = json.loads((out / "personalize.json").read_text())
    assert report["heldout_acc_after"] == pytest.approx(acc["after"][0], abs=1e-4)
    assert (out / "logs").is_dir()  # Lightning's CSV logger

    assert {"model.safetensors", "model.json"} <= {p.name for p in out.iterdir()}  # data only, the default
    images = sorted(faces.rglob("*.png"))[:5]
    predicted = fedssl("predict", str(out / "model.safetensors"), *map(str, images))
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.strip().splitlines()
    assert len(lines) == len(images)
    for line, image in zip(lines, images):
        path, label, confidence = line.split("\t")
        assert path == str(image) and label in FER2013_CLASSES and 0.0 <= float(confidence) <= 1.0


def test_head_mode_changes_only_the_head_and_the_export_predicts_as_the_model(tiny_run, faces, tmp_path):
    global_model = load_trained(tiny_run).model
    options = FineTuneOptions(mode="head", epochs=4, patience=4, progress=False)
    result, path = personalize(tiny_run, faces, options, out_dir=tmp_path / "head", echo=lambda line: None)

    assert result.best_epoch > 0  # on these faces a few epochs of the head lower the held-out loss
    tuned = dict(result.model.named_parameters())
    for name, value in global_model.named_parameters():
        if name.startswith("fc."):
            assert torch.equal(tuned[name], value) == (result.best_epoch == 0), name
        else:
            assert torch.equal(tuned[name], value), f"{name} is in the frozen body but changed"
    assert result.after.loss <= result.before.loss  # the kept epoch is the lowest held-out loss, the start included

    exported = load_exported(path)
    assert exported.labels == list(FER2013_CLASSES)
    assert (exported.image_size, exported.channels) == (28, 1)
    files = sorted(faces.rglob("*.png"))
    images = exported.read_images(files)
    with torch.no_grad():
        logits = result.model(to_tensor(images))
        torch.testing.assert_close(exported.run(to_tensor(images)), logits)
    predictions = exported.predict(images)
    assert [p.index for p in predictions] == logits.argmax(dim=1).tolist()
    np.testing.assert_allclose([p.confidence for p in predictions], logits.softmax(dim=1).max(dim=1).values, rtol=1e-5)


def test_full_and_maml_modes(tiny_run, faces, tmp_path, capsys):
    code, out, err = run_main(capsys, "personalize", str(tiny_run), "--data", str(faces), "--mode", "full",
                              "--epochs", "2", "--augment", "weak", "--out", str(tmp_path / "full"), "--no-progress")
    assert code == 0, err
    accuracies(out)
    report = json.loads((tmp_path / "full" / "personalize.json").read_text())
    assert report["epochs"] <= 2 and report["options"]["augment"] == "weak"

    code, out, err = run_main(capsys, "personalize", str(tiny_run), "--data", str(faces), "--mode", "maml",
                              "--steps", "3", "--lr", "0.01", "--out", str(tmp_path / "maml"), "--no-progress")
    assert code == 0, err
    accuracies(out)
    assert "3 SGD steps" in out
    report = json.loads((tmp_path / "maml" / "personalize.json").read_text())
    assert report["steps"] == 3 and report["options"]["lr"] == 0.01
    global_weights = load_trained(tiny_run).model.state_dict()
    adapted = load_exported(tmp_path / "maml").run.state_dict()
    assert all(not torch.equal(adapted[name], global_weights[name]) for name in ("conv1.weight", "fc.weight"))


def test_csv_with_its_own_test_rows(tiny_run, tmp_path, capsys):
    faces = generate_synthetic_faces(40, 3, seed=7, image_size=48, channels=1)
    rows = ["emotion,pixels,Usage"]
    for i, (image, label) in enumerate(zip(faces.images, faces.labels)):
        usage = "PublicTest" if i % 4 == 0 else "Training"
        rows.append(f"{label},{' '.join(map(str, image.ravel()))},{usage}")
    csv = tmp_path / "mine.csv"
    csv.write_text("\n".join(rows) + "\n")

    code, out, err = run_main(capsys, "personalize", str(tiny_run), "--data", str(csv), "--epochs", "2",
                              "--out", str(tmp_path / "csv"), "--no-progress")
    assert code == 0, err
    assert "30 images to fine-tune on, 10 to evaluate (its own test split)" in out
    assert accuracies(out)["after"][2] == 10
    assert (tmp_path / "csv" / "model.safetensors").is_file() and (tmp_path / "csv" / "model.json").is_file()


def test_the_rebuilt_model_scores_what_the_run_reported(tiny_run):
    from fedssl.data.federated import build_federated_data
    from fedssl.data.sources import load_source
    from fedssl.evaluation.score import score

    trained = load_trained(tiny_run)
    cfg = trained.cfg
    test = build_federated_data(load_source(cfg.data), cfg.data, cfg.federation.clients, cfg.seed).test
    reported = json.loads((tiny_run / "summary.json").read_text())["global_acc"]
    assert score(trained.model, to_tensor(test.images), torch.from_numpy(test.labels)).accuracy == pytest.approx(reported)
    assert trained.class_names == FER2013_CLASSES and trained.missing == []


def test_fedmatch_run_is_read_through_its_global_weights(tiny_recipe, tmp_path):
    """FedMatch keeps sigma and psi apart (and server-only arrays): the model is their sum."""
    _, run_dir, _ = launch(str(tiny_recipe), ["algorithm.name=fedmatch", "federation.rounds=1", "name=fm",
                                              "train.lr=0.001", "train.momentum=0"])
    trained = load_trained(run_dir)
    params = load_checkpoint(run_dir / "checkpoint.pt")["server_state"]["params"]
    weights = trained.model.state_dict()
    torch.testing.assert_close(weights["fc.weight"], params["sigma/fc.weight"] + params["psi/fc.weight"])
    assert trained.missing == []


# --- mistakes a user can make: exit code 2, one line naming the problem ---------------------------


def test_classes_the_model_does_not_know(tiny_run, tmp_path, capsys, write_faces):
    data = tmp_path / "eight"
    write_faces(data, count=30)
    (data / "contempt").mkdir(exist_ok=True)
    Image.new("L", (28, 28), 128).save(data / "contempt" / "x.png")
    code, _, err = run_main(capsys, "personalize", str(tiny_run), "--data", str(data))
    line = assert_user_error(code, err, "'contempt'", "the model 7")
    assert "classes" in line


def test_unreadable_image_is_named(tiny_run, faces, capsys):
    broken = faces / "happy" / "broken.png"
    broken.parent.mkdir(exist_ok=True)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, _, err = run_main(capsys, "personalize", str(tiny_run), "--data", str(faces))
    assert_user_error(code, err, str(broken), "--skip-bad")
    code, out, err = run_main(capsys, "personalize", str(tiny_run), "--data", str(faces), "--skip-bad", "--epochs",
                              "1", "--out", str(faces.parent / "skipped"), "--no-progress")
    assert code == 0, err
    assert "56 images to fine-tune on, 14 to evaluate" in out  # the 70 readable ones


@pytest.mark.parametrize("key, value", [("image_size", 20000), ("image_size", 0), ("channels", 2)])
def test_a_checkpoint_whose_recipe_asks_for_a_huge_model(tiny_run, faces, tmp_path, capsys, key, value):
    """A checkpoint someone sent is data: its stored recipe is bounded before a network is built
    (image_size 20000 once asked for 3.27 TB)."""
    checkpoint = load_checkpoint(tiny_run / "checkpoint.pt")
    checkpoint["config"]["data"][key] = value
    hostile = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, hostile)
    code, _, err = run_main(capsys, "personalize", str(hostile), "--data", str(faces))
    assert_user_error(code, err, str(hostile), f"data.{key}", str(value))


def test_a_fedma_model_is_refused_by_the_safetensors_format_before_training(tiny_recipe, faces, tmp_path, capsys):
    """FedMA widens matched layers: fedssl's registry does not rebuild them from a name."""
    _, run_dir, _ = launch(str(tiny_recipe), ["algorithm.name=fedma", "train.local_steps=2", "federation.rounds=1",
                                              "name=fedma"])
    code, out, err = run_main(capsys, "personalize", str(run_dir), "--data", str(faces), "--no-progress")
    assert_user_error(code, err, "model.safetensors", "--format onnx")
    assert "accuracy before" not in out


def test_too_few_images_to_hold_out(tiny_run, tmp_path, capsys):
    data = tmp_path / "two"
    for name in ("happy", "sad"):
        (data / name).mkdir(parents=True)
        Image.new("L", (28, 28), 100).save(data / name / "a.png")
    code, _, err = run_main(capsys, "personalize", str(tiny_run), "--data", str(data))
    assert_user_error(code, err, "2 labeled images are too few", "at least 3 are needed")


def test_missing_run_or_checkpoint(tmp_path, faces, capsys):
    code, _, err = run_main(capsys, "personalize", str(tmp_path / "nope"), "--data", str(faces))
    assert_user_error(code, err, str(tmp_path / "nope"), "does not exist")
    code, _, err = run_main(capsys, "personalize", str(faces), "--data", str(faces))
    assert_user_error(code, err, str(faces), "checkpoint.pt")
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    code, _, err = run_main(capsys, "personalize", str(not_a_checkpoint), "--data", str(faces))
    assert_user_error(code, err, str(not_a_checkpoint), "not a readable fedssl checkpoint")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit, to make a TorchScript file that is not ours
def test_predict_refuses_what_is_not_a_fedssl_export(tiny_run, tmp_path, capsys):
    image = tmp_path / "face.png"
    Image.new("L", (28, 28), 90).save(image)
    checkpoint = tiny_run / "checkpoint.pt"
    code, _, err = run_main(capsys, "predict", str(checkpoint), str(image))
    assert_user_error(code, err, str(checkpoint), "--trust-model-code")  # a .pt may be a program: refused unread
    code, _, err = run_main(capsys, "predict", "--trust-model-code", str(checkpoint), str(image))
    assert_user_error(code, err, str(checkpoint), "not a model exported by fedssl personalize")
    # TorchScript, but not ours: no labels or input spec inside
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Flatten(), torch.zeros(1, 1, 2, 2)), str(plain))
    code, _, err = run_main(capsys, "predict", "--trust-model-code", str(plain), str(image))
    assert_user_error(code, err, str(plain), "fedssl.json")


def test_predict_names_an_unreadable_image(tiny_run, faces, tmp_path, capsys):
    out = tmp_path / "model"
    personalize(tiny_run, faces, FineTuneOptions(epochs=1, progress=False), out_dir=out, echo=lambda line: None)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = sorted(faces.rglob("*.png"))[0]
    code, out_text, err = run_main(capsys, "predict", str(out), str(good), str(text))
    assert_user_error(code, err, str(text), "unreadable image")
    assert out_text == ""  # every file is read before anything is printed


@pytest.mark.parametrize("flag, value", [("--format", "tflite"), ("--mode", "fancy"), ("--holdout", "1.5"),
                                         ("--accelerator", "tpu")])
def test_bad_option_values(tiny_run, faces, capsys, flag, value):
    code, _, err = run_main(capsys, "personalize", str(tiny_run), "--data", str(faces), flag, value)
    assert_user_error(code, err, flag, value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA device")
def test_cuda_without_a_gpu_is_a_user_error(tiny_run, faces, capsys):
    code, _, err = run_main(capsys, "personalize", str(tiny_run), "--data", str(faces), "--accelerator", "cuda")
    assert_user_error(code, err, "--accelerator", "no CUDA device")


@pytest.mark.slow
def test_onnx_export_and_predict(tiny_run, faces, tmp_path):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)
    options = FineTuneOptions(mode="maml", steps=2, progress=False)
    result, path = personalize(tiny_run, faces, options, out_dir=tmp_path / "onnx", export_format="onnx",
                               echo=lambda line: None)
    assert path.name == "model.onnx"
    exported = load_exported(path)
    images = exported.read_images(sorted(faces.rglob("*.png"))[:9])  # a batch size the trace never saw
    with torch.no_grad():
        torch.testing.assert_close(exported.run(to_tensor(images)), result.model(to_tensor(images)),
                                   rtol=1e-4, atol=1e-4)
    assert exported.labels == list(FER2013_CLASSES)


def test_onnx_without_its_packages_is_a_user_error(tiny_run, faces, capsys, monkeypatch):
    for package in ("onnx", "onnxscript"):  # as if not installed: find_spec answers None
        monkeypatch.setitem(sys.modules, package, None)
    code, _, err = run_main(capsys, "personalize", str(tiny_run), "--data", str(faces), "--format", "onnx")
    assert_user_error(code, err, "--format onnx", "pip install")


def test_a_folder_run_keeps_its_class_names_after_the_folder_is_gone(tiny_recipe, tmp_path, capsys, write_faces):
    """Trained on angry/happy/sad, personalized on happy/sad alone once the training
    folder is gone: classes are matched by name (positions would say angry/happy)."""
    def three_classes(root, keep, seed):
        write_faces(root, count=150, seed=seed, size=28, channels=1)
        for folder in root.iterdir():
            if folder.name not in keep:
                for png in folder.iterdir():
                    png.unlink()
                folder.rmdir()

    trained_on = tmp_path / "trained_on"
    three_classes(trained_on, ("angry", "happy", "sad"), seed=1)
    _, run_dir, _ = launch(str(tiny_recipe), ["data.source=folder", f"data.path={trained_on}", "data.channels=1",
                                              "data.partition.scheme=iid", "federation.clients=3", "federation.rounds=1",
                                              "name=folder"])
    for png in trained_on.rglob("*.png"):
        png.unlink()
    for folder in trained_on.iterdir():
        folder.rmdir()
    trained_on.rmdir()
    assert load_trained(run_dir).class_names == ("angry", "happy", "sad")

    mine = tmp_path / "mine"
    three_classes(mine, ("happy", "sad"), seed=2)
    code, out, err = run_main(capsys, "personalize", str(run_dir), "--data", str(mine), "--epochs", "1",
                              "--out", str(tmp_path / "personal"), "--no-progress")
    assert code == 0, err
    assert "note: --data has no images of angry;" in out
    assert load_exported(tmp_path / "personal").labels == ["angry", "happy", "sad"]

    other = tmp_path / "other"
    three_classes(other, ("happy", "neutral", "sad"), seed=3)
    code, _, err = run_main(capsys, "personalize", str(run_dir), "--data", str(other))
    assert_user_error(code, err, "'neutral'", "angry, happy, sad")


def test_a_runs_normalization_is_trained_with_exported_and_predicted_with(tiny_recipe, faces, tmp_path):
    from fedssl.engine.federation import Federation
    from fedssl.config.load import load_recipe

    normalization = ["model.mean=[0.4]", "model.std=[0.2]"]
    assert Federation.build(load_recipe(tiny_recipe, normalization)).test.mean == (0.4,)  # the pools use it
    _, run_dir, _ = launch(str(tiny_recipe), [*normalization, "federation.rounds=1", "name=normalized"])
    result, path = personalize(run_dir, faces, FineTuneOptions(mode="head", epochs=1, progress=False),
                               out_dir=tmp_path / "normalized", echo=lambda line: None)
    exported = load_exported(path)
    assert exported.metadata["version"] == 3
    assert (exported.metadata["input"]["mean"], exported.metadata["input"]["std"]) == ([0.4], [0.2])
    assert exported.metadata["input"]["offset"] == [pytest.approx(-2.0)]
    images = exported.read_images(sorted(faces.rglob("*.png"))[:6])
    with torch.no_grad():
        logits = result.model(to_tensor(images, (0.4,), (0.2,)))
    assert [p.index for p in exported.predict(images)] == logits.argmax(dim=1).tolist()
    assert not torch.allclose(logits, result.model(to_tensor(images)))  # the normalization matters here
