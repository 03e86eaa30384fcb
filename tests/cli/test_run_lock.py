"""One writer per run directory, with real processes: while a run writes its
directory, a second run of the same name, --overwrite, --resume, a sweep --local
member and personalize into it are refused naming the run's process, and the run
finishes with its files intact; a killed holder (or a child it forked) leaves no
stale lock."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cli_support import assert_user_error, run_cli
from fedssl.cli import main
from fedssl.errors import UserError
from fedssl.run_dir import LOCK, prepare_run_dir
from fedssl.run_lock import hold_run_dir

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="run directory locks need POSIX fcntl")

NAME = "tiny-rounds=3-seed=0"  # the name `sweep --param federation.rounds=3 --local` gives its one run


def start(*args, cwd):
    """`fedssl ARGS` in a process of its own (PYTHONPATH and all passed through)."""
    return subprocess.Popen([sys.executable, "-m", "fedssl.cli", *map(str, args)], cwd=cwd, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited ({process.returncode}) before {what}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def rounds_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.slow
def test_a_second_writer_is_refused_while_a_run_writes_and_the_run_finishes_intact(tiny_recipe, tmp_path, capsys, write_faces):
    faces = tmp_path / "faces"
    write_faces(faces, count=12)
    run_dir = tmp_path / "runs" / NAME
    first = start("run", tiny_recipe, "federation.rounds=3", f"name={NAME}", cwd=tmp_path)
    try:
        wait_for(lambda: rounds_logged(run_dir), first, "its first round")
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, holding the lock: no race with its end
        contenders = {
            "run": ("run", tiny_recipe, "federation.rounds=3", f"name={NAME}"),
            "--overwrite": ("run", tiny_recipe, "federation.rounds=3", f"name={NAME}", "--overwrite"),
            "--resume": ("run", tiny_recipe, "federation.rounds=3", f"name={NAME}", "--resume"),
            "sweep --local": ("sweep", tiny_recipe, "--param", "federation.rounds=3", "--local"),
            "personalize": ("personalize", run_dir, "--data", faces, "--epochs", "1", "--no-progress"),
        }
        before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
        for label, args in contenders.items():
            code, err = run_cli(capsys, *args)
            assert_user_error(code, err, f"run directory {run_dir}", f"in use by process {first.pid}", "run")
            assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before, label
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, err
    assert rounds_logged(run_dir) == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3
    assert not (run_dir / LOCK).exists()  # released: and the next run may go ahead
    assert not (run_dir / "personalized-head").exists()


@pytest.mark.slow
def test_a_killed_run_leaves_no_stale_lock(tiny_recipe, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    first = start("run", tiny_recipe, "federation.rounds=50", cwd=tmp_path)
    try:
        wait_for(lambda: (run_dir / "checkpoint.pt").is_file(), first, "its first checkpoint")
    finally:
        first.kill()  # SIGKILL: no cleanup of any kind runs
        first.wait()
    assert str(first.pid) in (run_dir / LOCK).read_text()  # the file stays, its lock died with the process
    assert main(["run", str(tiny_recipe), "federation.rounds=1", "--overwrite"]) == 0
    assert rounds_logged(run_dir) == [1] and not (run_dir / LOCK).exists()


HOLD_AND_FORK = textwrap.dedent("""\
    import multiprocessing, sys, time
    from pathlib import Path
    from fedssl.run_lock import hold_run_dir

    with hold_run_dir(Path(sys.argv[1])):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,), daemon=True)
        child.start()
        print(child.pid, flush=True)
        time.sleep(120)
""")


def test_a_child_forked_by_a_killed_holder_does_not_keep_its_lock(tmp_path):
    """Worker processes are forked while the run holds its lock; they must not hold it
    on once the run is killed."""
    run_dir = tmp_path / "runs" / "x"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env=os.environ.copy())
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            with hold_run_dir(run_dir):
                pass
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the orphaned child is still alive
        with hold_run_dir(run_dir):
            assert str(os.getpid()) in (run_dir / LOCK).read_text()
    finally:
        holder.kill()
        holder.wait()
        os.kill(child, signal.SIGKILL)


def test_emptying_for_overwrite_keeps_the_held_lock_file(tmp_path):
    run_dir = tmp_path / "run"
    with hold_run_dir(run_dir):
        prepare_run_dir(run_dir, resume=False, overwrite=False)
        (run_dir / "checkpoint.pt").write_bytes(b"old")
        (run_dir / "client_states").mkdir()
        inode = (run_dir / LOCK).stat().st_ino
        prepare_run_dir(run_dir, resume=False, overwrite=True)
        assert sorted(p.name for p in run_dir.iterdir()) == sorted([".fedssl-run", LOCK])
        assert (run_dir / LOCK).stat().st_ino == inode  # the very file whose lock is held
    assert sorted(p.name for p in run_dir.iterdir()) == [".fedssl-run"]


def test_a_refused_resume_of_no_run_leaves_no_directory(tiny_recipe, tmp_path, capsys):
    code, err = run_cli(capsys, "run", tiny_recipe, "--resume")
    assert_user_error(code, err, "cannot resume", "checkpoint.pt")
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_lock_file_planted_as_a_link_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me")
    (run_dir / LOCK).symlink_to(elsewhere)
    with pytest.raises(UserError, match="symbolic link"):
        with hold_run_dir(run_dir):
            pass
    assert elsewhere.read_text() == "keep me"
