"""The project's own promises: locked dependencies, CI that installs like a new user, self-contained tests."""

import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _requirement_names(path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=!~\[; ]", line)[0].lower().replace("_", "-"))
    return names


def _pins(path) -> dict[str, str]:
    return {m[0].lower(): m[1] for m in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), re.M)}


def test_locks_pin_every_requirement_but_torch():
    runtime, dev = _requirement_names(ROOT / "requirements.txt"), _requirement_names(ROOT / "requirements-dev.txt")
    for names, lock in ((runtime, "requirements.lock"), (runtime | dev, "requirements-dev.lock")):
        pins = _pins(ROOT / lock)
        assert names - {"torch"} <= set(pins), (lock, sorted(names - {"torch"} - set(pins)))
        assert "torch" not in pins and not any(name.startswith("nvidia-") for name in pins), lock


def test_ci_runs_the_readme_test_command_in_a_brand_new_venv():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in README.splitlines() if line.startswith("pip install torch==") and "pytest" in line)
    assert "-c requirements-dev.lock" in command and command in ci.splitlines()
    assert "python3 -m venv" in ci and "mktemp -d" in ci
    assert ci.index("venv/bin/activate") < ci.index(command)


def test_the_readme_installs_the_server_from_the_lock():
    assert "pip install -r requirements.txt -c requirements.lock && python api_server.py" in README


def test_nothing_reads_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if ".venv" not in p.parts and re.search(r"""["']shared["']""", p.read_text(errors="replace"))]
    assert offenders == []
