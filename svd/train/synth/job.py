"""One synthetic-image job: plan the images, load the pipeline, generate on the idle lane, write, release.

A job of N images draws, for each, a label (roadwork_share), a task
(text-to-image or image-to-image, i2i_share), a source photo of that label
from the [[train.sources]] (its caption seeds the prompt; image-to-image
starts from its pixels) and a seed. With no source photos every image is
text-to-image from a template scene.

The pipeline loads in a thread beside serving (reading weights is slow, and
the engine worker must not wait for it), then each image runs on the
worker's idle lane one denoising step per slice (diffusion.Stepper). The PNG
is encoded and written in a writer thread, off the worker. Whatever ends the
job (done, a failure, a GPU out of memory, a cancel, shutdown) releases the
pipeline: the serving engine keeps its memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import io
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from PIL import Image

from svd.config import Config, SynthConfig
from svd.engine.worker import BackgroundJob, EngineWorker, Progress
from svd.train.sources import Record, SourceError, configured_sources, read_records, scan_source
from svd.train.synth import diffusion, prompts
from svd.train.synth.store import SynthStore

log = structlog.get_logger(__name__)

# The idle lane's order (EngineWorker.background): training's jobs have 0.
SYNTH_PRIORITY = -1
T2I = "t2i"
I2I = "i2i"
# The validators' negative prompts (natix/validator/config.py): text-to-image's also names blur.
NEGATIVE_I2I = (
    "cartoon, anime, painting, drawing, artistic, stylized, illustration, sketch, unrealistic, fake, artificial, "
    "3d render, cgi, video game, fantasy, sci-fi, aerial view, bird's eye view, satellite view, drone footage, "
    "helicopter view, top-down view, security camera, cctv, surveillance camera, indoor scene, interior, portrait, "
    "face, person close-up, selfie, vibrant colors, oversaturated, neon, glowing, night vision, thermal imaging, "
    "fisheye lens, wide angle distortion"
)
NEGATIVE_T2I = (
    NEGATIVE_I2I + ", motion blur, blurry, out of focus, unfocused, soft focus, speed blur, camera shake, movement blur"
)


@dataclass(frozen=True)
class Planned:
    """One image to make."""

    label: int
    task: str
    seed: int
    prompt: prompts.Prompt
    source: Record | None  # the photo whose caption (and, i2i, pixels) it starts from


@dataclass
class SynthState:
    """A job's progress and outcome (svd status, svd synth status, metrics)."""

    job_id: str
    trigger: str
    count: int
    stage: str = "planned"
    done: int = 0
    failed: int = 0
    duplicates: int = 0
    step: int = 0
    steps: int = 0
    result: str | None = None  # done | failed | cancelled | refused
    reason: str = ""
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    finished: str | None = None
    seconds_per_image: float | None = None
    by_task: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "by_task": dict(self.by_task)}


def source_photos(cfg: Config) -> list[Record]:
    """The photos of the [[train.sources]] that are not synthetic; a source that does not scan is skipped."""
    records: list[Record] = []
    for spec in configured_sources(cfg):
        if spec.synthetic:
            continue
        try:
            records.extend(scan_source(spec).records)
        except SourceError as exc:
            log.warning("synth_source_skipped", source=spec.name, reason=str(exc))
    return records


def plan(
    count: int,
    sc: SynthConfig,
    photos: Sequence[Record],
    rng: random.Random,
    count_tokens: prompts.TokenCount = prompts.approximate_tokens,
    max_tokens: int = prompts.MAX_TOKENS,
) -> list[Planned]:
    """What `count` images will be: label, task, source, seed, prompt."""
    by_label = {label: [r for r in photos if r.label == label] for label in (0, 1)}
    out = []
    for _ in range(count):
        label = 1 if rng.random() < sc.roadwork_share else 0
        pool = by_label[label]
        source = rng.choice(pool) if pool else None
        task = I2I if source is not None and rng.random() < sc.i2i_share else T2I
        prompt = prompts.make_prompt(label, rng, source.caption if source else None, count_tokens, max_tokens)
        out.append(Planned(label, task, rng.randrange(1, 2**63), prompt, source))
    return out


