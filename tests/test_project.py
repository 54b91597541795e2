"""The project's own promises: locked dependencies, CI that installs like a new user, self-contained tests."""

import re

import pytest

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


def _third_party_imports(path) -> set[str]:
    import ast
    import sys

    local = {p.stem for p in ROOT.glob("*.py")} | {"deploy", "tests", "benchmarks"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name not in local}


def test_every_package_the_server_imports_is_in_the_lock_its_image_installs():
    """weights.py imported httpx, which only requirements-dev pulled in: the quick start, the image and
    the Ray image failed at import on a new machine while CI (the dev lock) passed."""
    import importlib.metadata

    distributions = importlib.metadata.packages_distributions()
    for files, lock in ((ROOT.glob("*.py"), "requirements.lock"), ((ROOT / "deploy").glob("*.py"),
                                                                      "requirements-ray.lock")):
        pins = set(_pins(ROOT / lock)) | {"torch"}
        for path in files:
            for module in _third_party_imports(path):
                names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
                assert names & pins, f"{path.name} imports {module}, which {lock} does not install"


def test_ci_runs_the_readme_test_command_in_a_brand_new_venv():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in README.splitlines() if line.startswith("pip install torch==") and "pytest" in line)
    assert "-c requirements-dev.lock" in command and command in ci.splitlines()
    assert "python3 -m venv" in ci and "mktemp -d" in ci
    assert ci.index("venv/bin/activate") < ci.index(command)


def _readme_blocks(language: str) -> list[str]:
    """The README's fenced code blocks in `language`, as written."""
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def _readme_commands() -> list[list[str]]:
    """Each shell command of the README's bash blocks (continuations joined; comments and pipes
    dropped), split as the shell splits it, one list per command between `&&`."""
    import shlex

    commands = []
    for block in _readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("|")[0].split("  #")[0].strip()
            commands += [shlex.split(part) for part in line.split("&&") if part.strip()]
    return commands


def _installs(command: list[str]) -> tuple[list[str], list[str]]:
    """(requirement files, constraint files) a `pip install` command names."""
    requirements = [command[i + 1] for i, arg in enumerate(command) if arg == "-r"]
    constraints = [command[i + 1] for i, arg in enumerate(command) if arg == "-c"]
    return requirements, constraints


def test_the_readme_installs_the_server_from_the_lock():
    """Each README command that starts the server (or the tests) installs it first from its
    requirements constrained by their lock (the lock test_locks_pin_every_requirement_but_torch checks),
    and starts a script the repository has."""
    lines = [block.strip() for block in _readme_blocks("bash")]
    started = {}
    for line in lines:
        install, _, run = line.partition("&&")
        requirements, constraints = _installs(install.split())
        if install.split()[:2] == ["pip", "install"] and run.strip().startswith("python"):
            started[run.split()[-1] if "pytest" not in run else "pytest"] = (requirements, constraints)
    assert started["api_server.py"] == (["requirements.txt"], ["requirements.lock"])
    assert started["deploy/ray_serve.py"] == (["requirements-ray.txt"], ["requirements-ray.lock"])
    assert started["pytest"] == (["requirements-dev.txt"], ["requirements-dev.lock"])
    for script in ("api_server.py", "deploy/ray_serve.py"):
        assert (ROOT / script).is_file(), script
    for command in _readme_commands():  # every install anywhere in the README: a lock for each file
        if command[:2] == ["pip", "install"]:
            requirements, constraints = _installs(command)
            assert [r.replace(".txt", ".lock") for r in requirements] == constraints, command


def test_every_variable_the_readme_names_is_read_by_the_server_the_ray_deployment_or_ci():
    """A documented ECHO_* variable that nothing reads would be silently ignored by a user's setup."""
    import ast

    from settings import Settings

    ray = next(node for node in ast.walk(ast.parse((ROOT / "deploy" / "ray_serve.py").read_text()))
               if isinstance(node, ast.ClassDef) and node.name == "RaySettings")
    read = {f"ECHO_{name.upper()}" for name in Settings.model_fields}
    read |= {f"ECHO_RAY_{field.target.id.upper()}" for field in ray.body if isinstance(field, ast.AnnAssign)}
    read |= set(re.findall(r"\bECHO_[A-Z0-9_]+", (ROOT / ".ci" / "run").read_text()))
    named = set(re.findall(r"\bECHO_[A-Z0-9_]*[A-Z0-9]\b", README))
    assert len(named) > 40 and named <= read, sorted(named - read)


def test_every_metric_the_readme_names_is_one_the_server_exports():
    """Alerts are written from the README's names: a renamed metric would leave them silent."""
    source = (ROOT / "observability.py").read_text()
    exported = {name + suffix for name in re.findall(r'"(echo_[a-z_]+)"', source) for suffix in ("", "_total")}
    named = set()
    for name in re.findall(r"`(echo_[a-z_{},]+)`", README):
        head, _, rest = name.partition("{")
        choices, _, tail = rest.partition("}")
        named |= {head + choice + tail for choice in choices.split(",")} if rest else {name}
    assert len(named) > 15 and named <= exported, sorted(named - exported)


def _curl(command: list[str]) -> tuple[str, dict[str, str], str, str | None]:
    """(path, headers, body, output file) of a README curl command."""
    from urllib.parse import urlsplit

    url = next(arg for arg in command if arg.startswith("http://"))
    headers = dict(command[i + 1].split(": ", 1) for i, arg in enumerate(command) if arg == "-H")
    body = next(command[i + 1] for i, arg in enumerate(command) if arg == "-d")
    output = next((command[i + 1] for i, arg in enumerate(command) if arg == "-o"), None)
    return urlsplit(url).path, headers, body, output


