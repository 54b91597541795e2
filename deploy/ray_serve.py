"""Echo-TTS on Ray Serve: the same FastAPI app on several replicas (one model copy each, one GPU each
by default) behind one URL, on one machine or a cluster.

    python deploy/ray_serve.py       # a new local Ray instance, or the cluster at RAY_ADDRESS
    serve run deploy/serve_config.yaml

Every ECHO_* variable configures the replicas as it configures `python api_server.py`; ECHO_RAY_*
(RaySettings below) shapes the deployment. A replica takes requests once its models are loaded and
warmed up, and its health check is the condition /ready answers.

Routing: a replica holds at most ECHO_MAX_ACTIVE + ECHO_MAX_QUEUE requests (generating and waiting)
and refuses more, so Ray's router sends each request to the less busy of two replicas that has
room, else holds it. A proxy holds as many requests as all replicas together (at most) can; past
that it answers 429, in OpenAI's shape (deploy/proxy_errors.py), with Retry-After. (Ray counts a
request as held until it reaches a replica, so a smaller limit would refuse bursts the replicas
have room for.)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the server's modules live in the repository root
    sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
from pydantic import Field, ValidationError, model_validator  # noqa: E402
from pydantic_settings import BaseSettings, SettingsConfigDict  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.metrics import Gauge  # noqa: E402

from api_server import create_app  # noqa: E402
from errors import RETRY_AFTER_FULL_S  # noqa: E402
from observability import configure_logging  # noqa: E402
from settings import ConfigError, Settings, config_error, load_settings  # noqa: E402

log = logging.getLogger("echo_tts.ray")
APP_NAME = "echo-tts"
DEPLOYMENT_NAME = "EchoTTS"
CONSTRUCTOR_RETRIES = 3  # a replica that cannot load its models fails the deployment after this many tries
METRICS_MIRROR_SECONDS = 5.0
FORWARDED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "TORCHINDUCTOR_CACHE_DIR")
# never in a runtime_env, which Ray writes to its logs (served by its dashboard): replicas read them from
# their own environment (a new local instance's workers inherit this process's; a cluster's nodes: a Secret)
SECRET_ENV = ("ECHO_API_KEY", "HF_TOKEN")
KEY_CHECK_ENV = "ECHO_RAY_API_KEY_CHECK"  # salt:sha256(salt + ECHO_API_KEY): replicas prove they have the key
PROXY_CALLBACK = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "deploy.proxy_errors:middlewares")


class RaySettings(BaseSettings):
    """The deployment's shape: ECHO_RAY_<NAME>. Fixed replicas, or autoscaling between bounds."""

    model_config = SettingsConfigDict(env_prefix="ECHO_RAY_", case_sensitive=False, extra="ignore")

    replicas: int | None = Field(None, ge=1)  # unset: one per GPU in the cluster (at least 1)
    min_replicas: int | None = Field(None, ge=0)  # autoscaling: set ECHO_RAY_MAX_REPLICAS (min defaults to 1)
    max_replicas: int | None = Field(None, ge=1)
    gpus_per_replica: float | None = Field(None, ge=0)  # unset: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = Field(1.0, gt=0)  # also torch's thread count on the CPU (Ray sets OMP_NUM_THREADS)
    # Ray counts an open WebSocket as an ongoing request for its whole life: room for this many beside the
    # HTTP requests a replica holds, so idle voice-agent sockets do not stop its HTTP routes (/ready among them)
    sockets_per_replica: int = Field(32, ge=0)
    metrics_export_port: int | None = Field(None, ge=1, le=65535)  # a new local instance's Prometheus port
    dashboard: bool = True  # a new local instance's Ray dashboard (port 8265)

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> RaySettings:
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise ValueError("set ECHO_RAY_REPLICAS or the autoscaling bounds ECHO_RAY_MIN/MAX_REPLICAS, not both")
        if self.min_replicas is not None and self.max_replicas is None:
            raise ValueError("ECHO_RAY_MIN_REPLICAS needs ECHO_RAY_MAX_REPLICAS (autoscaling bounds)")
        if self.max_replicas is not None and self.max_replicas < (self.min_replicas or 0):
            raise ValueError("ECHO_RAY_MAX_REPLICAS is below ECHO_RAY_MIN_REPLICAS")
        return self


def load_ray_settings() -> RaySettings:
    """ECHO_RAY_* read once; a malformed value raises ConfigError naming the variable."""
    try:
        return RaySettings()
    except ValidationError as e:
        raise config_error(e, lambda field: f"ECHO_RAY_{field.upper()}") from None