def source_image(data: bytes, size: int) -> Image.Image:
    """An image-to-image start as validators prepare it: RGB, squashed to size x size when a side exceeds it."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    if rgb.width > size or rgb.height > size:
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return rgb


def start_image(item: Planned, size: int) -> Image.Image | None:
    """The image an image-to-image item starts from (read and squashed in a thread, ahead of its turn);
    None for text-to-image, and for a photo that cannot be read (that item is made text-to-image)."""
    if item.task != I2I or item.source is None:
        return None
    try:
        return source_image(read_records([item.source])[0], size)
    except (SourceError, OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("synth_source_unreadable", source=item.source.source, sha256=item.source.sha256, error=str(exc))
        return None


def generate_call(
    pipes: diffusion.Pipelines, item: Planned, start: Image.Image | None, sc: SynthConfig
) -> Callable[..., Any]:
    """The pipeline call for one image, taking the Stepper's step_end; returns a PIL image."""
    import torch

    def call(step_end: Callable[..., Any]) -> Image.Image:
        common: dict[str, Any] = {
            "prompt": item.prompt.text,
            "num_inference_steps": sc.steps,
            "guidance_scale": sc.guidance,
            "generator": torch.Generator("cpu").manual_seed(item.seed),
            "callback_on_step_end": step_end,
        }
        if start is None:
            out = pipes.t2i(negative_prompt=NEGATIVE_T2I, height=sc.size, width=sc.size, **common)
        else:
            out = pipes.i2i(negative_prompt=NEGATIVE_I2I, image=start, strength=sc.strength, **common)
        image: Image.Image = out.images[0]
        return image

    return call


