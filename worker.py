"""The generation worker: runs many speech jobs on one thread, scheduled by playback deadline.

A job is SpeechEngine.job_steps, a step generator: it yields a TextCall (a text chunk for the
text encoder: send back its keys/values), a ModelCall (one diffusion step: send back its
velocity), a PrefixCall (a finished block into its latent prefix: send back None), a DecodeCall
(one block through its stream's decoder: send back its audio), a SilenceCheck (VAD reroll: send
back the longest silence) or finished audio (an np.ndarray for the client: send back None), and
ends when its audio is complete. Every job runs
through `GenerationWorker._advance`, the one driver of that protocol on the worker thread
(`SpeechEngine.generate` drives the same steps for a job alone).

Scheduling. Each iteration the worker runs one unit of work: the diffusion steps of all jobs whose
next step has the same frame count (one batched forward pass, no padding across block sizes), the
pending decodes of all jobs (one batched decoder call), the text chunks of all jobs that start
one (one text-encoder call per length bucket: admitting 16 jobs costs about one encoder pass, not 16),
or the finished blocks of all jobs into their latent prefixes (one encoder call for the jobs whose
prefixes line up: those that started together). Units are taken earliest deadline
first. A job's deadline is when its listener would notice it is late:
- before its first audio: its arrival plus `first_audio_budget` seconds;
- once playing: the moment the audio it has delivered runs out, i.e. its first audio's time plus
  the seconds delivered, at the response's speed (playback is assumed to start with the first audio
  and run in real time; a parking moves it on only by the time its client was behind beyond the
  time playing what it had to take: a listener who paused).
A unit's deadline is its most urgent member's. So a new stream's first block runs as soon as its
deadline is the nearest (within one unit of its arrival when the others have audio buffered), and
a stream with seconds buffered yields to one about to run dry. Starvation-free: a job's deadline
changes only when it delivers audio, so a job that waits keeps its deadline while every other
job's moves later as it is served, and it becomes the earliest after finitely many units.
Between units the worker admits new jobs, parks jobs that ran ahead of their client
(`max_ahead_samples`) and drops cancelled, timed-out and stalled ones. A parked job whose client has
caught up goes back before any new job: into a free slot, or into the slot of the running job with
the latest deadline when its own is earlier by more than SWAP_MARGIN (that one waits parked). A unit that runs out of
device memory is computed again in halves (every unit is all or nothing); a job whose own work
does not fit fails (the client gets 503), the others carry on.

Adaptive steps (ECHO_ADAPTIVE_STEPS, `StepBudget`). Before each unit the worker predicts how close
the schedule runs to an underrun (`predicted_load`: the work before each job's next audio, at the
measured cost of a unit, against the time its listener has left) and moves a step budget: down when
an underrun is predicted, back up once the load has stayed low. A block takes steps between its
floor (the engine's `step_floor`) and its requested steps as the budget says when it starts; a
block in progress keeps its count. The steps each block took are the job's `steps_used`.

Audio goes back to asyncio through each job's queue (JobStream), so GPU work never blocks the
event loop; a full server refuses at `reserve` or `submit` (QueueFull).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import torch

from batched_steps import StaticSteps
from engine import DecodeCall, JobSteps, SilenceCheck, SpeechEngine, SpeechJob, TextCall
from inference_blockwise import PrefixCall
from inference import SAMPLE_RATE, ModelCall

log = logging.getLogger(__name__)

clock = time.monotonic  # the clock of deadlines, parking and timeouts (a simulation replaces it: benchmarks/)
FIRST_AUDIO_BUDGET = 0.5  # seconds from arrival a new stream's first audio may take before it counts as late
SWAP_MARGIN = 1.0  # seconds by which a waiting job's deadline must precede a running one's to take its slot
UNIT_COST_SMOOTHING = 0.2  # weight of the latest unit in the measured seconds per unit (a moving average)
MEMORY_CAP_RELAX_UNITS = 64  # parts of a kind's units run within its out-of-memory cap before it doubles


# the engine's method that computes a unit of each kind of call, the calls of the unit in one go
COMPUTE = {TextCall: "encode_texts", ModelCall: "steps", PrefixCall: "extend_prefixes", DecodeCall: "decode"}


class QueueFull(Exception):
    """More jobs are waiting than the server admits."""


@dataclass
class _Ticket:
    """A submitted job as both sides see it: the worker writes `resume_at`, the JobStream `taken`,
    `taken_at` and `caught_up` (plain attributes: each has one writer, and the reader only compares
    them; the worker also writes `caught_up` when it parks a job whose client is already there, and
    every write names the `resume_at` it is for, so a late one is ignored). Whoever `claim`s it
    first owns its slot: the worker taking it in, or its stream cancelled while it waited (which
    then gives the slot back and ends itself)."""

    job: SpeechJob
    loop: asyncio.AbstractEventLoop
    output: asyncio.Queue
    request_id: str = "-"
    deadline: float | None = None  # clock() after which the job is abandoned (moved on by parking)
    cancelled: threading.Event = field(default_factory=threading.Event)
    wake: Callable[[], None] = lambda: None  # wakes the worker (from any thread)
    release: Callable[[], None] = lambda: None  # gives its slot back (from any thread)
    taken: int = 0  # samples the client has taken from its JobStream
    taken_at: float = 0.0  # clock() of its last take
    resume_at: int | None = None  # while parked: the job resumes once `taken` reaches this
    caught_up: tuple[int, float] | None = None  # (resume_at, clock()) when `taken` reached that resume_at
    arrived: float = field(default_factory=lambda: clock())  # when it was submitted
    speed: float = 1.0  # how fast its listener plays the audio (the response's `speed`): deadlines that much sooner
    steps_used: list[int] | None = None  # with adaptive steps: the diffusion steps of each block started, in order
    _claim: threading.Lock = field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """True for the first caller only (any thread)."""
        return self._claim.acquire(blocking=False)

    def taken_in(self) -> bool:
        """Whether it was claimed: taken in by the worker (or ended by its stream)."""
        return self._claim.locked()

    def took(self, samples: int) -> None:
        """The client took a block (event loop): wake the worker if that lets its parked job go on."""
        self.taken += samples
        self.taken_at = clock()
        if (at := self.resume_at) is not None and self.taken >= at:
            if self.caught_up is None or self.caught_up[0] != at:  # (one tuple: a late write names its resume_at)
                self.caught_up = (at, self.taken_at)
            self.wake()

    def is_caught_up(self) -> bool:
        """While parked: whether its client has taken enough for it to go on (it waits for a slot)."""
        return (at := self.resume_at) is not None and self.taken >= at

    def caught_up_at(self) -> float | None:
        """While parked: when its client caught up with this parking's `resume_at` (None: not yet seen)."""
        caught_up, at = self.caught_up, self.resume_at
        return caught_up[1] if caught_up is not None and caught_up[0] == at else None