# ---- the replica ----------------------------------------------------------------------------------


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class EchoReplica:
    """One replica: the app of api_server.py, named after the replica in X-Echo-Replica."""

    async def __init__(self):
        replica = serve.get_replica_context().replica_id.to_full_id_str()
        self.settings = load_settings(replica_name=replica)
        configure_logging(self.settings.debug_logs, self.settings.log_json)
        check_api_key(self.settings, os.environ.get(KEY_CHECK_ENV))
        self._mirror = asyncio.get_running_loop().create_task(self._mirror_metrics())

    def __serve_build_asgi_app__(self):
        return create_app(self.settings, ray_replica=True)  # not routed to until loaded and warmed

    def check_health(self) -> None:
        """Ray's health check (every 10 s): the replica is healthy exactly when /ready says 200."""
        if reason := self.app.state.service.unready_reason():
            raise RuntimeError(reason)

    async def _mirror_metrics(self) -> None:
        mirror = MetricsMirror()
        while True:
            await asyncio.sleep(METRICS_MIRROR_SECONDS)
            try:
                if hasattr(self, "_asgi_app"):  # the app exists once __serve_build_asgi_app__ has run
                    mirror.copy(self.app.state.metrics.registry)
            except Exception:  # noqa: BLE001 - the next round tries again; requests are not concerned
                log.exception("copying the metrics into Ray's failed")


class MetricsMirror:
    """Copies a replica's Prometheus samples into Ray's metrics, where each Ray node's metrics port
    exports them (as ray_echo_*) with `deployment`, `replica` and `application` labels: one scrape
    per node sees every replica on it, which scraping /metrics through the proxy cannot."""

    def __init__(self):
        self.gauges: dict[str, Gauge] = {}

    def copy(self, registry) -> None:
        for family in registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # creation timestamps, not measurements
                    continue
                self._gauge(sample.name, family.documentation, tuple(sample.labels)).set(sample.value,
                                                                                        tags=dict(sample.labels))

    def _gauge(self, name: str, documentation: str, labels: tuple[str, ...]) -> Gauge:
        if name not in self.gauges:
            self.gauges[name] = Gauge(name, description=documentation or name, tag_keys=labels)
        return self.gauges[name]


# ---- the application ------------------------------------------------------------------------------


