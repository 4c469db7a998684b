"""Configuration: frozen dataclasses, loaded and validated in one place.

The dataclass defaults *are* the embedded default configuration: `svd run`
with no config file serves offline on CPU. `config.toml` at the repository
root is the same defaults, commented, for operators to edit.

Longer than the ~400 lines the style asks for, on purpose: every key, its
default and its check live here and nowhere else (style point 12), so a
reader finds any setting in one file.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bittensor_wallet import Keypair

# //Alice, the well-known development key. `svd bench` signs with it, so the
# offline default lets a fresh checkout benchmark itself. Never trust it online.
DEV_HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
SS58_LEN = 48
# The config file every command uses when given no --config, if it is there.
DEFAULT_CONFIG = Path("config.toml")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


class ConfigError(Exception):
    """A config value is wrong; the message names the key and the expected form."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8091
    # The base64 JSON body of the largest image decode takes (decode.max_image_bytes * 4/3, and the JSON).
    max_body_bytes: int = 22_000_000
    # Body bytes all requests in flight hold together; beyond it a new request gets 503 before it is read.
    max_inflight_body_bytes: int = 128_000_000
    max_header_bytes: int = 16_384
    # A request's line and headers must arrive within this of the connection opening (or of the next
    # request's first byte); an idle kept-alive connection closes after keepalive_s (docs/request-path.md).
    header_timeout_s: float = 10.0
    keepalive_s: float = 30.0
    # Open connections in all, and from one address; reserved_connections of max_connections are kept
    # for addresses that made a validly signed request in the last trust_s seconds.
    max_connections: int = 1024
    max_connections_per_address: int = 64
    reserved_connections: int = 128
    trust_s: float = 7200.0
    # Bittensor dendrites send `timeout` (9 s for NATIX); it is unsigned, so cap it.
    timeout_cap_s: float = 12.0
    default_timeout_s: float = 9.0
    # Answer this long before the caller gives up, to leave time for the trip back.
    response_margin_s: float = 0.25
    # Returned in ExtendedImageSynapse answers: the miner's published model (hub URL).
    model_url: str = ""

    def validate(self) -> None:
        _check(0 <= self.port <= 65535, "server.port", "an integer 0..65535", self.port)
        _check(self.max_body_bytes >= 1024, "server.max_body_bytes", "an integer >= 1024", self.max_body_bytes)
        _check(
            self.max_inflight_body_bytes >= self.max_body_bytes,
            "server.max_inflight_body_bytes",
            "an integer >= server.max_body_bytes",
            self.max_inflight_body_bytes,
        )
        _check(self.max_header_bytes >= 1024, "server.max_header_bytes", "an integer >= 1024", self.max_header_bytes)
        timeout = self.header_timeout_s
        _check(0 < timeout <= 300, "server.header_timeout_s", "a number in (0, 300]", timeout)
        _check(
            self.keepalive_s > 15,
            "server.keepalive_s",
            "a number > 15 (aiohttp clients drop idle connections after 15 s: they must close first)",
            self.keepalive_s,
        )
        _check(self.max_connections >= 2, "server.max_connections", "an integer >= 2", self.max_connections)
        _check(
            1 <= self.max_connections_per_address <= self.max_connections,
            "server.max_connections_per_address",
            "an integer 1..server.max_connections",
            self.max_connections_per_address,
        )
        _check(
            0 <= self.reserved_connections < self.max_connections,
            "server.reserved_connections",
            "an integer >= 0 and < server.max_connections",
            self.reserved_connections,
        )
        _check(self.trust_s > 0, "server.trust_s", "a number > 0", self.trust_s)
        _check(self.timeout_cap_s > 0, "server.timeout_cap_s", "a number > 0", self.timeout_cap_s)
        _check(
            0 < self.default_timeout_s <= self.timeout_cap_s,
            "server.default_timeout_s",
            "a number > 0 and <= server.timeout_cap_s",
            self.default_timeout_s,
        )
        _check(
            0 <= self.response_margin_s < self.default_timeout_s,
            "server.response_margin_s",
            "a number >= 0 and < server.default_timeout_s",
            self.response_margin_s,
        )