def _closed() -> None:
    raise RuntimeError("the generation worker is closed")


class _ThreadCall:
    """A function for the generation thread to run (GenerationWorker.call)."""

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn
        self.finished = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = e
        finally:
            self.finished.set()


class GenerationTimeout(Exception):
    """The job ran past its deadline and was stopped."""


class WorkerClosed(Exception):
    """The worker was closed (the server shuts down) before the job ended: its audio is incomplete."""


class ClientStalled(Exception):
    """The job's client took no audio for the send timeout while the job waited for it: the job was
    stopped and the audio queued for the client dropped."""


_DONE = object()
_WAKE = object()  # put in the worker's queue: a parked job may go on (or was cancelled)


class JobStream:
    """The audio of one submitted job: an async iterator of float32 blocks; `cancel()` stops its work.

    A generation error is raised from the iteration; cancelling stops the job within one step.
    Taking a block is what lets a job that ran ahead of its client go on (GenerationWorker's
    `max_ahead_samples`).
    """

    def __init__(self, ticket: _Ticket):
        self._ticket = ticket
        self._finished = False

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> np.ndarray:
        if self._finished:
            raise StopAsyncIteration
        item = await self._next()
        if item is _DONE or isinstance(item, BaseException):
            self._finished = True
            if isinstance(item, BaseException):
                raise item
            raise StopAsyncIteration
        self._ticket.took(item.size)
        return item

    async def _next(self):
        """The next item of its queue. While the job waits for a slot, its time limit runs here: the
        worker sees a waiting job only when a slot frees, which may be long after the limit."""
        ticket = self._ticket
        while ticket.deadline is not None and not ticket.taken_in():
            try:
                return await asyncio.wait_for(ticket.output.get(), max(ticket.deadline - clock(), 0.0))
            except TimeoutError:
                if ticket.claim():  # (else the worker took it in meanwhile: its own time check ends it)
                    ticket.cancelled.set()
                    ticket.release()
                    log.warning("generation stopped: over its time limit while waiting for a slot",
                                extra={"request_id": ticket.request_id})
                    return GenerationTimeout("generation took longer than the server's time limit "
                                             "(it waited for a slot)")
        return await ticket.output.get()

    def touch(self) -> None:
        """The transport sent a piece of the audio taken from here (event loop): its client is taking
        it, so a parked job's stall clock starts again (a listener playing a 30 s block as it comes
        takes the next block only 30 s later)."""
        self._ticket.taken_at = clock()

    @property
    def steps_used(self) -> list[int] | None:
        """With adaptive steps, the diffusion steps each block of the job took, in order (complete once
        the stream has ended); None without."""
        steps = self._ticket.steps_used
        return None if steps is None else list(steps)

    def cancel(self) -> None:
        """Stop the job within one step; one still waiting for a slot ends now and gives its slot back."""
        ticket = self._ticket
        ticket.cancelled.set()
        if ticket.claim():  # the worker never took it in (and now never will)
            ticket.release()
            _notify(ticket, _DONE)
        elif ticket.resume_at is not None:  # parked: the worker may be asleep
            ticket.wake()


