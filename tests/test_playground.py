"""The web playground in a real browser: Debian's Chromium driven by Playwright, against the real server."""

import base64
import io
import re
import shutil
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from conftest import live_server, server_env
from settings import PERFORMANCE_PRESETS
from test_server import _metric

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "play-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def site(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory):
    uploads = tmp_path_factory.mktemp("playground-uploads")
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_API_KEY=KEY, ECHO_VOICE_UPLOAD_DIR=str(uploads))
    with live_server(tmp_path_factory, "playground", env) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream"])  # (a microphone that beeps)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, site):
    """The playground with the API key entered; console errors and foreign requests are collected."""
    page = browser.new_page()
    page.errors, page.foreign, page.dialogs, page.confirms = [], [], [], True
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.accept() if page.confirms else d.dismiss()))
    page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("request", lambda r: r.url.startswith(site.url) or r.url.startswith("blob:") or page.foreign.append(r.url))
    page.goto(site.url + "/")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    yield page
    page.close()


def test_the_page_loads_lists_voices_and_reaches_nothing_else(page, site, tmp_path):
    page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
    voices = page.eval_on_selector_all("#voice option", "options => options.map(o => o.value)")
    assert {"none", "alice", "bob", "duo"} <= set(voices)
    page.wait_for_function("document.querySelectorAll('#preset option').length > 1")
    presets = page.eval_on_selector_all("#preset option", "options => options.map(o => o.value)")
    assert presets == list(PERFORMANCE_PRESETS) and page.input_value("#preset") == "default"  # the server's
    assert "characters, about" in page.text_content("#text-info") and page.text_content("#status") == ""
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'playground.png'}")
    assert page.errors == [] and page.foreign == []


def test_generate_plays_the_audio_while_it_arrives(page):
    page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
    page.select_option("#voice", "alice")
    page.select_option("#preset", "low")
    page.fill("#steps", "1")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_function("window.echoPlayground.samplesScheduled > 0", timeout=60000)
    during = page.evaluate("[window.echoPlayground.samplesScheduled, window.echoPlayground.streaming]")
    page.wait_for_function("window.echoPlayground.takes.length === 1", timeout=120000)
    assert during[0] > 0 and during[1] is True  # samples reached the audio graph before the request ended
    assert "seed 7" in page.text_content("#status") and "real-time factor" in page.text_content("#status")
    assert page.locator("#takes li").count() == 1 and page.locator("#takes a[download]").count() == 1
    take = page.evaluate("window.echoPlayground.takes[0]")  # what was asked for is what was chosen
    assert (take["voice"], take["block_sizes"], take["seed"]) == ("alice", PERFORMANCE_PRESETS["low"][0], "7")
    seconds = float(re.search(r", ([\d.]+) s,", page.text_content("#takes li")).group(1))
    with page.expect_download() as download:  # (its WAV is made on the click, no longer for every take)
        page.click("#takes a[download]")
    audio, rate = sf.read(download.value.path())
    assert rate == 44100 and round(len(audio) / rate, 1) == seconds and audio.any()
    page.click("#takes li button:has-text('Remove')")
    assert page.locator("#takes li").count() == 0 and page.errors == []


def speech_requests(page) -> list:
    """The speech requests the page sends from now on."""
    sent = []
    page.on("request", lambda r: r.url.endswith("/v1/audio/speech") and sent.append(r))
    return sent


def test_one_take_at_a_time_is_heard_and_stop_silences_it(page):
    """A double activation sends one request; a random seed (-1) keeps all its digits; once the take
    is generated its sound still plays and Stop silences it; a take's Play starts it alone."""
    page.wait_for_function("document.querySelectorAll('#preset option').length > 1")
    page.select_option("#preset", "low")
    page.fill("#steps", "1")
    page.fill("#seed", "-1")
    sent, seeds = speech_requests(page), []
    page.on("response", lambda r: r.url.endswith("/v1/audio/speech") and seeds.append(r.headers.get("x-echo-seed")))
    page.evaluate("() => { const g = document.querySelector('#generate'); g.click(); g.click(); }")
    page.wait_for_function("window.echoPlayground.takes.length === 1", timeout=120000)
    assert len(sent) == 1
    seed = page.evaluate("window.echoPlayground.takes[0].seed")
    assert seed == seeds[0] and int(seed) >= 0 and f"seed {seed}," in page.text_content("#takes li")
    assert page.get_attribute("#takes a[download]", "download").endswith(f"seed-{seed}.wav")
    assert page.evaluate("window.echoPlayground.playing") > 0 and page.is_enabled("#stop")  # still to be heard
    page.click("#stop")
    assert page.evaluate("window.echoPlayground.playing") == 0 and page.is_disabled("#stop")
    play = page.locator("#takes li button", has_text="Play")
    play.click()
    page.wait_for_function("window.echoPlayground.playing === 1")
    play.click()  # again: the first playing is stopped, not doubled
    page.wait_for_function("window.echoPlayground.playing === 1")
    page.click("#generate")  # a new take streams: the old one cannot be played over it
    page.wait_for_function("window.echoPlayground.streaming")
    assert play.is_disabled()
    page.click("#stop")
    page.wait_for_function("!window.echoPlayground.streaming")
    assert page.evaluate("window.echoPlayground.playing") == 0 and play.is_enabled() and page.errors == []


