// The Echo-TTS playground: plain JavaScript against the server's own API, nothing from elsewhere.
"use strict";

const RATE = 44100; // the PCM the playground asks for: 16-bit little-endian mono at 44.1 kHz
let presets = {}; // the server's streaming presets (GET /v1/audio/presets): name -> block_sizes, num_steps
let defaultPreset = null; // the one the server uses when a request names none
const $ = (id) => document.getElementById(id);
// State the browser tests read: samples handed to the audio graph, whether a request streams, the
// sounds scheduled and not ended, the settings of each take.
const state = (window.echoPlayground = { samplesScheduled: 0, streaming: false, playing: 0, takes: [] });
let controller = null;
let audio = null;
const sources = new Set(); // every scheduled sound not ended yet: Stop, Generate and Play silence them all

function headers(extra = {}) {
  const key = $("key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function apiError(response) {
  try { return (await response.json()).error.message; } catch { return `HTTP ${response.status}`; }
}

function say(text) { $("status").textContent = text; }

// ---- text ------------------------------------------------------------------------------------

function describeText() {
  const text = $("text").value.trim();
  const words = text ? text.split(/\s+/).length : 0;
  const seconds = Math.max(text.length / 14, words / 2.7); // the server's speaking-rate estimate
  $("text-info").textContent = `${text.length} characters, about ${seconds.toFixed(1)} s of audio`;
}

// ---- voices ----------------------------------------------------------------------------------

// A list reloaded (a key entered, a voice added or deleted) keeps what the user chose when it still exists.
function fill(select, names, chosen) {
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  if (names.includes(chosen)) select.value = chosen;
}

async function loadVoices(select) {
  const chosen = select ?? $("voice").value;
  let response;
  try { response = await fetch("/v1/voices", { headers: headers() }); } catch (error) {
    say(`Voices: the server cannot be reached (${error.message})`); return;
  }
  if (!response.ok) { say(`Voices: ${await apiError(response)}`); return; }
  const names = (await response.json()).data.map((v) => v.id);
  const status = $("status").textContent;
  if (status.startsWith("This server needs") || status.startsWith("Voices:")) say(""); // (a key that works now)
  fill($("voice"), ["none", ...names], chosen);
}

async function loadPresets() {
  const chosen = $("preset").value;
  const response = await fetch("/v1/audio/presets", { headers: headers() }).catch(() => null);
  if (!response?.ok) return; // requests then take the server's default blocks and steps
  const body = await response.json();
  presets = body.presets;
  defaultPreset = body.default;
  fill($("preset"), Object.keys(presets), chosen in presets ? chosen : body.default);
}

// One voice request (upload or delete) at a time: a second click while one runs is ignored (a
// finished recording or a dropped file waits for its turn instead), and a failure to reach the
// server is said where the answer would have been. The buttons say they are busy (aria-disabled)
// but keep the focus, and Record stays usable while it records.
let voiceBusy = null; // the voice request running, if any
async function voiceRequest(work, failed, waits = false) {
  if (voiceBusy && !waits) return;
  while (voiceBusy) await voiceBusy;
  const busy = (on) => { for (const id of ["upload", "delete-voice"]) $(id).setAttribute("aria-disabled", on); };
  busy(true);
  voiceBusy = (async () => {
    try { await work(); } catch (error) { $("quality").textContent = `${failed}: ${error.message}`; }
  })();
  try { await voiceBusy; } finally { voiceBusy = null; busy(false); }
}

function uploadVoice(blob, fileName, waits = false) {
  return voiceRequest(() => upload(blob, fileName), "Upload failed", waits);
}

// A name from a file's name, as the server takes names: A-Z a-z 0-9 space _ . - (others become _),
// not starting with "." or a space, at most 64 characters ("My Voice (2).wav" -> "My Voice _2_").
function nameOf(fileName) {
  const name = fileName.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9 _.-]/g, "_").replace(/^[. ]+/, "").slice(0, 64).trimEnd();
  return name && name.toLowerCase() !== "none" ? name : "voice"; // ("none" means no voice)
}