def metadata(item: Planned, pipes: diffusion.Pipelines, sc: SynthConfig, size: tuple[int, int]) -> dict[str, Any]:
    return {
        "task": item.task,
        "prompt": item.prompt.text,
        "element": item.prompt.element,
        "scene_from": item.prompt.scene_from,
        "negative_prompt": "validators_" + item.task,
        "seed": item.seed,
        "model": pipes.model,
        "dtype": pipes.dtype,
        "steps": sc.steps,
        "guidance": sc.guidance,
        "strength": sc.strength if item.task == I2I else None,
        "size": list(size),
        "source": {"source": item.source.source, "sha256": item.source.sha256} if item.source else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # validators save theirs as PNG
    return buf.getvalue()


def image_slices(
    pipes: diffusion.Pipelines,
    items: Sequence[Planned],
    sc: SynthConfig,
    prepare: Callable[[Planned], concurrent.futures.Future[Image.Image | None]],
    on_image: Callable[[Planned, Image.Image], None],
    state: SynthState,
) -> Generator[Progress, None, int]:
    """The idle-lane job: each slice one denoising step of one image (the Stepper's turn). The next
    image's start is prepared by `prepare` (a thread) meanwhile; each finished image goes to on_image,
    which must not block (it queues the write). Returns the images made."""
    made = 0
    upcoming = prepare(items[0]) if items else None
    for i, item in enumerate(items):
        assert upcoming is not None
        start = upcoming.result()  # read before the job (the first) or during the last image's steps
        upcoming = prepare(items[i + 1]) if i + 1 < len(items) else None
        if item.task == I2I and start is None:  # its photo could not be read
            item = dataclasses.replace(item, task=T2I, source=None)
        state.stage = f"image {i + 1}/{len(items)} ({item.task})"
        state.step, state.steps = 0, _steps_of(item, sc)
        started = time.perf_counter()
        stepper = diffusion.Stepper(generate_call(pipes, item, start, sc), pipes.device)
        try:
            while not stepper.step():
                state.step = stepper.steps
                yield Progress(i, len(items), state.stage)
        finally:
            stepper.stop()  # a cancel between two steps ends the call in its thread
        if stepper.error is not None:
            raise stepper.error
        on_image(item, stepper.result)
        made += 1
        state.by_task[item.task] += 1
        elapsed = time.perf_counter() - started
        state.seconds_per_image = round(
            elapsed if state.seconds_per_image is None else 0.8 * state.seconds_per_image + 0.2 * elapsed, 3
        )
        yield Progress(i + 1, len(items), state.stage)
    return made


def _steps_of(item: Planned, sc: SynthConfig) -> int:
    # Image-to-image runs the last `strength` of the schedule (diffusers' get_timesteps).
    return max(1, int(sc.steps * sc.strength)) if item.task == I2I else sc.steps


class SynthJob:
    """One job in the daemon (or standalone): plan, load, generate on the worker, write, release.

    Args:
        cfg: the config ([synth], [train] sources, paths).
        worker: the engine worker whose idle lane generates.
        count: images to make.
        trigger: "schedule", "command" or "standalone" (the report says).
        force: generate on a CPU even though [synth] allow_cpu is off.
        may_delete: whether old images may go now to keep the disk budget (not while a training run
            reads the folder; see store.py).
    """

    def __init__(
        self,
        cfg: Config,
        worker: EngineWorker,
        count: int,
        trigger: str,
        force: bool = False,
        may_delete: Callable[[], bool] = lambda: True,
    ) -> None:
        self.cfg = cfg
        self.sc = cfg.synth
        self.worker = worker
        self.force = force
        self.may_delete = may_delete
        self.state = SynthState(datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"), trigger, count)
        self.background: BackgroundJob[int] | None = None
        self.store: SynthStore | None = None
        self._held = False
        self._stopped = False

    def hold(self, held: bool) -> None:
        """Pause or resume between two slices (the pipeline stays loaded while paused)."""
        self._held = held
        if self.background is not None:
            self.worker.hold_background(self.background, held)

    def stop(self) -> None:
        """Ends the job at the next slice (svd synth stop); the images written so far stay."""
        self._stopped = True
        if self.background is not None:
            self.background.cancel()

    async def run(self) -> SynthState:
        """Runs the job to its end; never raises (the state says how it ended) but CancelledError when
        the task running it is cancelled (shutdown)."""
        state = self.state
        pipes: diffusion.Pipelines | None = None
        # One thread reads the next image-to-image start, one encodes and writes PNGs: never the worker.
        reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="svd-synth-read")
        writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="svd-synth-write")
        writes: list[concurrent.futures.Future[None]] = []
        try:
            device = diffusion.pick_device(self.sc, self.force)
            state.stage = "planning"
            budget = self.sc.disk_budget_mb * 1_000_000
            self.store = store = await asyncio.to_thread(SynthStore, self.cfg.synth_dir, budget)
            # Room for this job's images now (nothing is deleted while it writes), but never more than
            # half the budget: a job larger than the folder must not wipe what earlier ones made.
            room = state.count * store.mean_image_bytes(default=2 * self.sc.size**2)
            await self._keep_budget(min(room, budget // 2))
            photos = await asyncio.to_thread(source_photos, self.cfg)
            state.stage = "loading the pipeline"
            pipes = await _load_in_daemon_thread(self.sc, device, self.cfg.synth_model)
            loaded = pipes
            count_tokens, limit = prompts.tokenizer_count(pipes.tokenizers())
            seed = self.sc.seed or secrets.randbits(63)
            rng = random.Random(seed)
            items = await asyncio.to_thread(plan, state.count, self.sc, photos, rng, count_tokens, limit)
            log.info("synth_started", job=state.job_id, images=len(items), photos=len(photos), device=device)

            reads: dict[int, concurrent.futures.Future[Image.Image | None]] = {}

            def prepare(item: Planned) -> concurrent.futures.Future[Image.Image | None]:
                if id(item) not in reads:
                    reads[id(item)] = reader.submit(start_image, item, self.sc.size)
                return reads.pop(id(item))

            if items:  # the first start is read here, not in the first slice on the engine thread
                reads[id(items[0])] = reader.submit(start_image, items[0], self.sc.size)
                await asyncio.wrap_future(reads[id(items[0])])

            def on_image(item: Planned, image: Image.Image) -> None:
                writes.append(writer.submit(self._write, store, item, image, loaded))

            if self._stopped:
                raise asyncio.CancelledError
            slices = image_slices(pipes, items, self.sc, prepare, on_image, state)
            # Below training's priority: a run that starts (03:00, svd train now) overtakes this job.
            self.background = self.worker.background(f"synth {state.job_id}", slices, priority=SYNTH_PRIORITY)
            if self._held:
                self.worker.hold_background(self.background, True)
            await self.background.wait()
            state.stage = "writing"
            await asyncio.gather(*(asyncio.wrap_future(w) for w in writes))
            self._end("done", f"{state.done} images written")
        except diffusion.SynthUnavailable as exc:
            self._end("refused", str(exc))
        except asyncio.CancelledError:
            stopped = self._stopped and _not_cancelling()
            self._end("cancelled", "stopped (svd synth stop)" if stopped else "cancelled (shutdown)")
            if not stopped:
                raise
        except Exception as exc:  # a failed slice (an OOM too), a source that broke: the job ends, serving not
            self._end("failed", f"{type(exc).__name__}: {exc}")
        finally:
            if self.background is not None and not self.background.done:
                self.background.cancel()
            # Each step on its own: one failing (a full disk) must not keep the pipeline loaded.
            await _logged(asyncio.to_thread(reader.shutdown, True, cancel_futures=True), "reader")
            await _logged(asyncio.to_thread(writer.shutdown, True), "writer")
            if self.store is not None:
                await _logged(self._keep_budget(0), "disk budget")
            # Off the loop: dropping SDXL's modules and the CUDA cache can take a moment.
            await _logged(asyncio.to_thread(diffusion.release, pipes), "release")
            pipes = None
        return state

    async def _keep_budget(self, room: int) -> None:
        assert self.store is not None
        if not self.may_delete():
            log.info("synth_budget_later", reason="a training run reads the folder", mb=self.store.size_bytes // 10**6)
            return
        removed = await asyncio.to_thread(self.store.keep_budget, room)
        if removed:
            log.info("synth_pruned", removed=removed, mb=self.store.size_bytes // 10**6)

    def _write(self, store: SynthStore, item: Planned, image: Image.Image, pipes: diffusion.Pipelines) -> None:
        try:
            path = store.add(png_bytes(image), item.label, metadata(item, pipes, self.sc, image.size))
        except OSError as exc:
            self.state.failed += 1
            log.warning("synth_write_failed", error=str(exc))
            return
        if path is None:
            self.state.duplicates += 1
        else:
            self.state.done += 1

    def _end(self, result: str, reason: str) -> None:
        state = self.state
        state.result, state.reason = result, reason
        state.stage = result
        state.finished = datetime.now(UTC).isoformat(timespec="seconds")
        event = log.info if result == "done" else log.warning
        event("synth_finished", job=state.job_id, result=result, reason=reason, images=state.done)

    def status(self) -> dict[str, Any]:
        out = self.state.summary()
        out["paused"] = self._held
        if self.background is not None:
            out["slices"] = self.background.slices
            out["slice_ms_max"] = round(self.background.slice_s_max * 1000, 2)
        if self.store is not None:
            out["folder"] = self.store.summary()
        return out


def _not_cancelling() -> bool:
    """Whether the running task itself is not being cancelled (the CancelledError came from the job)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() == 0


async def _logged(step: Any, what: str) -> None:
    """Awaits one clean-up step of a job; its failure is logged, not raised (the next steps still run)."""
    try:
        await step
    except Exception as exc:
        log.error("synth_cleanup_failed", step=what, error=f"{type(exc).__name__}: {exc}")


async def _load_in_daemon_thread(sc: SynthConfig, device: str, model: str) -> diffusion.Pipelines:
    """load_pipelines in a daemon thread: a load takes up to minutes and cannot be interrupted, and the
    loop's own executor would hold the process's exit (shutdown) until it ends. A load whose awaiter
    was cancelled meanwhile is released as soon as it is done."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[diffusion.Pipelines] = loop.create_future()

    def settle(result: diffusion.Pipelines | None, error: BaseException | None) -> None:
        if done.cancelled():  # off the loop: a GC pass and the CUDA cache
            threading.Thread(target=diffusion.release, args=(result,), daemon=True).start()
        elif error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def load() -> None:
        result, error = None, None
        try:
            result = diffusion.load_pipelines(sc, device, model)
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed (the process is exiting)
            diffusion.release(result)

    threading.Thread(target=load, name="svd-synth-load", daemon=True).start()
    return await done