@dataclass(frozen=True)
class AllowedCaller:
    hotkey: str
    stake: float = 0.0
    # Queries per second for this caller; -1: auth.rate_per_s, 0: no limit.
    rate_per_s: float = -1.0


@dataclass(frozen=True)
class AuthConfig:
    # offline: the allowlist below stands in for the chain; online: the subnet's metagraph.
    mode: str = "offline"
    require_registered: bool = True
    require_validator_permit: bool = True
    min_stake: float = 0.0
    # Per-hotkey token bucket, charged after the signature verified; 0 disables.
    rate_per_s: float = 5.0
    rate_burst: float = 20.0
    # A nonce older than this (or further in the future than nonce_future_s)
    # is refused, whatever the unsigned `timeout` header says.
    nonce_max_age_s: float = 16.0
    nonce_future_s: float = 4.0
    allowlist: tuple[AllowedCaller, ...] = (AllowedCaller(hotkey=DEV_HOTKEY, stake=1.0, rate_per_s=0.0),)

    def validate(self) -> None:
        _check(self.mode in ("offline", "online"), "auth.mode", '"offline" or "online"', self.mode)
        _check(self.min_stake >= 0, "auth.min_stake", "a number >= 0", self.min_stake)
        _check(self.rate_per_s >= 0, "auth.rate_per_s", "a number >= 0 (0: no limit)", self.rate_per_s)
        _check(self.rate_burst >= 1, "auth.rate_burst", "a number >= 1", self.rate_burst)
        _check(0 < self.nonce_max_age_s <= 120, "auth.nonce_max_age_s", "a number in (0, 120]", self.nonce_max_age_s)
        _check(0 <= self.nonce_future_s <= 60, "auth.nonce_future_s", "a number in [0, 60]", self.nonce_future_s)
        for i, caller in enumerate(self.allowlist):
            key = f"auth.allowlist[{i}]"
            _check(_looks_ss58(caller.hotkey), f"{key}.hotkey", "an ss58 address (48 characters)", caller.hotkey)
            _check(caller.stake >= 0, f"{key}.stake", "a number >= 0", caller.stake)
            _check(
                caller.rate_per_s >= -1,
                f"{key}.rate_per_s",
                "-1 (auth.rate_per_s), 0 (no limit) or more",
                caller.rate_per_s,
            )


@dataclass(frozen=True)
class ChainConfig:
    # finney (mainnet), test, local, or a ws:// / wss:// endpoint.
    network: str = "finney"
    netuid: int = 72
    sync_interval_s: float = 300.0
    timeout_s: float = 60.0
    # Published with ServeAxon when the chain holds another address; empty ip: never publish.
    advertise_ip: str = ""
    advertise_port: int = 0  # 0: server.port

    def validate(self) -> None:
        _check(
            self.network in ("finney", "test", "local") or self.network.startswith(("ws://", "wss://")),
            "chain.network",
            "finney, test, local, or a ws:// or wss:// URL",
            self.network,
        )
        _check(0 <= self.netuid <= 65535, "chain.netuid", "an integer 0..65535", self.netuid)
        _check(self.sync_interval_s >= 12, "chain.sync_interval_s", "a number >= 12 (one block)", self.sync_interval_s)
        _check(self.timeout_s > 0, "chain.timeout_s", "a number > 0", self.timeout_s)
        _check(_is_ip(self.advertise_ip), "chain.advertise_ip", "an IPv4 or IPv6 address, or empty", self.advertise_ip)
        _check(0 <= self.advertise_port <= 65535, "chain.advertise_port", "an integer 0..65535", self.advertise_port)


@dataclass(frozen=True)
class WalletConfig:
    name: str = "default"
    hotkey: str = "default"
    path: str = "~/.bittensor/wallets"

    def validate(self) -> None:
        _check(bool(self.name), "wallet.name", "a non-empty wallet name", self.name)
        _check(bool(self.hotkey), "wallet.hotkey", "a non-empty hotkey name", self.hotkey)


# The choices of [engine] backend (after "auto", best first: the order "auto" tries them)
# and onnx_spin; the engine wing takes them from here.
ENGINE_BACKENDS = ("auto", "tensorrt", "onnx", "torch")
ONNX_SPINS = ("off", "while_running", "always")


