"""fedssl's packages import one way: each only from packages on lower floors, so
there is no import circle and no arrow upward (imports inside functions count;
imports for type checkers only do not). A new package gets a floor here."""

import ast
from pathlib import Path

FEDSSL = Path(__file__).resolve().parents[1] / "fedssl"

# Lowest first. A package may import from packages on a strictly lower floor.
FLOORS = [
    {"fedssl", "errors", "messages", "sampling"},  # the root (its __version__), plain data, pure helpers
    {"io", "registry", "extras", "csvfile", "clients"},  # io: atomic writes; csvfile: the one reader of user CSVs; clients: the interface to where clients run
    {"run_dir", "choices"},  # choices: registries config validates, filled from above (fedssl/choices.py)
    {"run_lock", "ssl"},  # run_lock: one writer per run directory; ssl: pseudo-labeling pieces, threshold rules
    {"config"},  # the recipe schema, loading, range checks
    {"tracking", "sweep"},
    {"data", "models", "codecs"},  # codecs: update compression stages, pure tensor functions
    {"export", "learners", "privacy"},
    {"algorithms"},  # one module per algorithm: learner choice, aggregation, server state, config section
    {"evaluation"},  # scores, per-client and per-class metrics, personalized and unseen clients' evaluation
    {"inprocess"},  # the clients in this process: trainer, client data, state store, vmap and worker executors
    {"simulation"},  # device profiles, round policies, simulated time, the lossy channel
    {"engine"},  # the round's stages, the synchronous round, checks, norm bound, evaluation, checkpoints, the run
    {"backends", "trained"},
    {"launch", "personalize"},
    {"cli"},
]
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fedssl"


def imports(path: Path) -> list[str]:
    """The fedssl modules `path` imports, wherever in the file, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [m for m in found if m == "fedssl" or m.startswith("fedssl.")]


def test_every_package_has_a_floor():
    packages = {p.stem if p.is_file() else p.name for p in FEDSSL.iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert packages <= set(FLOOR), f"give these packages a floor: {sorted(packages - set(FLOOR))}"


def test_imports_only_go_down():
    upward = []
    for path in FEDSSL.rglob("*.py"):
        module = ".".join(path.relative_to(FEDSSL.parent).with_suffix("").parts)
        source = package_of(module)
        for imported in imports(path):
            target = package_of(imported)
            if target != source and FLOOR[target] >= FLOOR[source]:
                upward.append(f"{module} imports {imported} ({source} on floor {FLOOR[source]}, {target} on {FLOOR[target]})")
    assert not upward, "\n".join(upward)