let pending = null; // the clip to upload: the last one chosen, dropped or recorded, kept until it is added
async function upload(blob, fileName) {
  pending = { blob, fileName };
  const name = $("voice-name").value.trim() || nameOf(fileName);
  const form = new FormData();
  form.append("name", name);
  form.append("audio_sample", blob, fileName);
  if ($("consent").checked) form.append("consent", "confirmed in the playground");
  if ($("overwrite").checked) form.append("overwrite", "true");
  $("quality").textContent = "Uploading…";
  const response = await fetch("/v1/audio/voices", { method: "POST", headers: headers(), body: form });
  if (!response.ok) {
    const hint = response.status === 409 ? ` (tick "Replace a voice of that name", or enter another name, and press Upload)`
      : " (the clip is kept: press Upload to send it again)";
    $("quality").textContent = `Upload failed: ${await apiError(response)}${hint}`;
    return;
  }
  pending = null; // added: the next clip is a new voice, under its own name, unless asked otherwise
  $("voice-name").value = "";
  $("overwrite").checked = false;
  const voice = await response.json();
  const q = voice.quality;
  $("quality").textContent = `Voice "${voice.id}" added: ${q.duration_seconds} s, ${q.sample_rate} Hz, ` +
    `${q.channels} channel(s), peak ${q.peak}, loudness ${q.loudness_dbfs} dBFS, ` +
    `${Math.round(q.silence_fraction * 100)} % silence` +
    (q.warnings.length ? `\nWarnings: ${q.warnings.join("; ")}` : "");
  await loadVoices(voice.id);
}

function deleteVoice() {
  return voiceRequest(removeVoice, "Delete failed");
}

async function removeVoice() {
  const name = $("voice").value;
  if (name === "none") { $("quality").textContent = "Choose the voice to delete above."; return; }
  if (!confirm(`Delete the voice "${name}"? This cannot be undone.`)) return;
  const response = await fetch(`/v1/audio/voices/${encodeURIComponent(name)}`, { method: "DELETE", headers: headers() });
  $("quality").textContent = response.ok ? `Voice "${name}" deleted.` : `Delete failed: ${await apiError(response)}`;
  if (response.ok) await loadVoices("none");
}

let recorder = null; // the MediaRecorder, or "starting" while the browser asks for the microphone
async function toggleRecording() {
  if (recorder === "starting") return; // (a second click while the permission prompt shows)
  if (recorder) { recorder.stop(); return; }
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error("the browser lends the microphone only to https:// pages and http://localhost; " +
      "open the playground there, or upload a recording as a file");
  }
  recorder = "starting";
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({ audio: true }); } finally { recorder = null; }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    recorder = null;
    $("record").textContent = "Record";
    await uploadVoice(new Blob(chunks, { type: chunks[0]?.type || "audio/webm" }), "recording.webm", true);
  };
  recorder.start();
  $("record").textContent = "Stop recording";
}

// ---- speech ----------------------------------------------------------------------------------

const NUMBERS = ["steps", "cfg-text", "cfg-speaker", "kv-scale", "seed"];

// The settings as the server takes them; an empty field is left to the server's default.
function requestBody() {
  const body = { input: $("text").value, voice: $("voice").value, response_format: "pcm", sample_rate: RATE };
  if ($("cfg-text").value) body.cfg_scale_text = Number($("cfg-text").value);
  if ($("cfg-speaker").value) body.cfg_scale_speaker = Number($("cfg-speaker").value);
  const preset = presets[$("preset").value];
  const serverDefault = $("preset").value === defaultPreset && !$("steps").value;
  if (preset && !serverDefault) { // (the default is left to the server: later text chunks then take its long blocks)
    body.block_sizes = preset.block_sizes;
    body.num_steps = $("steps").value ? preset.block_sizes.map(() => Number($("steps").value)) : preset.num_steps;
  }
  if ($("kv-scale").value) body.speaker_kv_scale = Number($("kv-scale").value);
  return body;
}

// The seed as the digits of a whole number (a 64-bit seed is more than a JavaScript number holds
// exactly), or null when the field holds something else (1e3, 5.0).
function seedDigits() {
  try { return BigInt($("seed").value.trim() || "0").toString(); } catch { return null; }
}

