"""Issue 29, item 4: no input ends in a traceback. Each case here is a file or an
argument a user (or someone handing them a recipe) may give, and must end in one
line naming the file, key or path, with exit code 2."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from fedssl.cli import main

TRACE_HEADER = "client,speed,uplink,downlink,online\n"


def billion_laughs() -> str:
    """The classic alias bomb: 9 levels of 9 aliases, 9^9 (~4*10^8) strings from 1 KiB."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def one_error_line(capsys, *argv: str) -> str:
    """Run `fedssl argv` in this process; it must exit 2 with exactly one line on stderr."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fedssl: error: "), err
    return lines[0]


def recipe_file(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("content, fragment", [
    (billion_laughs(), "more than 10,000 values"),
    ("name: x\nfederation: " + "[" * 200 + "]" * 200 + "\n", "nested deeper than 64 levels"),
    ("a: &x [1, *x]\n", "alias *x is inside the node it names"),
    ("name: ${oc.env:HOME}\n", "${oc.env:...} reads the environment"),
    ("seed: ${nope}\n", "key 'seed': cannot resolve its value (Interpolation key 'nope' not found)"),
    ("federation:\n  rounds: 3\n  workers: '${ oc.env :USER}'\n", "line 3: ${oc.env:...} reads the environment"),
    (bytes(range(256)) * 4, "not a text YAML file (byte 128 is not UTF-8)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text YAML file"),
    ("name: a\x00b\n", "not a text YAML file (character #x0000"),
    ("a: " + "x" * (1 << 20) + "\n", "larger than 1 MiB"),
    ("seed: -1\n", "seed: must be in 0..4294967295"),
])
def test_a_hostile_recipe_ends_in_one_line_naming_the_file_or_key(tmp_path, capsys, content, fragment):
    path = recipe_file(tmp_path, content)
    line = one_error_line(capsys, "config", str(path))
    assert fragment in line, line
    assert str(path) in line or "key 'seed'" in line or line.startswith("fedssl: error: seed:"), line


def test_the_billion_laughs_is_refused_fast_and_in_bounded_memory(tmp_path, capsys):
    path = recipe_file(tmp_path, billion_laughs())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    line = one_error_line(capsys, "config", str(path))
    assert time.perf_counter() - start < 2, "the alias bomb must be refused before it expands"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: nothing expanded
    assert f"{path}, line " in line


@pytest.mark.parametrize("override, fragment", [
    ("seed=-1", "seed: must be in 0..4294967295 (2**32 - 1), got -1"),
    (f"seed={2**70}", f"seed: must be in 0..4294967295 (2**32 - 1), got {2**70}"),
    ("seed=${nope}", "key 'seed': cannot resolve its value (Interpolation key 'nope' not found)"),
    ("seed=${name}", "key 'seed': cannot resolve its value"),
    ("name=${oc.env:NO_SUCH_VARIABLE_29}", "key 'name': cannot resolve its value"),
])
def test_a_bad_override_ends_in_one_line_naming_the_key(capsys, override, fragment):
    assert fragment in one_error_line(capsys, "config", "quickstart", override)


def test_an_interpolation_may_name_a_key_another_layer_gives(capsys):
    assert main(["config", "quickstart", "seed=${federation.rounds}", "name=run-${seed}"]) == 0
    out = capsys.readouterr().out
    assert "\nseed: 20\n" in f"\n{out}" and "name: run-20" in out, out


@pytest.mark.parametrize("args, fragment", [
    (["--name", "../x"], "--name: must be a directory name"),
    (["--name", "a/b"], "--name: must be a directory name"),
    (["--seeds", "0"], "--seeds: must be at least 1"),
    (["--seeds", "-3"], "--seeds: must be at least 1"),
])
def test_a_bad_sweep_name_or_seed_count_ends_in_one_line(tiny_recipe, capsys, args, fragment):
    line = one_error_line(capsys, "sweep", str(tiny_recipe), "--param", "train.lr=0.01,0.1", *args)
    assert fragment in line, line
    assert not (tiny_recipe.parent / "runs").exists() and not (tiny_recipe.parent / "x.sweep.yaml").exists()


def test_sweep_seeds_past_the_largest_seed_are_refused(tiny_recipe, capsys):
    line = one_error_line(capsys, "sweep", str(tiny_recipe), f"seed={2**32 - 2}", "--param", "train.lr=0.1",
                          "--seeds", "3")
    assert "--seeds: 3 seeds from seed 4294967294 go past the largest seed" in line, line


@pytest.mark.parametrize("content, fragment", [
    (TRACE_HEADER + "0,100,1e6,1e6,1\n1," + "9" * 200_000 + ",1e6,1e6,1\n", "line 3: malformed CSV (field larger"),
    (TRACE_HEADER.encode() + b"0,100,1e6,1e6,1\n1,1\xff0,1e6,1e6,1\n", "line 3: not UTF-8 text (byte b'\\xff')"),
])
def test_a_bad_trace_file_ends_in_one_line_naming_the_file_and_line(tiny_recipe, tmp_path, capsys, content, fragment):
    trace = tmp_path / "trace.csv"
    trace.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = one_error_line(capsys, "run", str(tiny_recipe), "federation.system.profile=trace",
                          f"federation.system.trace={trace}", "federation.clients=2", "federation.clients_per_round=2")
    assert f"{trace}, {fragment}" in line, line
