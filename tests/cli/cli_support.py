"""What the in-process command-line tests share (on sys.path through pyproject's
`pythonpath`): run `fedssl`, and check a refusal."""

from fedssl.cli import main


def run_cli(capsys, *args):
    """`fedssl args` in this process: its exit code and what it wrote to stderr."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_user_error(code, err, *fragments):
    """Exit code 2, one line, no traceback, holding each of `fragments`."""
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