def test_settings_out_of_range_are_caught_by_the_page_and_nothing_is_sent(page):
    page.wait_for_function("document.querySelectorAll('#preset option').length > 1")
    sent = speech_requests(page)
    page.fill("#steps", "0")
    page.click("#generate")
    assert page.evaluate("document.querySelector('#steps').validity.valid") is False
    page.fill("#steps", "")
    for seed in ("1e3", "5.0"):  # numbers the field takes, but no seed
        page.fill("#seed", seed)
        page.click("#generate")
        assert page.evaluate("document.querySelector('#seed').validity.valid") is False
    assert sent == []
    page.fill("#seed", "007")  # a whole number, however written: 7
    page.fill("#text", "")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent.includes('input is empty')")
    assert sent[0].post_data_json["seed"] == 7
    page.fill("#seed", "0")
    page.fill("#steps", "")
    page.fill("#cfg-text", "")  # empty: the server's default, not 0
    page.fill("#text", "")  # (the server refuses it: a request is sent)
    page.click("#generate")
    deadline = time.monotonic() + 30
    while len(sent) < 2:
        assert time.monotonic() < deadline, "the second request was not sent"
        page.wait_for_timeout(50)
    assert "cfg_scale_text" not in sent[1].post_data_json


def test_a_wrong_key_then_the_right_one_leaves_no_stale_error_and_keeps_the_choices(page):
    page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
    page.select_option("#voice", "bob")
    page.select_option("#preset", "low")
    page.fill("#key", "wrong")
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Voices:')")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelector('#status').textContent === ''")
    page.wait_for_load_state("networkidle")
    assert (page.input_value("#voice"), page.input_value("#preset")) == ("bob", "low")


def test_a_voice_can_be_replaced_and_deleted_from_the_page(page, tmp_path):
    t = np.arange(6 * 22050) / 22050
    path = tmp_path / "dora.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 150 * t) * np.sin(2 * np.pi * 4 * t) ** 2).astype(np.float32), 22050)
    page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
    page.set_input_files("#file", str(path))
    page.fill("#voice-name", "dora")
    for overwrite in (False, True):  # a second upload of the name needs "Replace"
        page.click("#upload")
        page.wait_for_function("!document.querySelector('#quality').textContent.startsWith('Uploading')")
        assert "added" in page.text_content("#quality"), page.text_content("#quality")
        page.check("#overwrite")
    page.uncheck("#overwrite")
    page.click("#upload")
    page.wait_for_function("document.querySelector('#quality').textContent.includes('failed')")
    assert "overwrite" in page.text_content("#quality")
    page.select_option("#voice", "alice")
    page.click("#delete-voice")  # an operator's voice stays
    page.wait_for_function("document.querySelector('#quality').textContent.includes('Delete failed')")
    page.select_option("#voice", "dora")
    page.click("#delete-voice")
    page.wait_for_function("document.querySelector('#quality').textContent.includes('deleted')")
    page.wait_for_function("![...document.querySelectorAll('#voice option')].some(o => o.value === 'dora')")
    voices = page.eval_on_selector_all("#voice option", "options => options.map(o => o.value)")
    assert "alice" in voices
    assert [e for e in page.errors if not e.startswith("Failed to load resource")] == []  # (the 409, the 403)