@dataclass(frozen=True)
class EngineConfig:
    dir: str = "engines"
    # Serve this engine by name; empty serves the newest one in `dir`.
    name: str = ""
    backend: str = "auto"
    threads: int = 0
    # ONNX Runtime's idle threads: "while_running" spins during a batch and parks between
    # batches (docs/benchmarks.md); "off" never spins; "always" is ORT's default.
    onnx_spin: str = "while_running"
    build_demo_if_empty: bool = True
    warmup_batch_sizes: tuple[int, ...] = (1, 16)
    # Hot swap: serve a newer engine renamed into `dir` (see docs/engine-format.md).
    watch: bool = True
    watch_debounce_ms: int = 500
    # Engine directories kept on disk for `svd rollback` after a swap (newest first; the
    # serving one is never removed); 0 keeps them all.
    keep: int = 5

    def validate(self) -> None:
        _check(self.backend in ENGINE_BACKENDS, "engine.backend", f"one of {', '.join(ENGINE_BACKENDS)}", self.backend)
        _check(0 <= self.threads <= 256, "engine.threads", "an integer 0..256 (0: runtime default)", self.threads)
        _check(self.onnx_spin in ONNX_SPINS, "engine.onnx_spin", f"one of {', '.join(ONNX_SPINS)}", self.onnx_spin)
        _check(
            bool(self.warmup_batch_sizes) and all(1 <= b <= 1024 for b in self.warmup_batch_sizes),
            "engine.warmup_batch_sizes",
            "a non-empty list of integers 1..1024",
            self.warmup_batch_sizes,
        )
        _check(
            10 <= self.watch_debounce_ms <= 60_000,
            "engine.watch_debounce_ms",
            "an integer 10..60000",
            self.watch_debounce_ms,
        )
        _check(0 <= self.keep <= 1000, "engine.keep", "an integer 0..1000 (0: keep all)", self.keep)


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int = 16
    max_queue: int = 256
    # Wait this long for a fuller batch when the worker is idle; 0 sends at once.
    max_wait_ms: float = 0.0
    # A single engine call longer than this marks the engine wedged.
    step_timeout_s: float = 10.0
    # A request is admitted only if its predicted wait, times (1 + admit_margin), ends before its
    # deadline; otherwise a fast 503 (docs/request-path.md, "Admission").
    admit_margin: float = 0.5

    def validate(self) -> None:
        _check(1 <= self.max_batch <= 1024, "batcher.max_batch", "an integer 1..1024", self.max_batch)
        _check(self.max_queue >= self.max_batch, "batcher.max_queue", "an integer >= batcher.max_batch", self.max_queue)
        _check(0 <= self.max_wait_ms <= 1000, "batcher.max_wait_ms", "a number 0..1000", self.max_wait_ms)
        _check(self.step_timeout_s > 0, "batcher.step_timeout_s", "a number > 0", self.step_timeout_s)
        _check(0 <= self.admit_margin <= 4, "batcher.admit_margin", "a number 0..4", self.admit_margin)


@dataclass(frozen=True)
class DecodeConfig:
    threads: int = 2
    # Today's validators send native-size images: 24 MP photos pass, 30 MP do not (config.toml says why).
    max_image_bytes: int = 16_000_000
    max_pixels: int = 25_000_000
    formats: tuple[str, ...] = IMAGE_FORMATS

    def validate(self) -> None:
        _check(1 <= self.threads <= 64, "decode.threads", "an integer 1..64", self.threads)
        _check(self.max_image_bytes >= 1024, "decode.max_image_bytes", "an integer >= 1024", self.max_image_bytes)
        _check(self.max_pixels >= 224 * 224, "decode.max_pixels", "an integer >= 50176 (224*224)", self.max_pixels)
        _check(
            bool(self.formats) and all(f in IMAGE_FORMATS for f in self.formats),
            "decode.formats",
            f"a non-empty list drawn from {list(IMAGE_FORMATS)}",
            self.formats,
        )


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: str = "state"
    shutdown_grace_s: float = 10.0
    log_level: str = "info"
    # auto: JSON lines when stdout is not a terminal (journald), console otherwise.
    log_format: str = "auto"
    # `svd doctor` and `svd status` warn when no validator query came for this many hours.
    no_query_warn_h: float = 6.0
    # The daemon's RSS budget (svd.serve.memory); above it, strangers' new connections are refused.
    # 0: half of this machine's memory.
    memory_budget_mb: int = 0

    def validate(self) -> None:
        _check(0 <= self.shutdown_grace_s <= 600, "daemon.shutdown_grace_s", "a number 0..600", self.shutdown_grace_s)
        _check(self.memory_budget_mb >= 0, "daemon.memory_budget_mb", "an integer >= 0 (0: half the RAM)",
               self.memory_budget_mb)  # fmt: skip
        _check(self.no_query_warn_h > 0, "daemon.no_query_warn_h", "a number of hours > 0", self.no_query_warn_h)
        levels = ("debug", "info", "warning", "error")
        _check(self.log_level in levels, "daemon.log_level", f"one of {', '.join(levels)}", self.log_level)
        formats = ("auto", "json", "console")
        _check(self.log_format in formats, "daemon.log_format", f"one of {', '.join(formats)}", self.log_format)