function requestJson(body, seed) {
  return JSON.stringify({ seed: 0, ...body }).replace(/^\{"seed":0/, `{"seed":${seed}`);
}

async function generate() {
  if (controller) return; // (a second activation before the first one's request started)
  const seed = seedDigits();
  $("seed").setCustomValidity(seed === null ? "a whole number (-1: a random one)" : "");
  if (!NUMBERS.every((id) => $(id).reportValidity())) return; // the field says what it takes
  controller = new AbortController();
  stopPlayback();
  setBusy(true);
  audio = audio || new AudioContext({ sampleRate: RATE });
  await audio.resume();
  const body = requestBody();
  const started = performance.now();
  let firstAudio = null;
  let playAt = audio.currentTime + 0.05;
  let carry = new Uint8Array(0);
  let usedSeed = seed;
  let complete = false; // the whole body arrived
  const pieces = [];
  try {
    const response = await fetch("/v1/audio/speech", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }),
      body: requestJson(body, seed), signal: controller.signal,
    });
    if (!response.ok) { say(`Failed: ${await apiError(response)}`); return; }
    const used = response.headers.get("X-Echo-Seed"); // (the one drawn for -1)
    usedSeed = used;
    state.streaming = true;
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) { complete = true; break; }
      const bytes = new Uint8Array(carry.length + value.length);
      bytes.set(carry);
      bytes.set(value, carry.length);
      const whole = bytes.length - (bytes.length % 2); // 16-bit samples may straddle two reads
      carry = bytes.slice(whole);
      if (!whole) continue;
      const samples = new Int16Array(bytes.buffer.slice(0, whole));
      if (firstAudio === null) firstAudio = performance.now() - started;
      pieces.push(samples);
      playAt = schedule(samples, playAt);
      say(`Playing… first audio after ${Math.round(firstAudio)} ms`);
    }
    const take = joined(pieces);
    const seconds = take.length / RATE;
    const wall = (performance.now() - started) / 1000;
    say(`Done: ${seconds.toFixed(1)} s of audio, first audio after ${Math.round(firstAudio)} ms, ` +
        `real-time factor ${(wall / seconds).toFixed(2)}, seed ${used}`);
    addTake(take, { ...body, seed: used, ttfb_ms: Math.round(firstAudio) }); // (the seed as its digits)
  } catch (error) {
    if (error.name === "AbortError") say("Stopped.");
    else if (firstAudio === null || complete) say(`Failed: ${error.message}`);
    else { // the server cut the stream after audio had begun: what came is kept as a take
      const take = joined(pieces);
      say(`Failed after ${(take.length / RATE).toFixed(1)} s of audio: the server ended the stream early (its ` +
          "log says why, e.g. its time limit, ECHO_REQUEST_TIMEOUT). What came is kept below.");
      if (take.length) addTake(take, { ...body, seed: usedSeed, ttfb_ms: Math.round(firstAudio), cut: true });
    }
  } finally {
    state.streaming = false;
    controller = null;
    setBusy(false);
  }
}

function schedule(samples, playAt) {
  const buffer = audio.createBuffer(1, samples.length, RATE);
  const channel = buffer.getChannelData(0);
  for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
  const source = audio.createBufferSource();
  source.buffer = buffer;
  source.connect(audio.destination);
  source.onended = () => { sources.delete(source); showPlaying(); };
  sources.add(source);
  const at = Math.max(playAt, audio.currentTime);
  source.start(at);
  state.samplesScheduled += samples.length;
  showPlaying();
  return at + buffer.duration;
}

function stopPlayback() {
  for (const source of sources) source.stop();
  sources.clear();
  showPlaying();
}

// Stop works while a request streams or sound is still to be heard.
function showPlaying() {
  state.playing = sources.size;
  $("stop").disabled = !controller && !sources.size;
}

function joined(pieces) {
  const out = new Int16Array(pieces.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of pieces) { out.set(p, offset); offset += p.length; }
  return out;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  for (const play of document.querySelectorAll("#takes button.play")) play.disabled = busy; // one take heard at a time
  showPlaying();
}

// ---- takes -----------------------------------------------------------------------------------

function drawWave(canvas, samples) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#5b5bd6";
  const step = Math.max(1, Math.floor(samples.length / width));
  for (let x = 0; x < width; x++) {
    let peak = 0;
    for (let i = x * step; i < Math.min((x + 1) * step, samples.length); i++) peak = Math.max(peak, Math.abs(samples[i]));
    const h = (peak / 32768) * height;
    ctx.fillRect(x, (height - h) / 2, 1, Math.max(h, 1));
  }
}