class Reservation:
    """A queue slot held for a job that is not built yet (GenerationWorker.reserve).

    `submit` hands the job to the worker in this slot, with no second check; `release` gives the
    slot back if it was not used (idempotent). As a context manager it is released on exit unless
    submitted.
    """

    def __init__(self, worker: GenerationWorker):
        self._worker = worker
        self._lock = threading.RLock()  # reentrant: a Reservation's finaliser may run inside reserve()
        self._held = True  # until submitted or released

    def submit(self, job: SpeechJob, request_id: str = "-", timeout: float | None = None,
               speed: float = 1.0) -> JobStream:
        """Queue the job in this slot (call from the event loop). A job still running `timeout`
        seconds after submission (time parked not counted; waiting for a slot counted) is stopped
        (GenerationTimeout). `speed`: how fast its listener plays the audio (its deadlines)."""
        loop = asyncio.get_running_loop()  # before the slot is given up: off a loop, nothing changes
        with self._lock:
            if not self._held:
                raise RuntimeError("this reservation was already submitted or released")
            self._held = False
        self._worker._prepared()
        deadline = clock() + timeout if timeout else None
        return self._worker._enqueue(_Ticket(job, loop, asyncio.Queue(), request_id, deadline, speed=speed))

    def release(self) -> None:
        """Give the slot back unless a job took it (any thread; again: nothing)."""
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._worker._prepared()
            self._worker._release()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a reservation dropped unused must not take its slot with it
        self.release()


class StepBudget:
    """ECHO_ADAPTIVE_STEPS: the share of their requested diffusion steps that blocks starting now get.

    `value` is in [0, 1], in steps of 1/`levels`: a block with floor f and requested steps n takes
    f + round((n - f) * value) steps (1: as requested; 0: its floor). `update(load, now)` moves it
    from the scheduler's prediction (`predicted_load`), one level at a time, at most once per `hold`
    seconds: down while an underrun is predicted (load above 1); up by a level for every `hold`
    seconds the load has stayed at or below `restore_load` (so it does not flap between the two).
    Its own clock is the `now` it is given: deterministic for a scripted clock.
    """

    def __init__(self, levels: int = 4, hold: float = 0.5, restore_load: float = 0.5):
        self.levels = levels
        self.hold = hold  # seconds between two moves; of low load before a move up
        self.restore_load = restore_load
        self.level = levels  # value = level / levels
        self.moved_at = -math.inf  # clock() of the last move
        self.loaded_at = -math.inf  # clock() the load was last above restore_load

    @property
    def value(self) -> float:
        return self.level / self.levels

    def steps(self, floor: int, requested: int) -> int:
        """The steps a block that starts now takes: between its floor and its requested steps."""
        return floor + round((requested - floor) * self.value)

    def update(self, load: float, now: float) -> None:
        if load > self.restore_load:
            self.loaded_at = now
        if now - self.moved_at < self.hold:
            return
        if load > 1.0 and self.level > 0:
            self.level -= 1
            self.moved_at = now
        elif load <= self.restore_load and self.level < self.levels:
            calm = now - max(self.moved_at, self.loaded_at)  # seconds of low load since the last move
            if calm >= self.hold:
                self.level = min(self.level + int(min(calm / self.hold, self.levels)), self.levels)
                self.moved_at = now