@dataclass(frozen=True)
class SamplesConfig:
    """The uncertain-sample log (docs/samples.md): what is kept, how it is written, how much stays."""

    enabled: bool = True
    # Empty: samples.db in daemon.state_dir. A relative path resolves like every other path.
    db: str = ""
    # Answers with band_low <= prediction <= band_high are kept.
    band_low: float = 0.35
    band_high: float = 0.65
    # Share of confident answers (outside the band, no testnet label) kept anyway.
    random_rate: float = 0.02
    queue_max: int = 1024
    queue_max_bytes: int = 64_000_000
    batch_max: int = 64
    flush_interval_s: float = 1.0
    max_samples: int = 200_000
    max_bytes: int = 8_000_000_000
    # Retention keeps human-reviewed samples (review_label set) unless this is true.
    # Testnet-labelled samples are deleted like any other, oldest first.
    retention_deletes_reviewed: bool = False
    # Answers to the development key (//Alice, what `svd bench` signs with) are benchmark
    # traffic, not validators' images: not kept unless this is true.
    keep_dev_key: bool = False

    def validate(self) -> None:
        _check(0.0 <= self.band_low <= 1.0, "samples.band_low", "a number in [0, 1]", self.band_low)
        _check(
            0.0 <= self.band_high <= 1.0 and self.band_high > self.band_low,
            "samples.band_high",
            "a number in [0, 1] and > samples.band_low",
            self.band_high,
        )
        _check(0.0 <= self.random_rate <= 1.0, "samples.random_rate", "a number in [0, 1]", self.random_rate)
        _check(1 <= self.batch_max <= 10_000, "samples.batch_max", "an integer 1..10000", self.batch_max)
        _check(self.queue_max >= self.batch_max, "samples.queue_max", "an integer >= samples.batch_max", self.queue_max)
        _check(
            self.queue_max_bytes >= 1_000_000, "samples.queue_max_bytes", "an integer >= 1000000", self.queue_max_bytes
        )
        _check(
            0.01 <= self.flush_interval_s <= 60,
            "samples.flush_interval_s",
            "a number 0.01..60",
            self.flush_interval_s,
        )
        _check(self.max_samples >= 1, "samples.max_samples", "an integer >= 1", self.max_samples)
        _check(self.max_bytes >= 1_000_000, "samples.max_bytes", "an integer >= 1000000", self.max_bytes)


@dataclass(frozen=True)
class MetricsConfig:
    # Prometheus metrics at http://host:port/metrics; localhost only unless you open it on purpose.
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9591

    def validate(self) -> None:
        _check(0 <= self.port <= 65535, "metrics.port", "an integer 0..65535", self.port)
        _check(bool(self.host), "metrics.host", "an address to listen on", self.host)


