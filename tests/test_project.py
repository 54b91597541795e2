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
    ray = _requirement_names(ROOT / "requirements-ray.txt")
    for names, lock in ((runtime, "requirements.lock"), (runtime | ray, "requirements-ray.lock"),
                        (runtime | ray | dev, "requirements-dev.lock")):
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


def _dockerfile() -> dict[str, list[str]]:
    """Dockerfile instructions (continuation lines joined): {INSTRUCTION: [arguments, ...]}."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, args = line.strip().partition(" ")
            instructions.setdefault(name.upper(), []).append(args.strip())
    return instructions


def test_the_image_installs_from_the_lock_and_runs_the_server_as_a_user():
    from settings import Settings

    docker = _dockerfile()
    assert any("-r requirements.txt -c requirements.lock" in run for run in docker["RUN"])
    assert docker["CMD"] == ['["python", "api_server.py"]'] and docker["STOPSIGNAL"] == ["SIGTERM"]
    assert {"*.py ./", "static/ ./static/"} <= set(docker["COPY"])  # the server and its playground
    assert docker["EXPOSE"] == [str(Settings.model_fields["port"].default)]
    assert docker["USER"] and docker["USER"][-1] not in ("root", "0")
    env = " ".join(docker["ENV"])
    volumes = docker["VOLUME"][0]
    for variable, value in (("HF_HOME", "/data/huggingface"), ("ECHO_CACHE_DIR", "/data/compile-cache"),
                            ("ECHO_VOICE_DIRS", "/voices")):
        assert f"{variable}={value}" in env and f'"/{value.split("/")[1]}"' in volumes


def test_the_image_health_check_asks_a_route_the_app_has():
    from api_server import create_app
    from settings import load_settings

    (check,) = _dockerfile()["HEALTHCHECK"]
    path = re.search(r"http://127\.0\.0\.1:%s(/\w+)", check).group(1)
    app = create_app(load_settings(device="cpu"))
    assert path == "/ready" and path in app.openapi()["paths"]


def test_compose_reserves_a_gpu_and_outwaits_the_shutdown_grace():
    import yaml

    from settings import Settings

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    server = compose["services"]["echo-tts"]
    grace = float(server["environment"].get("ECHO_SHUTDOWN_GRACE", Settings.model_fields["shutdown_grace"].default))
    assert float(server["stop_grace_period"].rstrip("s")) > grace
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert server["ports"] == ["8000:8000"] and "echo-data:/data" in server["volumes"]
    assert compose["services"]["download"]["command"] == ["python", "api_server.py", "download"]


def test_the_accepted_torch_range_holds_the_tested_versions():
    from packaging.requirements import Requirement

    (line,) = [x for x in (ROOT / "requirements.txt").read_text().splitlines() if x.startswith("torch")]
    accepted = Requirement(line.split("#")[0]).specifier
    ci = re.search(r"torch==(\S+)", (ROOT / ".ci" / "run").read_text()).group(1)
    gpu = re.search(r"torch ([\d.]+)", (ROOT / "benchmarks" / "RESULTS.md").read_text()).group(1)
    assert ci in accepted and gpu in accepted, (str(accepted), ci, gpu)


def test_every_test_security_md_cites_exists():
    """SECURITY.md backs each defence with the test that reproduces the attack: those tests exist."""
    cited = set(re.findall(r"`(test_[a-z0-9_]+)`", (ROOT / "SECURITY.md").read_text()))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_[a-z0-9_]+)", path.read_text(), re.M))
    assert len(cited) >= 20 and cited <= defined, sorted(cited - defined)