class GenerationWorker:
    """Runs jobs on one worker thread, batched and scheduled as the module's docstring says.

    Every iteration runs the most urgent unit of work: the diffusion steps of all active jobs at
    one frame count in one forward pass (the engine's step runner: batched_steps.py), the
    pending decodes, text chunks or prefix extensions together. At most
    `max_active` jobs run at once; up to `max_waiting` more wait for a slot or are parked; beyond
    that, submit() and reserve() raise QueueFull. A cancelled job is dropped before its next step; one
    still waiting for a slot ends at once and gives its slot back.

    Back-pressure: a job whose audio is more than `max_ahead_samples` ahead of what its client has
    taken is parked before its next model step: out of the batch, its slot free for another job,
    its deadline stopped, until the client catches up. A job parked while its client takes nothing
    for `send_timeout` seconds is stopped (ClientStalled) and the audio queued for it dropped, so a
    client that never reads holds at most about `max_ahead_samples` of audio, and only that long. Once
    its client has caught up, a parked job waits for a slot with no such clock: the wait is ours.

    With a `step_budget` (ECHO_ADAPTIVE_STEPS), blocks that start under a predicted underrun take
    fewer diffusion steps (the module's docstring); None: every block takes its requested steps.
    """

    def __init__(self, engine: SpeechEngine, max_waiting: int = 16, max_active: int = 8,
                 debug_sink: Callable[[np.ndarray], None] | None = None, max_ahead_samples: int | None = None,
                 send_timeout: float | None = None, first_audio_budget: float = FIRST_AUDIO_BUDGET,
                 step_budget: StepBudget | None = None, thread: bool = True):
        self.engine = engine
        self.max_waiting = max_waiting
        self.max_active = max_active
        self.max_ahead_samples = max_ahead_samples  # None: a job never waits for its client
        self.send_timeout = send_timeout  # None: a parked job waits for its client as long as it takes
        self.first_audio_budget = first_audio_budget  # seconds: a new stream's deadline after its arrival
        self.step_budget = step_budget  # None: no adaptive steps
        self.unit_seconds = 0.0  # with adaptive steps: the measured cost of a unit (moving average; 0 before one ran)
        self.reduced_blocks = 0  # blocks started with fewer steps than requested, since start
        self.steps_saved = 0  # diffusion steps those blocks did not take, since start
        self.memory_splits = 0  # units that ran out of device memory and were computed again in halves, since start
        self.memory_failures = 0  # jobs that failed for want of device memory, since start
        self._memory_caps: dict = {}  # kind of unit (steps: and frame group) -> [most jobs a part runs, parts since]
        self._jobs: queue.Queue[_Ticket | _ThreadCall | object | None] = queue.Queue()
        self._pending = 0
        self._preparing = 0  # reservations not submitted yet (their request prepares its voice and text)
        self._active = 0
        self._parked = 0
        self._lock = threading.Lock()
        self._debug_sink = debug_sink
        self._checks: ThreadPoolExecutor | None = None  # silence checks (VAD reroll), off this thread
        self._closing = False  # close() was called
        self._thread = threading.Thread(target=self._run, name="echo-generation", daemon=True)
        if thread:  # False: no generation thread; the caller runs `_admit` and `iterate` (benchmarks/simulate.py)
            self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs (and reservations) waiting, running or parked."""
        return self._pending

    @property
    def active(self) -> int:
        """Jobs being generated."""
        return self._active

    @property
    def parked(self) -> int:
        """Jobs waiting for their client to take the audio they generated ahead of it."""
        return self._parked

    @property
    def waiting(self) -> int:
        """Jobs submitted and waiting for a slot."""
        return max(self._pending - self._preparing - self._active - self._parked, 0)

    @property
    def preparing(self) -> int:
        """Reservations whose job is not submitted yet: requests preparing their voice (slots held)."""
        return self._preparing

    @property
    def budget(self) -> float:
        """The share of their requested steps (above their floor) that blocks starting now get: 1
        without adaptive steps. With nothing running the budget is not moved (it moves before units),
        so this says what it becomes when the next unit starts on an idle worker."""
        if self.step_budget is None:
            return 1.0
        if self._active or self._parked:
            return self.step_budget.value
        idle = copy.copy(self.step_budget)
        idle.update(0.0, clock())
        return idle.value

    @property
    def alive(self) -> bool:
        """Whether the generation thread still runs (it ends only when closed, or on a bug)."""
        return self._thread.is_alive()

    def submit(self, job: SpeechJob, request_id: str = "-", timeout: float | None = None) -> JobStream:
        """Queue a job (call from the event loop); raises QueueFull when too many are waiting.

        A job still running `timeout` seconds after submission (time parked not counted) is stopped
        (GenerationTimeout).
        """
        with self.reserve() as reservation:
            return reservation.submit(job, request_id, timeout)

    def reserve(self) -> Reservation:
        """Take a queue slot now for a job submitted later (any thread); raises QueueFull when too
        many are waiting. A request reserves before its slow preparation, so a full server refuses
        it at once."""
        with self._lock:
            if self._pending >= self.max_waiting + self.max_active:
                raise QueueFull()
            self._pending += 1
            self._preparing += 1
        return Reservation(self)

    def _enqueue(self, ticket: _Ticket) -> JobStream:
        """Hand a job whose slot is already counted in `pending` to the worker thread."""
        ticket.wake = lambda: self._jobs.put(_WAKE)
        ticket.release = self._release
        self._jobs.put(ticket)
        return JobStream(ticket)

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the generation thread while no job runs, wait for it and return its result.

        Warm-up goes through here: compiled CUDA graphs are recorded per thread, so they must be
        recorded on the thread that replays them.
        """
        done = _ThreadCall(fn)
        self._jobs.put(done)
        done.finished.wait()
        error, done.error = done.error, None  # (nothing here keeps the failed frames alive once it is handled)
        if error is not None:
            raise error
        return done.result

    def close(self) -> None:
        """Stop: after the unit in progress, every job ends, running, parked or waiting for a slot (its
        client gets WorkerClosed: its audio is incomplete), and none is taken in any more."""
        self._closing = True  # (the None below waits behind the queued jobs, read only when a slot is free)
        self._jobs.put(None)
        self._thread.join(timeout=30)
        if self._checks is not None:
            self._checks.shutdown(wait=False, cancel_futures=True)

    # ---- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        active: list[_Running] = []
        parked: list[_Running] = []  # ahead of their client: out of the batch, in the order they left it
        with torch.inference_mode():
            while self._admit(active, parked):
                try:
                    self.iterate(active, parked)
                except Exception as e:  # noqa: BLE001 - a bug: its jobs fail, the server goes on serving
                    log.exception("the generation worker failed: its %d jobs fail", len(active) + len(parked))
                    for jobs in (active, parked):
                        for running in list(jobs):
                            self._stop(jobs, running, e)
                    self._count(active, parked)
        self._active = self._parked = 0

    def iterate(self, active: list[_Running], parked: list[_Running]) -> None:
        """One iteration after admission: drop, park, then run the most urgent unit."""
        self._drop_cancelled(active, parked)
        self._park(active, parked)
        self._count(active, parked)
        self._step(active)
        self._count(active, parked)

    def _count(self, active: list[_Running], parked: list[_Running]) -> None:
        self._active, self._parked = len(active), len(parked)

    def _admit(self, active: list[_Running], parked: list[_Running]) -> bool:
        """Resume parked jobs whose client caught up, then take waiting jobs into free slots. While
        nothing runs it blocks: until a job, a wake-up or the next parked job's send timeout. False
        once closed."""
        if self._closing:
            self._shut(active, parked)
            return False
        self._resume(active, parked)
        while len(active) < self.max_active:
            if not active and (release := getattr(self.engine, "release_idle", None)):  # about to wait: what
                release()  # finished jobs' steps left behind goes now (an engine without it keeps nothing)
            try:
                ticket = self._jobs.get(block=not active, timeout=self._until_stalled(parked))
            except queue.Empty:
                break
            if ticket is _WAKE:
                self._resume(active, parked)
                if not active:
                    break  # (or a parked job was cancelled) back to the checks, then to sleep again
                continue
            if isinstance(ticket, _ThreadCall):
                ticket.run()
                ticket = None  # (its result or error belongs to the caller now)
                continue
            if ticket is None:
                self._shut(active, parked)
                return False
            if not ticket.claim():  # its stream was cancelled while it waited: it ended then
                continue
            if ticket.cancelled.is_set():  # cancelled as it was taken in
                _notify(ticket, _DONE)
                self._release()
                continue
            running = self._running(ticket)
            if self._advance(running, None):
                active.append(running)
            else:
                self._release()
        return True

    def _shut(self, active: list[_Running], parked: list[_Running]) -> None:
        """close(): end every job, running, parked or still queued (each queued job's slot given back,
        a queued call told the worker is closed)."""
        for jobs in (active, parked):
            for running in list(jobs):
                self._stop(jobs, running, WorkerClosed("the server is shutting down"))
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Ticket) and item.claim():
                _notify(item, WorkerClosed("the server is shutting down"))
                self._release()
            elif isinstance(item, _ThreadCall):
                item.fn = _closed
                item.run()

    def _running(self, ticket: _Ticket) -> _Running:
        """A job taken into the batch; with adaptive steps, each of its blocks asks the budget for its
        steps as it starts (recorded in the ticket's `steps_used`)."""
        keep_audio = self._debug_sink is not None
        if self.step_budget is None:
            return _Running(ticket, self.engine.job_steps(ticket.job), keep_audio)
        ticket.steps_used = []
        running = _Running(ticket, None, keep_audio)

        def choose(floor: int, requested: int) -> int:
            steps = self.step_budget.steps(floor, requested)
            ticket.steps_used.append(steps)
            running.steps_left = steps
            if steps < requested:
                self.reduced_blocks += 1
                self.steps_saved += requested - steps
            return steps

        running.steps = self.engine.job_steps(ticket.job, choose)
        return running

    def _park(self, active: list[_Running], parked: list[_Running]) -> None:
        """Before their next model step, jobs more than `max_ahead_samples` ahead of what their client
        has taken leave the batch (their slot free for another job) until it catches up."""
        if self.max_ahead_samples is None:
            return
        now = clock()
        for running in [r for r in active if isinstance(r.pending, ModelCall)]:
            ticket = running.ticket
            ticket.resume_at = running.samples - self.max_ahead_samples
            # read after resume_at is set: a later take or cancel wakes us; an earlier cancel is seen here
            if ticket.taken >= ticket.resume_at or ticket.cancelled.is_set():
                ticket.resume_at = None
                continue
            self._park_one(running, active, parked, now, ticket.resume_at)
            log.debug("generation parked %.2f s of audio ahead of its client",
                      (running.samples - ticket.taken) / SAMPLE_RATE, extra={"request_id": ticket.request_id})

    @staticmethod
    def _park_one(running: _Running, active: list[_Running], parked: list[_Running], now: float,
                  resume_at: int) -> None:
        """Out of the batch until its client has taken `resume_at` samples (already: it waits for a slot)."""
        ticket = running.ticket
        ticket.resume_at = resume_at
        if ticket.taken >= resume_at and ticket.caught_up_at() is None:
            ticket.caught_up = (resume_at, now)
        running.parked_at = now
        running.taken_when_parked = ticket.taken
        active.remove(running)
        parked.append(running)

    def _resume(self, active: list[_Running], parked: list[_Running]) -> None:
        """Parked jobs whose client has caught up go back into free slots, before new jobs, the most
        urgent first. With no slot free, one takes the slot of the running job with the latest
        deadline if its own is earlier by more than SWAP_MARGIN (that job waits parked, with no
        stall clock, until a slot frees or its deadline is the earlier one): under a load that keeps
        every slot busy, a listener who caught up is not left silent until another stream ends."""
        now = clock()
        budget = self.first_audio_budget
        for running in sorted((r for r in parked if r.ticket.is_caught_up()), key=lambda r: self._resumed(r, now)):
            if len(active) >= self.max_active:
                swappable = [r for r in active if isinstance(r.pending, ModelCall)]
                latest = max(swappable, key=lambda r: r.deadline(budget), default=None)
                if latest is None or latest.deadline(budget) - self._resumed(running, now) <= SWAP_MARGIN:
                    break
                self._park_one(latest, active, parked, now, resume_at=latest.ticket.taken)
            self._resume_one(running, active, parked, now)

    def _resumed(self, running: _Running, now: float) -> float:
        """The deadline a parked job would have if it resumed now: it moves on by the time its client
        was behind beyond what playing the audio it had to take would have taken (a listener who
        paused), not by that playing time (a listener playing on in real time catches up in exactly
        that time, and its audio runs out when it always would), nor by the time it then waited for a
        slot (the listener waits for us: it keeps its place)."""
        ticket = running.ticket
        caught_up_at = min(at if (at := ticket.caught_up_at()) is not None else now, now)
        if running.first_audio_at is None:
            return running.deadline(self.first_audio_budget)
        playing = running.played(max((ticket.resume_at or 0) - running.taken_when_parked, 0))
        paused = max(caught_up_at - running.parked_at - playing, 0.0)
        return running.first_audio_at + paused + running.played(running.samples)

    def _resume_one(self, running: _Running, active: list[_Running], parked: list[_Running], now: float) -> None:
        """Back into the batch; the time it was parked moves its time limit on (a slow listener is no
        slow generation)."""
        ticket = running.ticket
        if running.first_audio_at is not None:
            running.first_audio_at = self._resumed(running, now) - running.played(running.samples)
        ticket.resume_at = None
        if ticket.deadline is not None:
            ticket.deadline += now - running.parked_at
        parked.remove(running)
        active.append(running)

    def _until_stalled(self, parked: list[_Running]) -> float | None:
        """Seconds until the first parked job's client has taken nothing for the send timeout (None: never;
        a client that caught up waits for a slot, not the other way round)."""
        behind = [r for r in parked if not r.ticket.is_caught_up()]
        if self.send_timeout is None or not behind:
            return None
        wait = min(r.idle_since() for r in behind) + self.send_timeout - clock()
        return min(max(wait, 0.0), threading.TIMEOUT_MAX)  # (a longer timeout overflows the queue's wait)

    def _drop_cancelled(self, active: list[_Running], parked: list[_Running]) -> None:
        """Stop jobs whose client left or whose time is up, before their next step, and parked jobs
        whose client left or took nothing for the send timeout (the audio queued for it dropped)."""
        now = clock()
        for jobs in (active, parked):
            for running in list(jobs):
                if (ending := self._ending(running, now, parked=jobs is parked)) is None:
                    continue
                level, why, last = ending
                log.log(level, "generation %s after %.2f s of audio%s", why, running.samples / SAMPLE_RATE,
                        " (parked)" if jobs is parked else "", extra={"request_id": running.ticket.request_id})
                if isinstance(last, ClientStalled):
                    _drop_queued(running.ticket)
                self._stop(jobs, running, last)

    def _ending(self, running: _Running, now: float, parked: bool) -> tuple[int, str, object] | None:
        """Why a job must stop now, if it must: (log level, what happened, what its client gets)."""
        ticket = running.ticket
        if ticket.cancelled.is_set():
            return logging.INFO, "cancelled", _DONE
        if not parked and ticket.deadline is not None and now > ticket.deadline:
            return (logging.WARNING, "stopped: over its time limit",
                    GenerationTimeout("generation took longer than the server's time limit"))
        if (parked and self.send_timeout is not None and not ticket.is_caught_up()
                and now - running.idle_since() > self.send_timeout):
            return (logging.WARNING, f"stopped: its client took no audio for {self.send_timeout:g} s",
                    ClientStalled(f"the client took no audio for {self.send_timeout:g} s"))
        return None

    def _step(self, active: list[_Running]) -> None:
        """The most urgent unit of work (see the module's docstring), then the silence checks."""
        unit = next_unit(active, self._group_of, self.first_audio_budget)
        if unit:
            compute = getattr(self.engine, COMPUTE[type(unit[0].pending)])
            if self.step_budget is None:
                self._run_together(active, unit, compute)
            else:
                self._run_adapting(active, unit, compute)
        self._check_silences(active)

    def _run_adapting(self, active: list[_Running], unit: list[_Running], compute: Callable[[list], list]) -> None:
        """Adaptive steps: move the step budget on the predicted load, then run the unit, measuring
        its cost (clock() seconds, into a moving average: a GPU's asynchronous steps are paid for in
        the units that wait on them, so the average is what a unit costs)."""
        now = clock()
        self.step_budget.update(predicted_load(active, now, self.unit_seconds, self._group_of,
                                               self.first_audio_budget), now)
        self._run_together(active, unit, compute)
        cost = clock() - now
        self.unit_seconds = cost if self.unit_seconds == 0 else \
            (1 - UNIT_COST_SMOOTHING) * self.unit_seconds + UNIT_COST_SMOOTHING * cost

    def _group_of(self, call: ModelCall) -> int:
        """The frames a step is run at: its own, or the bucket static shapes pad it to."""
        frames = call.x.shape[1]
        steps = self.engine.steps
        return steps.shapes.frames_for(frames) if isinstance(steps, StaticSteps) else frames

    def _check_silences(self, active: list[_Running]) -> None:
        """Silence checks (VAD reroll) run on a thread of their own: a job waits for its result while
        the others go on; with nothing else to do, the worker waits a moment for one."""
        waiting = [r for r in active if isinstance(r.pending, SilenceCheck)]
        if not waiting:
            return
        if self._checks is None:
            self._checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="echo-vad")
        for running in waiting:
            if running.check is None:
                running.check = self._checks.submit(running.pending.run)
        if not any(type(r.pending) in COMPUTE for r in active):
            wait([r.check for r in waiting], timeout=0.05, return_when=FIRST_COMPLETED)
        for running in waiting:
            if running.check.done():
                check, running.check = running.check, None
                try:
                    silence = check.result()
                except Exception as e:  # noqa: BLE001 - the request fails; the others carry on
                    log.exception("silence check failed", extra={"request_id": running.ticket.request_id})
                    self._stop(active, running, e)
                    continue
                self._continue(active, running, silence)

    def _run_together(self, active: list[_Running], members: list[_Running], compute: Callable[[list], list]) -> None:
        """Compute the pending calls of `members` in one go and hand each job its reply; if the
        shared computation fails, only the jobs that were part of it fail. Every unit is all or
        nothing (texts and steps change no job's state; decodes and prefix extensions put theirs
        back when they fail), so one that runs out of device memory is computed again in halves,
        down to one job: a batch too large for the memory left costs time, not its listeners' audio.
        The size that fitted then caps that kind's units (steps: of that frame group), run in parts of
        at most that many jobs, so lasting pressure costs no failed attempt a unit; the cap doubles
        after MEMORY_CAP_RELAX_UNITS parts that fit."""
        kind = type(members[0].pending)
        capped = (kind, self._group_of(members[0].pending)) if kind is ModelCall else kind  # (steps: by frame group)
        cap = self._memory_caps.get(capped)
        if cap is not None and len(members) > cap[0]:
            size = cap[0]  # (a part that fits may raise the cap meanwhile: the parts stay as cut)
            for start in range(0, len(members), size):
                self._run_together(active, members[start:start + size], compute)
            return
        out_of_memory = None
        try:
            replies = compute([r.pending for r in members])
        except Exception as e:  # noqa: BLE001
            if is_out_of_memory(e):
                out_of_memory = _without_frames(e)  # (they hold the failed attempt's tensors: let go before retrying)
            else:
                log.exception("%s for %d jobs failed", kind.__name__, len(members))
                for running in members:
                    self._stop(active, running, e)
                return
        if out_of_memory is not None:  # (outside the except clause, which would keep the failed attempt alive)
            if len(members) > 1:
                log.warning("out of device memory for %d jobs' %s together: computing them in halves (lower "
                            "ECHO_MAX_ACTIVE if this recurs)", len(members), kind.__name__)
                self.memory_splits += 1
                half = len(members) // 2
                self._memory_caps[capped] = [min(half, cap[0]) if cap else half, 0]
                for part in (members[:half], members[half:]):
                    self._run_together(active, part, compute)
                return
            log.error("out of device memory for one job's %s alone: it fails (lower ECHO_MAX_ACTIVE if this recurs): "
                      "%s", kind.__name__, out_of_memory, extra={"request_id": members[0].ticket.request_id})
            self.memory_failures += 1
            self._stop(active, members[0], out_of_memory)
            return
        if cap is not None:  # (a part within the cap fitted: after enough of them, try twice as many)
            cap[1] += 1
            if cap[1] >= MEMORY_CAP_RELAX_UNITS:
                if 2 * cap[0] >= self.max_active:
                    del self._memory_caps[capped]
                else:
                    self._memory_caps[capped] = [2 * cap[0], 0]
        for running, reply in zip(members, replies):
            if isinstance(running.pending, ModelCall):
                running.steps_left = max(running.steps_left - 1, 0)
            self._continue(active, running, reply)

    def _continue(self, active: list[_Running], running: _Running, reply) -> None:
        if not self._advance(running, reply):
            active.remove(running)
            self._release()

    def _advance(self, running: _Running, reply) -> bool:
        """Feed the reply in and run the job until it needs the model or a decode. False when it ended."""
        try:
            item = running.steps.send(reply) if running.started else next(running.steps)
            running.started = True
            while isinstance(item, np.ndarray):  # finished audio goes straight to the client
                running.deliver(item)
                item = running.steps.send(None)
        except StopIteration:
            running.finish(self._debug_sink)
            return False
        except Exception as e:  # noqa: BLE001 - the request fails; the others carry on
            if is_out_of_memory(e):
                self.memory_failures += 1
            log.exception("generation failed", extra={"request_id": running.ticket.request_id})
            running.send(e)
            return False
        running.pending = item
        return True

    def _stop(self, jobs: list[_Running], running: _Running, last: Exception | object) -> None:
        """End a job before its next step: its step generator closed (its tensors freed), `last`
        (an error or _DONE) to its client, its slot free; a silence check not started yet is dropped
        (the one thread of checks serves the jobs that go on)."""
        if running.check is not None:
            running.check.cancel()
        try:
            running.steps.close()
        except Exception:  # noqa: BLE001 - (a generator that fails to close is ended all the same)
            log.exception("closing a generation failed", extra={"request_id": running.ticket.request_id})
        running.send(last)
        jobs.remove(running)
        self._release()

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def _prepared(self) -> None:
        with self._lock:
            self._preparing -= 1