SYNTH_DEVICES = ("auto", "cuda", "cpu")
SYNTH_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic training images made the way validators make theirs (docs/synth.md)."""

    # The nightly job; `svd synth now` works whether or not this is on.
    enabled: bool = False
    # Cron in the daemon's local time; before [train] schedule, so the night's run takes the images up.
    schedule: str = "0 1 * * *"
    misfire_grace_s: int = 3600
    # Images per nightly job (svd synth now --count overrides).
    count: int = 200
    # The SDXL pipeline: a hub repo id read from the local Hugging Face cache (never downloaded), or a
    # folder saved by diffusers' save_pretrained. Image-to-image shares its weights.
    model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    # The weight files' variant in the repo ("fp16"), or "" for the plain ones.
    variant: str = "fp16"
    dtype: str = "float16"
    # auto: cuda when there is one, else cpu (which generation refuses unless allow_cpu, or --force).
    device: str = "auto"
    allow_cpu: bool = False
    # diffusers' model CPU offload: less GPU memory beside the serving engine, slower images.
    offload: bool = False
    # As validators generate (protocol.md, "The validator of today").
    steps: int = 25
    guidance: float = 8.5
    strength: float = 0.7
    # Text-to-image output side; image-to-image sources with a side above it are squashed to it.
    size: int = 1024
    # Shares of image-to-image among the images, and of label 1 (roadwork).
    i2i_share: float = 0.5
    roadwork_share: float = 0.5
    # The synthetic image folder's bound on disk; the oldest images go first.
    disk_budget_mb: int = 2048
    # The folder as a training source (synthetic kind) and its weight beside [[train.sources]].
    use_in_training: bool = True
    weight: float = 1.0
    # 0: a new seed per job; else the same images every time (tests, comparisons).
    seed: int = 0

    def validate(self) -> None:
        _check(_is_cron(self.schedule), "synth.schedule", 'a 5-field cron line such as "0 1 * * *"', self.schedule)
        _check(self.misfire_grace_s >= 1, "synth.misfire_grace_s", "an integer >= 1", self.misfire_grace_s)
        _check(1 <= self.count <= 100_000, "synth.count", "an integer from 1 to 100000", self.count)
        _check(bool(self.model.strip()), "synth.model", "a hub repo id or a folder", self.model)
        _check(self.dtype in SYNTH_DTYPES, "synth.dtype", f"one of {', '.join(SYNTH_DTYPES)}", self.dtype)
        _check(self.device in SYNTH_DEVICES, "synth.device", f"one of {', '.join(SYNTH_DEVICES)}", self.device)
        _check(1 <= self.steps <= 200, "synth.steps", "an integer from 1 to 200", self.steps)
        _check(0 <= self.guidance <= 50, "synth.guidance", "a number from 0 to 50", self.guidance)
        _check(0 < self.strength <= 1, "synth.strength", "a number in (0, 1]", self.strength)
        # Image-to-image runs int(steps x strength) steps (diffusers' get_timesteps): none is an error there.
        _check(
            int(self.steps * self.strength) >= 1, "synth.strength", "at least one image-to-image step", self.strength
        )
        _check(
            64 <= self.size <= 2048 and self.size % 8 == 0, "synth.size", "a multiple of 8 from 64 to 2048", self.size
        )
        _check(0 <= self.i2i_share <= 1, "synth.i2i_share", "a number from 0 to 1", self.i2i_share)
        _check(0 <= self.roadwork_share <= 1, "synth.roadwork_share", "a number from 0 to 1", self.roadwork_share)
        _check(self.disk_budget_mb >= 1, "synth.disk_budget_mb", "an integer >= 1", self.disk_budget_mb)
        _check(self.weight >= 0, "synth.weight", "a number >= 0", self.weight)
        _check(self.seed >= 0, "synth.seed", "an integer >= 0", self.seed)


@dataclass(frozen=True)
class RegisterConfig:
    # NATIX's application server, where `svd register` registers the miner (the subnet's register.sh).
    base_url: str = "https://hydra.natix.network"

    def validate(self) -> None:
        _check(
            self.base_url.startswith(("http://", "https://")) and len(self.base_url) > 8,
            "register.base_url",
            "an http:// or https:// URL",
            self.base_url,
        )


@dataclass(frozen=True)
class TrainSource:
    """One training data source (docs/training.md)."""

    # natix_parquet: the NATIX data set's parquet files (path, or repo from the local hub cache);
    # image_folder: <path>/<0|none|1|roadwork>/*.jpg|png.
    kind: str
    path: str = ""
    repo: str = ""
    weight: float = 1.0
    synthetic: bool = False


SOURCE_KINDS = ("natix_parquet", "image_folder")
# The validators whose challenges training views imitate (docs/training.md): "current" sends the
# image at its native size, un-distorted, re-saved as JPEG 75; "v0.2" (January 2026) distorts it
# (levels 0-3) at 224x224.
GENERATIONS = ("current", "v0.2")


def parse_generation(text: str) -> tuple[tuple[str, float], ...]:
    """`[train] generation`: one generation ("current"), or a weighted mix ("current:3, v0.2:1").

    Returns (generation, share) pairs in GENERATIONS order, shares summing to 1; raises ValueError.
    """
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = (t.strip() for t in part.partition(":"))
        if name not in GENERATIONS or name in weights:
            raise ValueError(f"{name!r} is not one of {', '.join(GENERATIONS)} (each once)")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"weight {weight!r} of {name} is not a number") from None
        if not (math.isfinite(weights[name]) and weights[name] >= 0):
            raise ValueError(f"weight of {name} must be a number >= 0")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("the weights must not all be 0")
    return tuple((g, weights[g] / total) for g in GENERATIONS if weights.get(g))


@dataclass(frozen=True)
class TrainConfig:
    """The nightly learning loop (docs/training.md): what it learns from, how, and when it deploys."""

    enabled: bool = True
    # Cron in the daemon's local time: minute hour day month weekday.
    schedule: str = "0 3 * * *"
    misfire_grace_s: int = 3600
    # Labelled logged samples (reviewed, or testnet ground truth) from samples.db, beside `sources`.
    use_samples: bool = True
    sources: tuple[TrainSource, ...] = ()
    # Which validators' challenges the views imitate: "current", "v0.2", or a mix ("current:3, v0.2:1").
    generation: str = "current"
    # Views per training / holdout image of the v0.2 generation (each a validator-style distortion);
    # a current-generation view has nothing random, so an image has one.
    views: int = 4
    holdout_views: int = 2
    holdout_permille: int = 150
    validation_permille: int = 150
    # Below this many labelled training images a run ends early without fitting anything.
    min_images: int = 50
    # Idle-lane slices: each aims at slice_ms on this engine (a query waits one slice at most);
    # a feature slice holds at most slice_images images.
    slice_images: int = 32
    slice_ms: float = 25.0
    # CPU threads distorting images (at a lower priority than serving).
    threads: int = 1
    hidden: int = 256
    max_epochs: int = 100
    patience: int = 10
    learning_rate: float = 0.001
    weight_decay: float = 0.0001
    batch_size: int = 256
    seed: int = 0
    # The candidate must beat the serving engine on the holdout by these, with this confidence.
    min_gain_reward: float = 0.005
    min_gain_mcc: float = 0.01
    confidence: float = 0.95

    def validate(self) -> None:
        _check(_is_cron(self.schedule), "train.schedule", 'a 5-field cron line such as "0 3 * * *"', self.schedule)
        _check(self.misfire_grace_s >= 1, "train.misfire_grace_s", "an integer >= 1", self.misfire_grace_s)
        for i, src in enumerate(self.sources):
            key = f"train.sources[{i}]"
            _check(src.kind in SOURCE_KINDS, f"{key}.kind", f"one of {', '.join(SOURCE_KINDS)}", src.kind)
            _check(
                bool(src.path) != bool(src.repo) and (not src.repo or src.kind == "natix_parquet"),
                f"{key}.path",
                "either path or (for natix_parquet) repo, not both",
                src.path or src.repo,
            )
            _check(src.weight >= 0, f"{key}.weight", "a number >= 0", src.weight)
        try:
            parse_generation(self.generation)
        except ValueError as exc:
            _check(False, "train.generation", f'"current", "v0.2" or a mix such as "current:3, v0.2:1" ({exc})',
                   self.generation)  # fmt: skip
        _check(1 <= self.views <= 64, "train.views", "an integer 1..64", self.views)
        _check(1 <= self.holdout_views <= 64, "train.holdout_views", "an integer 1..64", self.holdout_views)
        for key in ("holdout_permille", "validation_permille"):
            value = getattr(self, key)
            _check(1 <= value <= 500, f"train.{key}", "an integer 1..500", value)
        _check(self.min_images >= 4, "train.min_images", "an integer >= 4", self.min_images)
        _check(1 <= self.slice_images <= 1024, "train.slice_images", "an integer 1..1024", self.slice_images)
        _check(1 <= self.slice_ms <= 1000, "train.slice_ms", "a number 1..1000", self.slice_ms)
        _check(1 <= self.threads <= 64, "train.threads", "an integer 1..64", self.threads)
        _check(1 <= self.hidden <= 4096, "train.hidden", "an integer 1..4096", self.hidden)
        _check(1 <= self.max_epochs <= 10_000, "train.max_epochs", "an integer 1..10000", self.max_epochs)
        _check(1 <= self.patience <= self.max_epochs, "train.patience", "an integer 1..max_epochs", self.patience)
        _check(0 < self.learning_rate <= 1, "train.learning_rate", "a number in (0, 1]", self.learning_rate)
        _check(0 <= self.weight_decay <= 1, "train.weight_decay", "a number in [0, 1]", self.weight_decay)
        _check(1 <= self.batch_size <= 65_536, "train.batch_size", "an integer 1..65536", self.batch_size)
        _check(0 <= self.min_gain_reward <= 1, "train.min_gain_reward", "a number in [0, 1]", self.min_gain_reward)
        _check(0 <= self.min_gain_mcc <= 1, "train.min_gain_mcc", "a number in [0, 1]", self.min_gain_mcc)
        _check(0.5 <= self.confidence < 1, "train.confidence", "a number in [0.5, 1)", self.confidence)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    wallet: WalletConfig = field(default_factory=WalletConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # Relative paths in the config resolve against this directory.
    base_dir: Path = field(default_factory=Path.cwd)

    @property
    def state_dir(self) -> Path:
        return self._resolve(self.daemon.state_dir)

    @property
    def engines_dir(self) -> Path:
        return self._resolve(self.engine.dir)

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "svd.sock"

    @property
    def validators_path(self) -> Path:
        """The record of validators' queries (state/validators.json)."""
        return self.state_dir / "validators.json"

    @property
    def train_dir(self) -> Path:
        """Run reports and history (state/train)."""
        return self.state_dir / "train"

    @property
    def synth_dir(self) -> Path:
        """Synthetic training images, one folder per label (state/synth)."""
        return self.state_dir / "synth"

    @property
    def synth_model(self) -> str:
        """[synth] model as a folder resolved like the config's other paths when it is one, else the repo id."""
        folder = self._resolve(self.synth.model)
        return str(folder) if folder.is_dir() else self.synth.model

    def source_path(self, path: str) -> Path:
        """A train source's path, resolved like every other path in the config."""
        return self._resolve(path)

    @property
    def samples_db(self) -> Path:
        return self._resolve(self.samples.db) if self.samples.db else self.state_dir / "samples.db"

    def _resolve(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else self.base_dir / path


def config_file(given: Path | None) -> Path | None:
    """The config file in use: --config, else ./config.toml if there is one, else None (built-in defaults)."""
    if given is None and DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    return given


def load_config(path: Path | None) -> Config:
    """Read and validate `path`; None gives the embedded default.

    Raises ConfigError naming the key for an unknown key, a wrong type or a
    value out of range.
    """
    if path is None:
        return _validated(Config())
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    return config_from_dict(data, base_dir=path.resolve().parent)


# The keys a running daemon takes on at `svd reload` or SIGHUP; a section's name stands for all its keys.
# A change to any other key is named as needing a restart and is not applied: it sizes or opens something
# at start (ports, thread pools, queues, the engine, the wallet, the chain, files). [train] and [synth] are
# read when a run starts; [samples] by the sample log at each offer, flush and retention pass, except whether it is on
# and where its database is; [auth] by each request's checks, except the mode (allowlist or chain) and the
# nonce window (the replay ledger has forgotten nonces older than the window it had: widened at once, it
# would let them replay); the log setup is redone; [register] only `svd register` reads, never the daemon.
LIVE_KEYS = frozenset(
    {
        "train",
        "synth",
        "register",
        "auth.require_registered",
        "auth.require_validator_permit",
        "auth.min_stake",
        "auth.rate_per_s",
        "auth.rate_burst",
        "auth.allowlist",
        "samples.band_low",
        "samples.band_high",
        "samples.random_rate",
        "samples.keep_dev_key",
        "samples.queue_max",
        "samples.queue_max_bytes",
        "samples.batch_max",
        "samples.flush_interval_s",
        "samples.max_samples",
        "samples.max_bytes",
        "samples.retention_deletes_reviewed",
        "daemon.log_level",
        "daemon.log_format",
        "daemon.no_query_warn_h",
    }
)


def is_live(key: str) -> bool:
    """Whether a reload applies the dotted key ("samples.band_low") at once (LIVE_KEYS)."""
    return key in LIVE_KEYS or key.partition(".")[0] in LIVE_KEYS


@dataclass(frozen=True)
class ConfigChanges:
    """The dotted keys whose values differ between two configs: applied live, or waiting for a restart."""

    live: tuple[str, ...]
    restart: tuple[str, ...]


def config_changes(running: Config, new: Config) -> ConfigChanges:
    """Compares the two configs key by key (a list, such as train.sources, as a whole)."""
    changed = [
        f"{name}.{key}"
        for name in _section_names()
        for key in _key_names(getattr(running, name))
        if getattr(getattr(running, name), key) != getattr(getattr(new, name), key)
    ]
    return ConfigChanges(tuple(k for k in changed if is_live(k)), tuple(k for k in changed if not is_live(k)))


def with_live_keys(running: Config, new: Config) -> Config:
    """`running` with `new`'s value at every live key: the config a reload puts in effect."""
    sections = {}
    for name in _section_names():
        old, fresh = getattr(running, name), getattr(new, name)
        live = {key: getattr(fresh, key) for key in _key_names(old) if is_live(f"{name}.{key}")}
        sections[name] = dataclasses.replace(old, **live)
    return _validated(dataclasses.replace(running, **sections))


def file_digest(path: Path) -> str:
    """SHA-256 of a config file's bytes: whether it changed since a daemon read it. Raises OSError."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fallback_config(path: Path) -> Config:
    """The defaults with the file's [daemon] state_dir, for a file that does not load as a whole:
    enough to find the daemon's control socket, so `svd reload` lets the daemon say what is wrong."""
    try:
        state_dir = tomllib.loads(path.read_text())["daemon"]["state_dir"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        state_dir = DaemonConfig.state_dir
    if not isinstance(state_dir, str):
        state_dir = DaemonConfig.state_dir
    return Config(daemon=DaemonConfig(state_dir=state_dir), base_dir=path.resolve().parent)


def _section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if f.name != "base_dir"]


def _key_names(section: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]


def config_from_dict(data: dict[str, Any], base_dir: Path | None = None) -> Config:
    sections = _build(Config, {k: v for k, v in data.items()}, prefix="", skip={"base_dir"})
    return _validated(dataclasses.replace(sections, base_dir=base_dir or Path.cwd()))


def _validated(cfg: Config) -> Config:
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if hasattr(section, "validate"):
            section.validate()
    if cfg.auth.mode == "online" and cfg.chain.advertise_ip:
        port = cfg.chain.advertise_port or cfg.server.port
        _check(port > 0, "chain.advertise_port", "the public port (server.port is 0)", port)
    return cfg


def _build(cls: type, data: Any, prefix: str, skip: frozenset[str] | set[str] = frozenset()) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            extra = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            raise ConfigError(f"{prefix}{key}: unknown key{extra}")
        kwargs[key] = _convert(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field (e.g. allowlist hotkey) is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs]
        raise ConfigError(f"{where}: missing key {prefix}{missing[0]}") from e


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, prefix=f"{key}.")
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_kind(value)}")
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise AssertionError(f"unsupported config type at {key}")  # keep the schema simple
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {_TYPE_WORDS[hint]}, got {_kind(value)}")
    return value


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _kind(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"{type(value).__name__} {value!r}"
    )


def _check(ok: bool, key: str, expected: str, value: Any = None) -> None:
    if not ok:
        got = "" if value is None else f", got {value!r}"
        raise ConfigError(f"{key}: expected {expected}{got}")


def _is_ip(text: str) -> bool:
    if not text:
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_cron(line: str) -> bool:
    """A crontab line the scheduler takes (APScheduler's own parser decides)."""
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(line)
    except (ValueError, TypeError):
        return False
    return True


def _looks_ss58(address: str) -> bool:
    if len(address) != SS58_LEN:
        return False
    try:
        Keypair(ss58_address=address)  # decodes and checks the checksum
    except ValueError:
        return False
    return True