def test_uploading_a_wav_adds_a_voice_with_its_quality_report(page, tmp_path):
    t = np.arange(6 * 22050) / 22050
    clip = 0.3 * np.sin(2 * np.pi * 150 * t) * np.sin(2 * np.pi * 4 * t) ** 2
    path = tmp_path / "carol.wav"
    sf.write(path, clip.astype(np.float32), 22050)
    page.set_input_files("#file", str(path))
    page.fill("#voice-name", "carol")
    page.click("#upload")
    page.wait_for_function("document.querySelector('#quality').textContent.includes('added')", timeout=60000)
    assert "6 s, 22050 Hz, 1 channel(s)" in page.text_content("#quality")
    page.wait_for_function("document.querySelector('#voice').value === 'carol'")  # (the list reloads after)
    assert page.errors == []


def test_stop_ends_the_request_and_its_job(page, site):
    page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
    page.select_option("#preset", "low")
    page.fill("#steps", "60")  # seconds of work after the first block
    page.click("#generate")
    page.wait_for_function("window.echoPlayground.samplesScheduled > 0", timeout=60000)
    assert _metric(site, "echo_active_streams", AUTH) == 1
    page.click("#stop")
    page.wait_for_function("document.querySelector('#status').textContent.includes('Stopped')")
    stopped = time.monotonic()
    while _metric(site, "echo_active_streams", AUTH) > 0 and time.monotonic() - stopped < 2:
        time.sleep(0.05)
    assert _metric(site, "echo_active_streams", AUTH) == 0
    assert httpx.get(site.url + "/health").json()["status"] == "ok"


def test_a_recording_from_the_microphone_becomes_a_voice(page):
    page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
    page.fill("#voice-name", "recorded")
    page.click("#record")
    page.wait_for_function("document.querySelector('#record').textContent === 'Stop recording'")
    time.sleep(1.5)
    page.click("#record")
    page.wait_for_function("document.querySelector('#quality').textContent.includes('added')", timeout=60000)
    page.wait_for_function("document.querySelector('#voice').value === 'recorded'")
    assert page.text_content("#record") == "Record" and page.errors == []


def test_a_voice_request_keeps_the_focus_and_a_recording_ending_meanwhile_waits_its_turn(page, site):
    """Disabling the focused Delete button dropped the focus to the page's body; a recording that ended
    while a delete ran was discarded without a word."""
    page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
    release = []
    page.route("**/v1/audio/voices/*", lambda route: release.append(route))  # the delete waits until released
    page.fill("#voice-name", "waited")
    page.click("#record")
    page.wait_for_function("document.querySelector('#record').textContent === 'Stop recording'")
    time.sleep(1.0)
    page.select_option("#voice", "alice")
    page.focus("#delete-voice")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#delete-voice').getAttribute('aria-disabled') === 'true'")
    assert page.evaluate("document.activeElement.id") == "delete-voice"
    page.click("#record")  # Stop recording: still usable; its upload waits for the delete
    time.sleep(0.5)
    release[0].fulfill(status=403, json={"error": {"message": "placed by the operator"}})
    page.wait_for_function("document.querySelector('#quality').textContent.includes('added')", timeout=60000)
    page.wait_for_function("document.querySelector('#voice').value === 'waited'")
    assert [e for e in page.errors if not e.startswith("Failed to load resource")] == []  # (the 403)


def test_a_second_upload_click_while_one_runs_is_ignored(page, tmp_path):
    """Two clicks on Upload sent two uploads: the voice was added, and the page said "Upload failed"
    (the second one's 409)."""
    t = np.arange(6 * 22050) / 22050
    path = tmp_path / "erin.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 160 * t) * np.sin(2 * np.pi * 4 * t) ** 2).astype(np.float32), 22050)
    uploads = []
    page.on("request", lambda r: r.url.endswith("/v1/audio/voices") and r.method == "POST" and uploads.append(r))
    page.set_input_files("#file", str(path))
    page.fill("#voice-name", "erin")
    page.evaluate("document.querySelector('#upload').click(); document.querySelector('#upload').click()")
    page.wait_for_function("document.querySelector('#quality').textContent.includes('added')", timeout=60000)
    page.wait_for_function("document.querySelector('#upload').getAttribute('aria-disabled') === 'false'")
    assert len(uploads) == 1  # (once the voice list has reloaded)
    assert page.errors == []