def deployment_options(scale: RaySettings, echo: Settings, cluster_gpus: float) -> dict:
    """Ray Serve options for the replicas, from the settings and the GPUs the cluster has."""
    gpus = scale.gpus_per_replica if scale.gpus_per_replica is not None else (1.0 if cluster_gpus else 0.0)
    replicas = scale.replicas or (max(1, int(cluster_gpus // gpus)) if gpus else 1)
    per_replica = echo.max_active + echo.max_queue
    ongoing = per_replica + scale.sockets_per_replica
    options = {
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": scale.cpus_per_replica,
                              "runtime_env": {"env_vars": replica_env()}},
        # Ray enforces this per replica (it retries a refused request on another): no replica queues more
        # than one server would (and its open WebSockets), and none answers 429 while another has room
        "max_ongoing_requests": ongoing,
        "max_queued_requests": ongoing * (scale.max_replicas or replicas),  # per proxy
        "backpressure_config": {"status_code": 429, "retry_after_s": RETRY_AFTER_FULL_S},
        "graceful_shutdown_timeout_s": echo.shutdown_grace,  # streams in flight may finish, as on SIGTERM
        "graceful_shutdown_wait_loop_s": 1.0,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
    }
    if scale.max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": 1 if scale.min_replicas is None else scale.min_replicas,
                                         "max_replicas": scale.max_replicas,
                                         "target_ongoing_requests": echo.max_active}
    else:
        options["num_replicas"] = replicas
    return options


def unplaceable(options: dict, resources: dict[str, float]) -> str | None:
    """Why the replicas a deployment starts with cannot all be placed on a cluster of `resources`
    (Ray would wait for them forever), or None."""
    replicas = options.get("num_replicas") or options["autoscaling_config"]["min_replicas"]
    actor = options["ray_actor_options"]
    for resource, per_replica in (("GPU", actor["num_gpus"]), ("CPU", actor["num_cpus"])):
        need, have = replicas * per_replica, resources.get(resource, 0.0)
        if need > have:
            return (f"{replicas} replica(s) of {per_replica:g} {resource} need {need:g} {resource}s and the Ray "
                    f"instance has {have:g} (ECHO_RAY_REPLICAS or ECHO_RAY_MIN_REPLICAS, "
                    f"ECHO_RAY_{resource}S_PER_REPLICA)")
    return None


def replica_env() -> dict[str, str]:
    """What replicas see of this process's environment: every ECHO_* variable and the Hugging Face
    ones but the secrets (SECRET_ENV), a check that their own ECHO_API_KEY is this one, and the
    repository on PYTHONPATH (the replicas import the server's modules from it)."""
    env = {k: v for k, v in os.environ.items()
           if (k.startswith("ECHO_") or k in FORWARDED_ENV) and k not in SECRET_ENV}
    if key := os.environ.get("ECHO_API_KEY", "").strip():
        salt = secrets.token_hex(8)
        env[KEY_CHECK_ENV] = f"{salt}:{_digest(salt, key)}"
    return env | {"PYTHONPATH": python_path()}


def check_api_key(settings: Settings, check: str | None) -> None:
    """A replica's ECHO_API_KEY must be the driver's (`check`, from replica_env): a replica on a node
    without it would serve everyone."""
    if not check:
        return
    salt, digest = check.split(":", 1)
    if not hmac.compare_digest(_digest(salt, (settings.api_key or "").strip()), digest):
        raise ConfigError("invalid configuration:\n  ECHO_API_KEY: this replica's differs from the one the "
                          "deployment was started with, or is unset: set it on every node (a Secret), not only "
                          "where the application is built")


def _digest(salt: str, key: str) -> str:
    return hashlib.sha256((salt + key).encode()).hexdigest()


def python_path() -> str:
    """PYTHONPATH with the repository first."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def driver_settings() -> Settings:
    """The ECHO_* settings where the application is built, which may have no GPU: only the replicas
    use (and check) the devices."""
    return load_settings(device="cpu", fish_device="cpu")


def build(scale: RaySettings, echo: Settings, placeable: bool = False):
    """The Serve application (call with Ray initialised: the default replica count is the GPU count).
    With `placeable`, replicas that the cluster cannot hold are an error (a fixed local instance);
    else a warning (an autoscaling cluster may add nodes)."""
    resources = ray.cluster_resources()
    options = deployment_options(scale, echo, resources.get("GPU", 0.0))
    if problem := unplaceable(options, resources):
        if placeable:
            raise ConfigError(f"invalid configuration:\n  {problem}")
        log.warning("%s: the replicas wait until the cluster grows", problem)
    return EchoReplica.options(**options).bind()


def app_builder(args: dict):
    """`import_path` of serve_config.yaml. Settings come from ECHO_* variables (the config's
    runtime_env), not from `args`."""
    if args:
        raise ValueError(f"deploy.ray_serve takes no args ({sorted(args)}); set ECHO_* in runtime_env.env_vars")
    return build(load_ray_settings(), driver_settings())


# ---- `python deploy/ray_serve.py` -----------------------------------------------------------------


class Stop(Exception):
    """SIGTERM arrived."""


def _stop(*_) -> None:
    raise Stop()


def main() -> int:
    echo, scale = driver_settings(), load_ray_settings()
    configure_logging(echo.debug_logs, echo.log_json)
    joined = bool(os.environ.get("RAY_ADDRESS"))
    if not joined:  # a new local instance: its proxies inherit this environment (on a cluster: see README)
        os.environ.setdefault(*PROXY_CALLBACK)
        os.environ["PYTHONPATH"] = python_path()
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local",
                 **({} if joined else {"_metrics_export_port": scale.metrics_export_port,
                                       "include_dashboard": scale.dashboard}))
        signal.signal(signal.SIGTERM, _stop)  # after ray.init, which installs a handler of its own
        serve.start(http_options={"host": echo.host, "port": echo.port})
        serve.run(build(scale, echo, placeable=not joined), name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d (Ray Serve application %r)", echo.host, echo.port, APP_NAME)
        threading.Event().wait()  # until a signal interrupts it
    except (Stop, KeyboardInterrupt):
        log.info("stopping")
    except (RuntimeError, ConnectionError) as e:  # no cluster at RAY_ADDRESS, or a replica could not load
        log.error("%s (the replicas' log lines above say why)" if isinstance(e, RuntimeError) else "%s", e)
        return 1
    finally:
        _shut_down(joined)
    return 0


def _shut_down(joined: bool) -> None:
    """Stop routing new requests here, let the replicas finish their streams (for up to
    ECHO_SHUTDOWN_GRACE s), then stop them; then, unless this process joined a shared cluster, all of
    Serve and the Ray instance it started."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    try:
        if ray.is_initialized():
            serve.delete(APP_NAME)  # the proxies stay up meanwhile: streams in flight keep flowing
            if not joined:
                serve.shutdown()
    finally:
        ray.shutdown()
        log.info("stopped")


if __name__ == "__main__":
    import deploy.ray_serve as module  # the deployment must be importable by name in the replicas

    sys.exit(module.main())
