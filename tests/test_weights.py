"""Getting the weights: `python api_server.py download`, the Hub cache, and clear failures offline."""

import subprocess
import sys
import time

import pytest

from conftest import ROOT, LiveServer, free_port, server_env

HUB_REPO = "jordand/echo-tts-base"


def download(tmp_path, **env) -> subprocess.CompletedProcess:
    import os

    full = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), **env}
    full.pop("HF_HUB_OFFLINE", None) if "HF_HUB_OFFLINE" not in env else None
    return subprocess.run([sys.executable, str(ROOT / "api_server.py"), "download"], env=full, capture_output=True,
                          text=True, timeout=120)


def test_download_with_local_directories_checks_them_and_exits_0(tiny_echo_dir, tiny_fish_dir, tmp_path):
    done = download(tmp_path, ECHO_MODEL_REPO=str(tiny_echo_dir), ECHO_FISH_REPO=str(tiny_fish_dir))
    assert done.returncode == 0, done.stderr
    assert f"ECHO_MODEL_REPO {tiny_echo_dir}: {tiny_echo_dir}" in done.stdout


def test_download_names_the_file_a_local_directory_lacks(tiny_fish_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    done = download(tmp_path, ECHO_MODEL_REPO=str(tmp_path / "empty"), ECHO_FISH_REPO=str(tiny_fish_dir))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: ECHO_MODEL_REPO={tmp_path / 'empty'}: pytorch_model.safetensors is not in that directory"]


@pytest.mark.parametrize("repo, words", [("/mnt/models/echo", "that directory does not exist"),
                                         ("~/echo-weights", "that directory does not exist"),
                                         ("not a repo id!", "neither a local directory nor a Hub repo id")])
def test_download_names_the_setting_of_a_missing_directory_or_an_impossible_repo_id(tiny_fish_dir, tmp_path, repo,
                                                                                   words):
    """A mistyped or unmounted path was taken for a Hub id: huggingface_hub's HFValidationError
    and a traceback, naming neither the setting nor the problem."""
    done = download(tmp_path, ECHO_MODEL_REPO=repo, ECHO_FISH_REPO=str(tiny_fish_dir), HF_HUB_OFFLINE="1")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"ECHO_MODEL_REPO={repo}" in line and words in line


@pytest.mark.parametrize("what", ["weights", "fish", "pca", "config"])
def test_a_truncated_weight_file_or_broken_config_is_named(tiny_echo_dir, tiny_fish_dir, tmp_path, what):
    """An interrupted copy gave safetensors' 'incomplete metadata' (a malformed config.json:
    'Expecting value: line 1 column 1') without saying which file."""
    import shutil

    import inference
    from checkpoint import CheckpointError

    source = tiny_fish_dir if what == "fish" else tiny_echo_dir
    broken = shutil.copytree(source, tmp_path / "copy")
    name = {"pca": "pca_state.safetensors", "config": "config.json"}.get(what, "pytorch_model.safetensors")
    data = (broken / name).read_bytes()
    (broken / name).write_bytes(data[:len(data) // 2])
    load = {"fish": inference.load_fish_ae_from_hf, "pca": inference.load_pca_state_from_hf}.get(
        what, inference.load_model_from_hf)
    with pytest.raises(CheckpointError, match=str(broken / name)):
        load(str(broken), device="cpu")


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_download_without_the_hub_fails_at_once_with_one_line(tmp_path, how):
    env = {"HF_HUB_OFFLINE": "1"} if how == "offline" else {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    done = download(tmp_path, ECHO_MODEL_REPO=HUB_REPO, **env)
    assert done.returncode == 1 and time.monotonic() - started < 30  # no retries
    (line,) = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and HUB_REPO in line and "ECHO_MODEL_REPO / ECHO_FISH_REPO" in line
    assert ("HF_HUB_OFFLINE is set" if how == "offline" else "unreachable") in line


@pytest.mark.parametrize("hub", ["answers 404", "through ALL_PROXY", "not HTTP"])
def test_what_the_hub_answers_is_the_one_line(tmp_path, hub):
    """The reachability check used httpx, which only the test requirements installed: the server, the
    image and `download` failed at import on a new machine. It goes through the Hub client's own
    session: a Hub that answers, whatever the status, is reachable (the file it refuses is named with
    its reason), also through the proxies the Hub client takes (ALL_PROXY); an answer that is not HTTP
    is an unreachable Hub, not a traceback."""
    import http.server
    import socketserver
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    class Garbage(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"SSH-2.0-OpenSSH_9.2\r\n")

    server = (socketserver.ThreadingTCPServer(("127.0.0.1", 0), Garbage) if hub == "not HTTP"
              else http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{server.server_address[1]}"
    env = ({"HF_ENDPOINT": "http://hub.invalid", "ALL_PROXY": local, "NO_PROXY": ""} if hub == "through ALL_PROXY"
           else {"HF_ENDPOINT": local})
    try:
        done = download(tmp_path, ECHO_MODEL_REPO=HUB_REPO, **env)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert HUB_REPO in line and ("unreachable" in line) == (hub == "not HTTP"), line
    assert hub == "not HTTP" or "could not be fetched" in line


def test_a_cached_hub_repo_is_used_as_it_is_when_the_hub_is_unreachable(tiny_echo_dir, tiny_fish_dir, tmp_path):
    import shutil

    for repo, source in (("echo/tiny-echo", tiny_echo_dir), ("echo/tiny-fish", tiny_fish_dir)):
        cache = tmp_path / "hf-home" / "hub" / f"models--{repo.replace('/', '--')}"
        snapshot = cache / "snapshots" / ("0" * 40)
        shutil.copytree(source, snapshot)
        (cache / "refs").mkdir()
        (cache / "refs" / "main").write_text("0" * 40)
    started = time.monotonic()
    done = download(tmp_path, ECHO_MODEL_REPO="echo/tiny-echo", ECHO_FISH_REPO="echo/tiny-fish",
                    HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30 and str(tmp_path / "hf-home" / "hub") in done.stdout


def test_usage_is_printed_for_unknown_arguments():
    done = subprocess.run([sys.executable, str(ROOT / "api_server.py"), "serve-please"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "usage: python api_server.py [download | warm-up]" in done.stderr


@pytest.mark.slow
def test_a_server_without_its_weights_says_why_in_one_line_and_ready(tiny_fish_dir, voice_dir, tmp_path):
    env = server_env(HUB_REPO, tiny_fish_dir, voice_dir, HF_HOME=str(tmp_path / "hf-home"))  # HF_HUB_OFFLINE=1
    live = LiveServer(env, tmp_path / "server.log", wait_ready=False)
    try:
        r = live.load_failure()
        assert r.status_code == 503 and "not in the local Hugging Face cache" in r.json()["error"]["message"]
        log = live.log()
        assert "Traceback" not in log and len([line for line in log.splitlines() if " ERROR " in line]) == 1
    finally:
        live.stop()


def warm_up_command(tmp_path, **env) -> subprocess.CompletedProcess:
    import os

    full = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
            "ECHO_CACHE_DIR": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, str(ROOT / "api_server.py"), "warm-up"], env=full, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_the_warm_up_command_warms_up_as_the_server_would_and_exits_0(tiny_echo_dir, tiny_fish_dir, voice_dir,
                                                                       tmp_path):
    done = warm_up_command(tmp_path, **server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_WARMUP="0",
                                                  ECHO_PERFORMANCE_PRESET="low", ECHO_NUM_STEPS_NONSTREAM="1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("warmed up in ") and "ECHO_COMPILE is off" in done.stdout
    # the log says each stage; ECHO_WARMUP=0 (the server's choice to skip it) does not make the command a no-op
    assert "warm-up done" in done.stderr and "warming up generation" in done.stderr


def test_the_warm_up_command_fails_with_the_reason_when_the_models_cannot_load(tiny_fish_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    done = warm_up_command(tmp_path, ECHO_MODEL_REPO=str(tmp_path / "empty"), ECHO_FISH_REPO=str(tiny_fish_dir),
                           ECHO_DEVICE="cpu")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: the models failed to load (ECHO_MODEL_REPO={tmp_path / 'empty'}: "
                      "pytorch_model.safetensors is not in that directory); see the server log"]