def test_a_server_out_of_reach_is_said_where_the_answer_would_be(page, tmp_path):
    """A failed fetch (the server restarting) left "Uploading…" forever and threw uncaught promise
    rejections from upload, delete and the voice list."""
    page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
    page.route("**/v1/**", lambda route: route.abort())
    path = tmp_path / "gone.wav"
    sf.write(path, np.zeros(22050, np.float32) + 0.1, 22050)
    page.set_input_files("#file", str(path))
    page.click("#upload")
    page.wait_for_function("document.querySelector('#quality').textContent.startsWith('Upload failed')")
    page.select_option("#voice", "alice")
    page.click("#delete-voice")
    page.wait_for_function("document.querySelector('#quality').textContent.startsWith('Delete failed')")
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelector('#status').textContent.includes('cannot be reached')")
    assert page.get_attribute("#upload", "aria-disabled") == "false"
    assert [e for e in page.errors if not e.startswith("Failed to load resource")] == []


@pytest.fixture(scope="module")
def cutting_site(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory):
    """Streams stop after 1 s (ECHO_REQUEST_TIMEOUT): the server cuts them after their first audio."""
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_REQUEST_TIMEOUT="1")
    with live_server(tmp_path_factory, "playground-cut", env) as live:
        yield live


def test_a_stream_cut_after_its_first_audio_says_so_and_keeps_what_came(browser, cutting_site):
    """A cut stream said only "Failed: network error" while seconds of its audio played on, and kept
    no take."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(cutting_site.url + "/")
    page.wait_for_function("document.querySelectorAll('#preset option').length > 1")
    page.select_option("#preset", "low")
    page.fill("#steps", "60")  # seconds of work after the first block: past the 1 s limit
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Failed after')", timeout=60000)
    assert "ECHO_REQUEST_TIMEOUT" in page.text_content("#status")
    assert page.locator("#takes li").count() == 1 and "cut short" in page.text_content("#takes li")
    assert not page.is_disabled("#generate") and errors == []
    page.close()


def _wav_base64(seconds: float, name_rate: int = 16000) -> str:
    t = np.arange(int(seconds * name_rate)) / name_rate
    buffer = io.BytesIO()
    sf.write(buffer, 0.3 * np.sin(2 * np.pi * 170 * t) * np.sin(2 * np.pi * 4 * t) ** 2, name_rate, format="WAV",
             subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def _drop(page, file_name: str, data: str, target: str = "#drop") -> None:
    """A file dropped on `target` (a drag and drop the browser delivers)."""
    page.evaluate("""([name, data, target]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "audio/wav" }));
        document.querySelector(target).dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true,
                                                                             cancelable: true }));
    }""", [file_name, data, target])


def _quality_after(page, text: str) -> str:
    page.wait_for_function(f"document.querySelector('#quality').textContent.includes({text!r})", timeout=60000)
    return page.text_content("#quality")


def test_a_refused_upload_keeps_the_clip_and_a_later_drop_is_a_voice_of_its_own(page, tmp_path):
    """A refused recording was lost (Upload then said "Choose or drop a file first"); the name and
    Replace stayed set after an upload, so a file dropped later silently replaced that voice; a name
    taken from a file name such as "Grace (2).wav" was refused with an error about characters."""
    page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
    path = tmp_path / "frank.wav"
    path.write_bytes(base64.b64decode(_wav_base64(6)))
    page.set_input_files("#file", str(path))
    page.fill("#voice-name", "frank")
    page.click("#upload")
    assert 'Voice "frank" added: 6' in _quality_after(page, "added")
    assert page.input_value("#voice-name") == "" and not page.is_checked("#overwrite")
    page.fill("#voice-name", "frank")
    page.click("#record")
    page.wait_for_function("document.querySelector('#record').textContent === 'Stop recording'")
    time.sleep(1.2)
    page.click("#record")
    assert "Replace a voice of that name" in _quality_after(page, "failed")
    page.check("#overwrite")
    page.click("#upload")  # the recording, kept: not the file chosen before it
    seconds = float(re.search(r'Voice "frank" added: ([\d.]+) s', _quality_after(page, "added")).group(1))
    assert seconds < 4
    _drop(page, "Grace (2).wav", _wav_base64(3))
    assert 'Voice "Grace _2_" added: 3' in _quality_after(page, "Grace")
    voices = page.eval_on_selector_all("#voice option", "options => options.map(o => o.value)")
    assert {"frank", "Grace _2_"} <= set(voices)
    assert [e for e in page.errors if not e.startswith("Failed to load resource")] == []  # (the 409)


def test_deleting_a_voice_asks_first_and_no_keeps_it(page):
    page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
    deletes = []
    page.on("request", lambda r: r.method == "DELETE" and deletes.append(r.url))
    page.select_option("#voice", "alice")
    page.confirms = False
    page.click("#delete-voice")
    page.wait_for_function("document.querySelector('#delete-voice').getAttribute('aria-disabled') === 'false'")
    assert page.dialogs == ['Delete the voice "alice"? This cannot be undone.'] and deletes == []


def test_record_opens_the_microphone_once_and_says_why_it_cannot_over_plain_http(page):
    """A second click while the microphone was being opened started a second recorder, never stopped:
    the microphone stayed on. Over plain http from another machine the page said "Cannot read
    properties of undefined"."""
    page.wait_for_function("document.querySelectorAll('#voice option').length > 1")
    page.evaluate("""() => {
        window.streams = [];
        const open = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
        navigator.mediaDevices.getUserMedia = async (c) => {
            const s = await open(c);
            window.streams.push(s);
            return s;
        };
    }""")
    page.fill("#voice-name", "twice")
    page.evaluate("() => { const r = document.querySelector('#record'); r.click(); r.click(); }")
    page.wait_for_function("document.querySelector('#record').textContent === 'Stop recording'")
    time.sleep(1.0)
    page.click("#record")
    _quality_after(page, "added")
    assert page.evaluate("window.streams.length") == 1
    assert page.evaluate("window.streams.every(s => s.getTracks().every(t => t.readyState === 'ended'))")
    page.evaluate("Object.defineProperty(navigator, 'mediaDevices', { value: undefined, configurable: true })")
    page.click("#record")
    assert "https://" in _quality_after(page, "Recording:") and page.text_content("#record") == "Record"