def next_unit(active: list[_Running], group_of: Callable[[ModelCall], int], first_audio_budget: float) -> list[_Running]:
    """The unit of work to run next: of the jobs waiting on the model, those whose step has the
    same frame group; the jobs waiting on a decode, on the text encoder or on a prefix extension;
    whichever unit holds the earliest deadline (ties: the larger unit, which serves more
    listeners). Empty when no job waits on any."""
    units: dict[object, list[_Running]] = {}
    for running in active:
        kind = type(running.pending)
        if kind in COMPUTE:  # a unit per kind of call; diffusion steps one per frame group
            units.setdefault((kind, group_of(running.pending)) if kind is ModelCall else kind, []).append(running)
    if not units:
        return []
    return min(units.values(), key=lambda jobs: (min(r.deadline(first_audio_budget) for r in jobs), -len(jobs)))


def predicted_load(active: list[_Running], now: float, unit_seconds: float, group_of: Callable[[ModelCall], int],
                   first_audio_budget: float) -> float:
    """How close the schedule runs to an underrun: the most, over the jobs, that the work before a
    job's next audio takes of the time until its deadline (above 1: an underrun is predicted;
    infinite for a job already late; 0 with nothing active). Units run earliest deadline first, so
    the work before job k's next audio is that of the jobs at least as urgent: per frame group, the
    most diffusion steps any of them has left in its block (a group's steps run batched: one unit
    advances them all), plus one unit for the decode; each unit at `unit_seconds`."""
    load, steps_left = 0.0, {}  # frame group -> the most steps left among the jobs so far
    for deadline, running in sorted(((r.deadline(first_audio_budget), r) for r in active), key=lambda d: d[0]):
        if isinstance(running.pending, ModelCall):
            group = group_of(running.pending)
            steps_left[group] = max(steps_left.get(group, 0), running.steps_left)
        seconds = deadline - now  # what its listener has left
        work = (sum(steps_left.values()) + 1) * unit_seconds
        load = max(load, work / seconds if seconds > 0 else math.inf)
    return load


