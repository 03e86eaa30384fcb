"""Issue 29, item 5: the boundaries where users and nodes hand fedssl data, fuzzed.

Hypothesis generates recipes, overrides, FER2013 CSV rows, trace rows and evaluation
rows; each must end in success, or in a `UserError` of one line (exit code 2 and
one `fedssl: error:` line on the command line), never in a traceback. Export
descriptions are fuzzed beside `fedssl/export.py`.

The search is derandomized (a fixed seed: a failure replays as it was found) and
small enough for CI: about 20 s on two cores in all.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedssl.cli import main
from fedssl.config.load import all_keys
from fedssl.config.schema import DataConfig
from fedssl.data.sources import load_source
from fedssl.errors import UserError
from fedssl.clients import Holding
from fedssl.engine.checks import ROW_KEYS, accept_rows
from fedssl.simulation.profiles import TRACE_COLUMNS, read_trace


def budget(examples: int) -> settings:
    """`examples` draws from a fixed seed, no deadline (the CI machine is shared), no
    example database (nothing written to the work tree)."""
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    # capsys: each example reads (and so resets) the captured output before it runs
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def assert_success_or_one_line(capsys, argv: list[str]) -> None:
    """`fedssl argv` in this process: exit 0, or exit 2 with one `fedssl: error:` line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fedssl: error: "), err
    assert "Traceback" not in err


def assert_one_line(error: UserError) -> None:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, message


# ----------------------------------------------------------------------------- values

# What YAML and OmegaConf read specially: nulls, booleans, special floats, flow
# collections, anchors, aliases, tags, quotes, block scalars, interpolations, resolvers.
YAML_TOKENS = [
    "null", "~", "true", "no", "on", ".nan", "-.inf", ".inf", "nan", "1e999", "-0", "0x1F", "0o17", "1_000",
    "2020-01-01", "[]", "{}", "[1, [2, [3]]]", "{a: 1}", "{a: {b: [1]}}", "*", "&a", "*a", "&a [1]",
    "!!binary aGk=", "!!set {a}", "!!python/object/apply:os.system ['true']", "!!str 1", "!!int x",
    "'", '"', "'unclosed", "a: b", "- 1", "|", ">", "#", "%YAML 1.1", "@", "`", ":", "-", "???",
    "${nope}", "${seed}", "${federation.rounds}", "${oc.env:HOME}", "${oc.env:NO_SUCH_VAR_29}",
    "${oc.decode:'[1, 2]'}", "${oc.create:{a: 1}}", "${oc.select:seed,1}", "${oc.deprecated:seed}",
    "${", "${}", "}", "$${x}", "\\${seed}", "${${seed}}", "${foo:bar}", "ÿ", "\u202e", "\udcff",
]
SCALARS = st.one_of(
    st.sampled_from(YAML_TOKENS),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats().map(repr),
    st.text(max_size=12),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3).map(lambda items: f"[{', '.join(items)}]"))
SCHEMA_KEYS = all_keys()
KEYS = st.one_of(
    st.sampled_from(SCHEMA_KEYS),
    st.sampled_from(["base", ".", "..", "a..b", "seed.", ".seed", "federation.uplink.codecs[0].name",
                     "federation.uplink.codecs.0.name", "data.partition.x", "$", "${seed}", "~", "0", "a b"]),
    st.from_regex(r"[a-z_][a-z0-9_.]{0,20}", fullmatch=True),
)


# ----------------------------------------------------------------------------- overrides


@pytest.mark.slow
@budget(60)
@given(overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES), min_size=1, max_size=4))
def test_any_overrides_give_a_config_or_one_line(capsys, overrides):
    assert_success_or_one_line(capsys, ["config", "quickstart", *overrides])


# ----------------------------------------------------------------------------- recipes

YAML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
              st.text(max_size=12), st.sampled_from(YAML_TOKENS)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=8,
)