@pytest.mark.slow
def test_the_readme_speech_examples_answer_what_they_save_or_play(app):
    """The README's curl examples, run against the app (the test voices include alice): each gets
    audio in the format its output file is named for, and the streamed one the raw format the
    ffplay command it is piped to reads."""
    import io

    import av

    playing = next(block for block in _readme_blocks("bash") if "| ffplay" in block)
    player = playing.split("| ffplay", 1)[1].split()
    examples = [c for c in _readme_commands() if c[0] == "curl" and "/v1/audio/speech" in " ".join(c)]
    assert len(examples) >= 3
    for command in examples:
        path, headers, body, output = _curl(command)
        r = app.post(path, headers=headers, content=body)
        assert r.status_code == 200, (command, r.text)
        if output is None:  # played as it streams: what ffplay is told the bytes are
            assert player[player.index("-f") + 1] == "s16le" and r.headers["content-type"] == "audio/pcm"
            assert r.headers["x-audio-sample-rate"] == player[player.index("-ar") + 1]
            assert player[player.index("-ch_layout") + 1] == "mono" and len(r.content) % 2 == 0 and r.content
            continue
        extension = output.rsplit(".", 1)[1]
        assert r.headers["content-type"] == {"mp3": "audio/mpeg", "wav": "audio/wav"}[extension]
        with av.open(io.BytesIO(r.content)) as container:
            assert container.format.name.split(",")[0] == extension
            assert sum(frame.samples for frame in container.decode(audio=0)) > 0


@pytest.mark.slow
def test_the_readme_openai_sdk_example_runs_as_written(server, tmp_path):
    """The Python block that uses the OpenAI SDK, in a process of its own with only its URL pointed
    at the test server: it writes a WAV file that decodes."""
    import subprocess
    import sys
    import wave

    (code,) = [block for block in _readme_blocks("python") if "from openai import OpenAI" in block]
    assert 'base_url="http://localhost:8000/v1"' in code
    code = code.replace("http://localhost:8000/v1", server.url + "/v1")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with wave.open(str(tmp_path / "hello.wav")) as audio:
        assert audio.getframerate() == 44100 and audio.getnchannels() == 1 and audio.getnframes() > 0


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
    # torch.compile, the default on CUDA, needs a C compiler (triton, inductor); python:*-slim has none
    assert any("apt-get install" in run and " gcc " in f"{run} " and "libc6-dev" in run for run in docker["RUN"])


def test_the_image_health_check_asks_a_route_the_app_has():
    from api_server import create_app
    from settings import load_settings

    (check,) = _dockerfile()["HEALTHCHECK"]
    path = re.search(r"http://127\.0\.0\.1:%s(/\w+)", check).group(1)
    app = create_app(load_settings(device="cpu"))
    assert path == "/ready" and path in app.openapi()["paths"]


@pytest.mark.parametrize("keys, port_variable",
                         [("k1", "PORT"), (",k1", "PORT"), (" k1 ,k2", "ECHO_PORT"), (None, "PORT")])
def test_the_image_health_check_sends_the_first_key_the_server_accepts_on_its_port(keys, port_variable):
    """ECHO_API_KEY=",k1" (a rotation with the old key blank) is the server's key k1; the check sent
    the blank first item, got 401, and the container was marked unhealthy while it served."""
    import shlex
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from settings import load_settings

    accepted = load_settings(device="cpu", api_key=keys)

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            self.send_response(200 if self.path == "/ready" and accepted.accepts_key(token) else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    (check,) = _dockerfile()["HEALTHCHECK"]
    command = shlex.split(check.partition(" CMD ")[2])
    assert command[:2] == ["python", "-c"]
    server = HTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"PORT": "8000", port_variable: str(server.server_port), **({"ECHO_API_KEY": keys} if keys else {})}
    try:
        assert subprocess.run([sys.executable, "-c", command[2]], env=env, timeout=30).returncode == 0
    finally:
        server.shutdown()


def test_compose_reserves_a_gpu_and_outwaits_the_shutdown_grace():
    import yaml

    from settings import Settings

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    server = compose["services"]["echo-tts"]
    grace = float(server["environment"].get("ECHO_SHUTDOWN_GRACE", Settings.model_fields["shutdown_grace"].default))
    assert float(server["stop_grace_period"].rstrip("s")) > grace
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert server["ports"] == ["8000:8000"] and "echo-data:/data" in server["volumes"]
    # uploads land in the volume the image's user owns, not in the host's bind-mounted checkout
    assert server["environment"]["ECHO_VOICE_UPLOAD_DIR"].startswith("/data/")
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


def _server_imports() -> dict[str, set[str]]:
    """Each top-level module of the server and the server modules it imports (at any depth in it)."""
    import ast

    modules = {p.stem: p for p in ROOT.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = (imported & set(modules)) - {name}
    return graph


def test_the_server_modules_import_each_other_without_a_cycle():
    """Layers: a module imports only modules below it, so each can be read and tested from the bottom up."""
    graph, done, path = _server_imports(), set(), []

    def visit(name: str) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name not in done:
            path.append(name)
            for child in sorted(graph[name]):
                visit(child)
            path.pop()
            done.add(name)

    for module in sorted(graph):
        visit(module)
    assert "service" not in graph["speech_request"] and "api_server" not in graph["pipeline"]