# what PyTorch raises as a RuntimeError (AcceleratorError among them) when memory runs out outside its caching
# allocator: cuBLAS, cuDNN, the CUDA runtime (instantiating a graph, loading a kernel), the host
OUT_OF_MEMORY_MESSAGES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA error: out of memory",
                          "CUDA_ERROR_OUT_OF_MEMORY", "DefaultCPUAllocator: can't allocate",
                          # a compiled part's kernels (Triton loads them through the driver), and torch's driver calls
                          "Triton Error [CUDA]: out of memory", "CUDA driver error: out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether the error, or one it was raised from (a compiler's error wrapping it), says a device (or
    the host) ran out of memory."""
    return any(isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(message in str(e) for message in OUT_OF_MEMORY_MESSAGES))
        for e in _chain(error, shown=True))


def _without_frames(error: BaseException) -> BaseException:
    """The error with its traceback and those of the errors it chains dropped (their frames' locals freed)."""
    for chained in _chain(error):
        chained.__traceback__ = None
    return error


def _chain(error: BaseException | None, shown: bool = False) -> Iterator[BaseException]:
    """The error and those it chains: its __cause__, else its __context__ (with `shown`, only as a
    traceback shows them: not a context that "raise ... from None" suppressed), each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        if error.__cause__ is not None:
            error = error.__cause__
        else:
            error = None if shown and error.__suppress_context__ else error.__context__


def _notify(ticket: _Ticket, item) -> None:
    """Hand a block, the end (_DONE) or an error to the ticket's JobStream on its event loop."""
    try:
        ticket.loop.call_soon_threadsafe(ticket.output.put_nowait, item)
    except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
        ticket.cancelled.set()


def _drop_queued(ticket: _Ticket) -> None:
    """Let go of the audio queued for the ticket's JobStream and not taken (on its event loop)."""

    def drop() -> None:
        while not ticket.output.empty():
            ticket.output.get_nowait()

    try:
        ticket.loop.call_soon_threadsafe(drop)
    except RuntimeError:  # the event loop is gone: so is the queue's last user
        pass


class _Running:
    """A job on the worker thread: its step generator and what it is waiting for."""

    def __init__(self, ticket: _Ticket, steps: JobSteps, keep_audio: bool):
        self.ticket = ticket
        self.steps = steps
        self.started = False
        self.pending: TextCall | ModelCall | PrefixCall | DecodeCall | SilenceCheck | None = None
        self.check: Future | None = None  # the pending SilenceCheck's result, once submitted
        self.steps_left = 0  # with adaptive steps: diffusion steps left in the block it samples (0 between blocks)
        self.samples = 0  # delivered to the client
        self.started_at = time.perf_counter()
        self.parked_at = 0.0  # clock() when it last left the batch for its client
        self.taken_when_parked = 0  # what its client had taken then
        self.arrived = ticket.arrived  # clock() of its submission
        self.first_audio_at: float | None = None  # clock() of its first audio
        self.kept: list[np.ndarray] | None = [] if keep_audio else None

    def deadline(self, first_audio_budget: float) -> float:
        """When its listener would notice it is late (clock()): before its first audio, its
        arrival plus the budget; after, the moment the audio it delivered runs out."""
        if self.first_audio_at is None:
            return self.arrived + first_audio_budget
        return self.first_audio_at + self.played(self.samples)

    def played(self, samples: int) -> float:
        """Seconds its listener takes to play `samples` of its audio (at the response's speed)."""
        return samples / SAMPLE_RATE / self.ticket.speed

    def idle_since(self) -> float:
        """Since when a parked job's client has taken nothing (clock())."""
        return max(self.parked_at, self.ticket.taken_at)

    def send(self, item) -> None:
        _notify(self.ticket, item)

    def deliver(self, audio: np.ndarray) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = clock()
        self.samples += audio.size
        if self.kept is not None:
            self.kept.append(audio)
        self.send(audio)

    def finish(self, debug_sink: Callable[[np.ndarray], None] | None) -> None:
        log.debug("generated %.2f s of audio in %.2f s", self.samples / SAMPLE_RATE, time.perf_counter() - self.started_at,
                  extra={"request_id": self.ticket.request_id})
        if debug_sink is not None and self.kept:
            try:  # before the response ends, so it is there when it has; failing it fails nothing else
                debug_sink(np.concatenate(self.kept))
            except Exception:  # noqa: BLE001 - a debugging aid: the listener has its audio
                log.exception("saving the generated audio for debugging failed",
                              extra={"request_id": self.ticket.request_id})
        self.send(_DONE)