def nested(mapping: dict) -> dict:
    """A mapping of dotted keys as YAML nests them (a.b: 1 -> a: {b: 1}), where that fits."""
    tree: dict = {}
    for key, value in mapping.items():
        *sections, leaf = str(key).split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {}) if isinstance(node.get(section, {}), dict) else {}
        node[leaf] = value
    return tree


def yaml_lines(lines: list[tuple[int, str, str]]) -> str:
    """Hand-made YAML: `key: value` lines at random indents (valid or not)."""
    return "".join(f"{' ' * indent}{key}: {value}\n" for indent, key, value in lines)


RECIPES = st.one_of(
    st.dictionaries(KEYS, YAML_VALUES, max_size=6).map(
        lambda m: yaml.safe_dump(nested(m), allow_unicode=True).encode("utf-8", "surrogateescape")),
    st.lists(st.tuples(st.sampled_from([0, 0, 2, 4, 1]), KEYS, VALUES), max_size=6).map(
        lambda lines: yaml_lines(lines).encode("utf-8", "surrogateescape")),
    st.text(max_size=80).map(lambda text: text.encode("utf-8", "surrogateescape")),
    st.binary(max_size=80),
)


@pytest.mark.slow
@budget(60)
@given(content=RECIPES)
def test_any_recipe_file_gives_a_config_or_one_line(capsys, content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_bytes(content)
        assert_success_or_one_line(capsys, ["config", str(path)])


# ----------------------------------------------------------------------------- FER2013 CSV

VALID_PIXELS = " ".join(str(i % 256) for i in range(48 * 48))
PIXELS = st.one_of(
    st.just(VALID_PIXELS),
    st.integers(min_value=0, max_value=48 * 48 - 1).flatmap(
        lambda i: st.sampled_from(["x", "-1", "256", "1e3", "99999999999999999999999", ""]).map(
            lambda token: " ".join([*VALID_PIXELS.split()[:i], token, *VALID_PIXELS.split()[i + 1:]]))),
    st.sampled_from([VALID_PIXELS + " 0", " ".join(VALID_PIXELS.split()[1:]), "", "\t".join(VALID_PIXELS.split())]),
    st.text(max_size=20),
)
FER_FIELDS = st.lists(st.one_of(st.integers(min_value=-2, max_value=8).map(str), PIXELS,
                                st.sampled_from(["Training", "PublicTest", "PrivateTest", "training", ""]),
                                st.text(max_size=10)), min_size=0, max_size=4)
FER_HEADERS = st.sampled_from(["emotion,pixels,Usage", "emotion,pixels", "\ufeffemotion,pixels,Usage",
                               "pixels,emotion", "emotion,Usage", "", "0,1 2 3,Training"])


def csv_text(header: str, rows: list[list[str]], raw: bytes) -> bytes:
    """A CSV file: a header line, rows quoted as the csv module writes them, then `raw` bytes."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return f"{header}\n{out.getvalue()}".encode("utf-8", "surrogateescape") + raw


@budget(80)
@given(header=FER_HEADERS, rows=st.lists(FER_FIELDS, max_size=4), raw=st.one_of(st.just(b""), st.binary(max_size=30)),
       skip_bad=st.booleans())
def test_any_fer2013_csv_gives_images_or_one_line(header, rows, raw, skip_bad):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fer2013.csv"
        path.write_bytes(csv_text(header, rows, raw))
        try:
            data = load_source(DataConfig(source="fer2013", path=str(path), image_size=48, channels=1,
                                          skip_bad=skip_bad))
        except UserError as error:
            assert_one_line(error)
        else:
            assert data.train.images.shape[1:] == (48, 48, 1)


# ----------------------------------------------------------------------------- trace CSV

TRACE_FIELDS = st.lists(st.one_of(st.integers(min_value=-1, max_value=4).map(str),
                                  st.sampled_from(["1", "0.5", "1e6", "100", "nan", "inf", "-inf", "1e400", "-1", "0",
                                                   "1" * 5000, "", " 2 ", "1_0", "0x10", "١"]),
                                  st.text(max_size=8)), min_size=0, max_size=6)
TRACE_HEADERS = st.one_of(st.just(",".join(TRACE_COLUMNS)), st.permutations(TRACE_COLUMNS).map(",".join),
                          st.just("client,speed,uplink,downlink"), st.just(",".join(TRACE_COLUMNS) + ",extra"),
                          st.text(max_size=20))
VALID_TRACE_ROW = st.integers(min_value=0, max_value=3).map(lambda c: [str(c), "100", "1e6", "1e6", "1"])


@budget(80)
@given(header=TRACE_HEADERS, rows=st.lists(st.one_of(VALID_TRACE_ROW, TRACE_FIELDS), max_size=5),
       raw=st.one_of(st.just(b""), st.binary(max_size=30)), clients=st.integers(min_value=1, max_value=4))
def test_any_trace_csv_gives_profiles_or_one_line(header, rows, raw, clients):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.csv"
        path.write_bytes(csv_text(header, rows, raw))
        try:
            profiles = read_trace(path, clients)
        except UserError as error:
            assert_one_line(error)
        else:
            assert sorted(profiles) == list(range(clients))
            assert all(math.isfinite(p.speed) and 0 < p.online <= 1 for p in profiles.values())


# ----------------------------------------------------------------------------- evaluation rows

HUGE = st.sampled_from([2**64, 10**400, -(10**400)])  # past int64, past float (a JSON integer may be any size)
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80), HUGE, st.floats(),
                      st.text(max_size=6), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                                 st.integers(), max_size=2))
KINDS = ["labeled", "unlabeled", "mixed"]
HOLDINGS = st.dictionaries(st.integers(min_value=0, max_value=5),
                           st.builds(Holding, st.integers(min_value=0, max_value=100),
                                     st.integers(min_value=0, max_value=3), st.sampled_from(KINDS)),
                           min_size=1, max_size=6)
SCORE = st.one_of(st.floats(min_value=0, max_value=1), st.just(math.nan))


@st.composite
def evaluation_rows(draw, holdings: dict[int, Holding]) -> list[dict]:
    """Rows as an honest node sends them about `holdings`' clients, each possibly
    with one value replaced, keys added or removed, or sent twice."""
    rows = []
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        client = draw(st.sampled_from(sorted(holdings)))
        row = {"client": client, "kind": holdings[client].kind, "test_samples": holdings[client].test_samples,
               **{key: draw(SCORE) for key in ROW_KEYS[3:]}}
        change = draw(st.sampled_from(["none", "value", "add", "remove"]))
        if change == "value":
            row[draw(st.sampled_from(ROW_KEYS))] = draw(ANY_VALUE)
        elif change == "add":
            row[draw(st.one_of(st.text(max_size=5), st.integers(), st.none()))] = draw(ANY_VALUE)
        elif change == "remove":
            del row[draw(st.sampled_from(ROW_KEYS))]
        rows.append(row)
    return rows


@budget(200)
@given(holdings=HOLDINGS, data=st.data())
def test_any_evaluation_rows_are_accepted_or_dropped_with_a_reason(holdings, data):
    asked = data.draw(st.sets(st.sampled_from(sorted(holdings)), min_size=1))
    rows = data.draw(evaluation_rows(holdings))
    good, problems = accept_rows(rows, asked, holdings)
    assert len(good) + len(problems) >= len(rows)
    assert all(isinstance(p, str) and p and "\n" not in p for p in problems)
    for row in good:
        assert row["client"] in asked and set(row) == set(ROW_KEYS)
        scores = [row[key] for key in ROW_KEYS[3:]]
        assert all(isinstance(v, (int, float)) and (math.isnan(v) or 0 <= float(v) < math.inf) for v in scores)
    assert len({row["client"] for row in good}) == len(good)