function wavBlob(samples) {
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (offset, s) => [...s].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVEfmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, RATE, true); view.setUint32(28, RATE * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
  samples.forEach((s, i) => view.setInt16(44 + i * 2, s, true));
  return new Blob([view], { type: "audio/wav" });
}

function addTake(samples, settings) {
  state.takes.push(settings);
  drawWave($("wave"), samples);
  const item = document.createElement("li");
  const label = `${settings.cut ? "cut short: " : ""}${settings.voice}, seed ${settings.seed}, ` +
    `${(samples.length / RATE).toFixed(1)} s, ` +
    `steps ${settings.num_steps?.join("/") ?? "server default"}, ` +
    `guidance ${settings.cfg_scale_text ?? "default"}/${settings.cfg_scale_speaker ?? "default"}`;
  const play = document.createElement("button");
  play.type = "button";
  play.className = "play";
  play.textContent = "Play";
  play.setAttribute("aria-label", `Play take: ${label}`);
  play.onclick = async () => {
    audio = audio || new AudioContext({ sampleRate: RATE });
    await audio.resume();
    stopPlayback();
    schedule(samples, audio.currentTime);
  };
  const download = document.createElement("a");
  download.href = "#"; // the WAV is made when asked for, and let go after: a take holds only its samples
  download.download = `echo-take-${state.takes.length}-seed-${settings.seed}.wav`;
  download.textContent = "Download WAV";
  download.addEventListener("click", () => {
    const url = URL.createObjectURL(wavBlob(samples));
    download.href = url; // (read by the click's default action, after this listener)
    setTimeout(() => { URL.revokeObjectURL(url); download.href = "#"; }, 10000);
  });
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "Remove";
  remove.setAttribute("aria-label", `Remove take: ${label}`);
  remove.onclick = () => item.remove(); // (a sound of it already scheduled plays to its end)
  const wave = document.createElement("canvas");
  wave.width = 600; wave.height = 40;
  wave.setAttribute("role", "img");
  wave.setAttribute("aria-label", "waveform of this take");
  drawWave(wave, samples);
  item.append(`${label} `, play, " ", download, " ", remove, wave);
  $("takes").prepend(item);
}

// ---- wiring ----------------------------------------------------------------------------------

$("key").value = localStorage.getItem("echo-key") || "";
$("key").addEventListener("change", () => {
  localStorage.setItem("echo-key", $("key").value.trim());
  loadPresets();
  loadVoices(); // (each says what fails)
});
$("text").addEventListener("input", describeText);
$("random-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => { if (controller) controller.abort(); stopPlayback(); });
$("delete-voice").addEventListener("click", deleteVoice);
$("upload").addEventListener("click", () => {
  const file = $("file").files[0];
  if (pending) uploadVoice(pending.blob, pending.fileName);
  else if (file) uploadVoice(file, file.name);
  else $("quality").textContent = "Choose, drop or record a clip first.";
});
$("file").addEventListener("change", () => { pending = null; }); // (a file chosen now is the one to upload)
$("record").addEventListener("click", () => toggleRecording().catch((e) => { $("quality").textContent = `Recording: ${e.message}`; }));
const drop = $("drop");
drop.addEventListener("keydown", (e) => {
  if (e.target !== drop || (e.key !== "Enter" && e.key !== " ")) return; // (the file input handles its own keys)
  e.preventDefault(); // (Space would also scroll the page)
  $("file").click();
});
// A file dropped beside the zone would make the browser open it, leaving the page and its takes (text
// dropped into a field still lands there).
for (const type of ["dragover", "drop"]) {
  document.addEventListener(type, (e) => { if (e.dataTransfer?.types.includes("Files")) e.preventDefault(); });
}
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const file = e.dataTransfer.files[0];
  if (file) uploadVoice(file, file.name, true);
});
async function start() {
  describeText();
  const health = await (await fetch("/health")).json();
  $("key-field").hidden = !health.auth;  // a key field only where the server needs one
  if (health.auth && !$("key").value.trim()) { say("This server needs an API key: enter it above."); return; }
  await Promise.all([loadPresets(), loadVoices()]);
}
start().catch((error) => say(`The server cannot be reached (${error.message}): reload the page to try again.`));
