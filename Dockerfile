# Echo-TTS Streaming API on an NVIDIA GPU. Build: docker build -t echo-tts .  Run: see compose.yaml.
FROM python:3.11-slim

# torch from PyPI is the CUDA build on x86-64 Linux (it brings its CUDA libraries; the host needs
# only the NVIDIA driver and the container toolkit). Every other package is pinned by the lock.
ARG TORCH_VERSION=2.13.0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/huggingface \
    ECHO_CACHE_DIR=/data/compile-cache \
    TORCHINDUCTOR_CACHE_DIR=/data/compile-cache/inductor \
    ECHO_VOICE_DIRS=/voices \
    PORT=8000

# torch.compile (the default on CUDA) builds with a C compiler: triton its launcher, inductor its
# wrappers. The slim image has none, and without one the fast path falls back to eager.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt requirements.lock ./
RUN pip install "torch==${TORCH_VERSION}" -r requirements.txt -c requirements.lock

COPY *.py ./
COPY static/ ./static/
COPY audio_prompts/ /voices/
RUN useradd --create-home --uid 1000 echo && mkdir -p /data && chown -R echo:echo /data /voices
USER echo

# The Hugging Face cache and the compile caches, and the voices: kept across containers.
VOLUME ["/data", "/voices"]
EXPOSE 8000
# /ready turns 200 once the models are loaded and warmed up (compiling can take minutes); with
# ECHO_API_KEY set it sends the first key (blank items aside, as the server reads them).
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 CMD python -c "import os, sys, urllib.request; \
key = next((k.strip() for k in (os.environ.get('ECHO_API_KEY') or '').split(',') if k.strip()), ''); \
port = os.environ.get('ECHO_PORT') or os.environ.get('PORT') or '8000'; \
request = urllib.request.Request('http://127.0.0.1:%s/ready' % port, \
headers={'Authorization': 'Bearer ' + key} if key else {}); \
sys.exit(0 if urllib.request.urlopen(request, timeout=4).status == 200 else 1)"
# SIGTERM: stop accepting, let streams finish for ECHO_SHUTDOWN_GRACE (30 s), exit 0.
STOPSIGNAL SIGTERM
CMD ["python", "api_server.py"]