def test_the_drop_zone_takes_keys_once_and_a_drop_beside_it_does_not_leave_the_page(page):
    page.set_viewport_size({"width": 800, "height": 300})  # (a page that scrolls)
    choosers = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    page.focus("#drop")
    page.keyboard.press("Space")
    page.wait_for_timeout(300)
    scrolled = page.evaluate("window.scrollY")
    page.focus("#file")
    page.keyboard.press("Enter")
    page.wait_for_timeout(300)
    assert len(choosers) == 2 and scrolled == page.evaluate("window.scrollY")  # one each, Space scrolled nothing
    assert page.evaluate("""() => {
        const files = new DataTransfer();
        files.items.add(new File(["x"], "x.wav"));
        const e = new DragEvent("dragover", { dataTransfer: files, bubbles: true, cancelable: true });
        document.body.dispatchEvent(e);
        return e.defaultPrevented;
    }""")
    page.evaluate("""() => {  // text dragged into a field still lands there
        const source = Object.assign(document.createElement("div"), { id: "words", draggable: true,
                                                                     textContent: "drag me" });
        source.style = "position: fixed; top: 0; left: 0; z-index: 9";
        source.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/plain", "dropped words"));
        document.body.append(source);
        document.querySelector("#voice-name").value = "";
    }""")
    page.drag_and_drop("#words", "#voice-name")
    assert page.input_value("#voice-name") == "dropped words"
    assert page.evaluate("['none.wav', 'NONE.mp3', 'My Voice (2).wav', '.hidden.wav'].map(nameOf)") == [
        "voice", "voice", "My Voice _2_", "hidden"]


def test_the_default_preset_leaves_the_blocks_to_the_server_as_an_api_client_does(page):
    """The page sent the default preset's streaming blocks, which the server then used for every text
    chunk: a take tuned in the playground differed from what an API client gets for long text."""
    page.wait_for_function("document.querySelectorAll('#preset option').length > 1")
    sent = speech_requests(page)
    page.click("#generate")
    page.wait_for_function("window.echoPlayground.streaming || window.echoPlayground.takes.length", timeout=60000)
    page.click("#stop")
    body = sent[0].post_data_json
    assert "block_sizes" not in body and "num_steps" not in body and body["voice"]
    page.select_option("#preset", "low")
    page.click("#generate")
    page.wait_for_function("window.echoPlayground.streaming || window.echoPlayground.takes.length", timeout=60000)
    page.click("#stop")
    assert sent[1].post_data_json["block_sizes"] == PERFORMANCE_PRESETS["low"][0]


def test_a_server_without_keys_shows_no_key_field(browser, cutting_site, site):
    page = browser.new_page()
    page.goto(cutting_site.url + "/")
    page.wait_for_function("document.querySelectorAll('#preset option').length > 1")
    assert page.is_hidden("#key-field")
    page.goto(site.url + "/")  # (a server with a key: the field is there)
    page.wait_for_selector("#key-field", state="visible")
    page.close()
