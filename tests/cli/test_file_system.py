"""What the file system refuses ends in one line naming the file, key or path, exit
code 2 and no traceback, with nothing lost or half-written: a name too long, an
output_dir or state_dir that is a file, a read-only output_dir, a disk full while
checkpointing, an --out that is a file."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from cli_support import assert_user_error, run_cli
from fedssl.cli import main


@pytest.fixture
def tmpfs():
    """`tmpfs(path, size, read_only=False)`: a real small file system mounted at
    `path` (root only: the test is skipped where mounting is not allowed)."""
    mounted = []

    def mount(path: Path, size: str, read_only: bool = False) -> Path:
        path.mkdir(parents=True)
        options = f"size={size}" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (it needs root)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


def test_a_name_too_long_for_a_folder_is_refused(tiny_recipe, tmp_path, capsys):
    code, err = run_cli(capsys, "run", tiny_recipe, "name=" + "é" * 128)  # 256 bytes
    assert_user_error(code, err, "name", "255 bytes")
    assert not (tmp_path / "runs").exists()


def test_an_output_dir_or_state_dir_that_is_a_file_is_refused(tiny_recipe, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for key, value in (("output_dir", a_file), ("output_dir", a_file / "runs"), ("federation.execution.state_dir", a_file)):
        code, err = run_cli(capsys, "run", tiny_recipe, f"{key}={value}")
        assert_user_error(code, err, f"{key}: cannot use {value} as a folder")
    assert a_file.read_text() == "keep me"
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_read_only_output_dir_is_refused(tiny_recipe, tmp_path, capsys, tmpfs):
    if os.geteuid() == 0:  # root writes through permission bits: make a really read-only file system
        read_only, reason = tmpfs(tmp_path / "ro", "1m", read_only=True), "read-only file system"
    else:
        read_only, reason = tmp_path / "ro", "permission denied"
        read_only.mkdir()
        read_only.chmod(0o555)
    code, err = run_cli(capsys, "run", tiny_recipe, f"output_dir={read_only}")
    assert_user_error(code, err, str(read_only / "tiny"), reason)


@pytest.mark.slow
def test_a_disk_full_while_checkpointing_keeps_the_last_checkpoint(tiny_recipe, tmp_path, capsys, tmpfs):
    disk = tmpfs(tmp_path / "disk", "8m")
    run_dir = disk / "tiny"
    assert main(["run", str(tiny_recipe), f"output_dir={disk}", "federation.rounds=1"]) == 0
    before = snapshot(run_dir)
    stat = os.statvfs(disk)
    filler = disk / "filler"
    # room for the resumed run's config, partition and metrics line, not for a checkpoint
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 64 * 1024))

    code, err = run_cli(capsys, "run", tiny_recipe, f"output_dir={disk}", "federation.rounds=2", "--resume")
    assert_user_error(code, err, str(run_dir), ".pt: cannot write it: disk full")
    after = snapshot(run_dir)
    assert {name: after[name] for name in ("checkpoint.pt", "best.pt")} == {
        name: before[name] for name in ("checkpoint.pt", "best.pt")}
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # no half-written file

    filler.unlink()  # space again: the run continues from its intact checkpoint
    assert main(["run", str(tiny_recipe), f"output_dir={disk}", "federation.rounds=2", "--resume"]) == 0
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_an_out_that_is_a_file_is_refused(tiny_recipe, tmp_path, capsys, write_faces):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    faces = tmp_path / "faces"
    write_faces(faces, count=12)
    assert main(["run", str(tiny_recipe), "federation.rounds=1"]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    for args in (("compare", run_dir), ("data", tiny_recipe), ("personalize", run_dir, "--data", faces)):
        for out in (a_file, a_file / "inside"):
            code, err = run_cli(capsys, *args, "--out", out)
            assert_user_error(code, err, "--out", str(out), "file")
    assert a_file.read_text() == "keep me"
