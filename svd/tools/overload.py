"""`python -m svd.tools.overload`: open-loop overload from real bittensor 9.x dendrites, as multiples of capacity.

One command, one sitting, on this machine:

1. A demo engine (or --engine DIR) and a config of its own in a temp dir:
   offline, the development key //Alice allowlisted without a rate limit,
   samples, training and engine watching off, metrics on a free port.
2. Capacity: decode + engine at batch 1 in one process, no HTTP
   (`svd bench --raw -b 1`, images per second), before the daemon starts.
3. A daemon (`svd run`, its own process), then for each multiple M: Poisson
   load at M x capacity from real dendrites (svd/tools/dendrite_load.py
   --rate, under --dendrite-python, with --cache-schema so one core can sign
   that many), every query timed from its scheduled send and its outcome
   counted; the daemon's counters before and after (served, refused and
   failed by reason, admitted but late) and its RSS (/proc/<pid>/status
   VmRSS: before, peak sampled every 0.5 s, after).

Prints a table, or --json. The load generator shares the machine's cores
with the daemon (0.2-0.4 of a core at 160-450 queries/s on the development
machine); the CPU seconds of both, and of anything else that ran meanwhile,
are in the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any

from svd.config import DEV_HOTKEY, ServerConfig, load_config
from svd.engine.canary import street_jpegs
from svd.tools.bench import _rss_mb

REPO = Path(__file__).resolve().parents[2]
DENDRITE_LOAD = Path(__file__).with_name("dendrite_load.py")
READY_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m svd.tools.overload", description=__doc__.splitlines()[0])
    p.add_argument("--engine", type=Path, default=None, help="an engine directory to serve (default: a new demo)")
    p.add_argument("-m", "--multiples", type=float, nargs="+", default=[3.0, 8.0], help="load / capacity (3 8)")
    p.add_argument("-d", "--duration", type=float, default=30.0, help="counted seconds of load per multiple")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before counting (default 5)")
    p.add_argument("--capacity-s", type=float, default=8.0, help="seconds spent measuring capacity (default 8)")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="a config value for the daemon (a TOML value; repeatable), e.g. batcher.max_queue=128",
    )  # fmt: skip
    p.add_argument(
        "--dendrite-python", type=Path, default=REPO / ".cache/bt9-venv/bin/python",
        help="a python with bittensor 9.x (default: the test suite's .cache/bt9-venv)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(root: Path, port: int, metrics_port: int, overrides: list[str]) -> Path:
    """The daemon's config; `overrides` are "section.key=value" (a TOML value), e.g. "batcher.max_queue=128"."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port},
        "engine": {"build_demo_if_empty": False, "watch": False},
        "samples": {"enabled": False},
        "train": {"enabled": False},
        "metrics": {"port": metrics_port},
        "daemon": {"log_format": "json", "log_level": "warning"},
    }
    if "max_connections_per_address" in {f.name for f in fields(ServerConfig)}:
        # One address stands for many validators here: a per-address cap would cut the load generator off.
        sections["server"].update(max_connections_per_address=1024, max_connections=4096)
    for item in overrides:
        name, _, value = item.partition("=")
        section, _, key = name.strip().partition(".")
        sections.setdefault(section, {})[key] = tomllib.loads(f"v = {value}")["v"]
    # //Alice, the development key, at a validator's stake and without a rate limit.
    text = f'[[auth.allowlist]]\nhotkey = "{DEV_HOTKEY}"\nstake = 1000.0\nrate_per_s = 0.0\n'
    for section, values in sections.items():
        text += f"\n[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    path = root / "svd.toml"
    path.write_text(text)
    load_config(path)  # a wrong override stops here, naming the key
    return path


def svd(config: Path, *args: str, timeout: float = 600.0) -> str:
    cmd = [sys.executable, "-m", "svd", "--config", str(config), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"overload: {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def capacity(config: Path, images: Path, seconds: float) -> dict[str, Any]:
    out = svd(config, "bench", "--raw", "-b", "1", "-d", str(seconds), "--images", str(images), "--json")
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return figures


def status(config: Path) -> dict[str, Any]:
    from svd.control import call

    return dict(call(load_config(config).socket_path, "status"))


def scrape(metrics_port: int) -> dict[str, float]:
    """The daemon's metrics this tool reads: admitted but late, and the engine's time per batch."""
    wanted = ("svd_requests_admitted_late_total", "svd_engine_batch_seconds_sum", "svd_engine_batch_seconds_count")
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {name: float(value) for name, _, value in (line.partition(" ") for line in lines) if name in wanted}


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        cmd = [sys.executable, "-m", "svd", "--config", str(config), "run"]
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=REPO)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"overload: the daemon exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if status(config).get("state") == "serving":
                return proc
        except (OSError, RuntimeError):
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"overload: the daemon did not start in {READY_TIMEOUT_S:.0f} s")


def settle(config: Path, timeout_s: float = 30.0) -> None:
    """Until the daemon holds nothing queued or on the engine (the last phase's stragglers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = status(config)
        if s["queue_depth"] == 0 and s["in_flight"] == 0:
            return
        time.sleep(0.5)


def phase(args: argparse.Namespace, config: Path, images: Path, rate: float, metrics_port: int) -> dict[str, Any]:
    settle(config)
    before = status(config)
    pid = int(before["pid"])
    metrics_before = scrape(metrics_port)
    rss = [_rss_mb(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            rss.append(_rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cmd = [
        str(args.dendrite_python), str(DENDRITE_LOAD), "--port", str(before["listen"].rsplit(":", 1)[1]),
        "--axon-hotkey", str(before["hotkey"]), "--images", str(images), "--rate", f"{rate:.2f}",
        "-d", str(args.duration), "--warmup", str(args.warmup), "--seed", str(args.seed), "--cache-schema",
    ]  # fmt: skip
    env = dict(os.environ, HOME=str(images.parent / "bt9-home"))
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    started = time.monotonic()
    cpu_before, load_cpu_before, busy_before = _cpu_s(pid), _children_cpu_s(), _machine_busy_s()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    finally:
        done.set()
        sampler.join()
    # Over the whole run (warm-up included): the cores' split between the daemon and the load generator.
    # Whatever else ran on the machine meanwhile ("other_s") is noise in every figure.
    cpu = {"daemon_s": round(_cpu_s(pid) - cpu_before, 1), "load_s": round(_children_cpu_s() - load_cpu_before, 1)}
    cpu["other_s"] = round(max(_machine_busy_s() - busy_before - cpu["daemon_s"] - cpu["load_s"], 0.0), 1)
    if proc.returncode != 0:
        raise SystemExit(f"overload: the load failed ({proc.returncode}): {proc.stderr[-2000:]}")
    load: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    settle(config)
    after = status(config)
    metrics_after = scrape(metrics_port)
    late = [m.get("svd_requests_admitted_late_total") for m in (metrics_before, metrics_after)]
    batches, engine_s = (
        metrics_after[key] - metrics_before[key]
        for key in ("svd_engine_batch_seconds_count", "svd_engine_batch_seconds_sum")
    )
    return {
        "load": load,
        "daemon": {
            "served": after["served"] - before["served"],
            "failed": _delta(after["failed"], before["failed"]),
            "refused": _delta(after["refused"], before["refused"]),
            # None: this svd does not count them.
            "admitted_late": None if late[0] is None or late[1] is None else int(late[1] - late[0]),
            "batch_sizes": _delta(after["batch_sizes"], before["batch_sizes"]),
            "engine_ms_per_batch": round(1000 * engine_s / batches, 1) if batches else None,
        },
        "daemon_rss_mb": {"before": rss[0], "peak": max(rss), "after": _rss_mb(pid)},
        "cpu": {**cpu, "wall_s": round(time.monotonic() - started, 1)},
    }


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    utime, stime = stat.rsplit(")", 1)[1].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    jiffies = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: n for k, n in (Counter(after) - Counter(before)).items() if n}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.dendrite_python.exists():
        raise SystemExit(
            f"overload: no python with bittensor 9.x at {args.dendrite_python}; build the test suite's with "
            '.venv/bin/python -c "from pathlib import Path; from tests.bt9env import ensure_bt9_python; '
            "print(ensure_bt9_python(Path('.cache')))\""
        )
    with tempfile.TemporaryDirectory(prefix="svd-overload-") as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        for i, jpeg in enumerate(street_jpegs(64)):  # what `svd bench` generates: 224x224 street scenes
            (images / f"{i:02d}.jpg").write_bytes(jpeg)
        metrics_port = free_port()
        config = write_config(root, free_port(), metrics_port, args.set)
        if args.engine is not None:
            shutil.copytree(args.engine, root / "engines" / args.engine.name)
        else:
            svd(config, "build-engine", "--demo")
        out: dict[str, Any] = {"capacity": capacity(config, images, args.capacity_s)}
        per_s = float(out["capacity"]["decode_plus_engine"]["images_per_s"])
        daemon = start_daemon(config, root / "daemon.log")
        try:
            for m in args.multiples:
                out[f"x{m:g}"] = {"rate": round(m * per_s, 1), **phase(args, config, images, m * per_s, metrics_port)}
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    return out


def render(figures: dict[str, Any]) -> str:
    cap = figures["capacity"]["decode_plus_engine"]
    per_s = float(cap["images_per_s"])
    lines = [f"capacity (decode + engine, batch 1, one process): {per_s} img/s (p50 {cap['p50_ms']} ms)"]
    for key, f in figures.items():
        if key == "capacity":
            continue
        load, d, rss = f["load"], f["daemon"], f["daemon_rss_mb"]
        o = load["outcomes"]
        lines.append(
            f"{key}: {f['rate']}/s sent {load['sent']} ({load['sent_rps']}/s): in time {o.get('in_time', 0)} "
            f"({load['in_time_rps'] / per_s:.2f} of capacity), 503 {o.get('503', 0)}, timed out {o.get('timeout', 0)}, "
            f"late {o.get('late', 0)}, other {sum(n for k, n in o.items() if k.startswith('other'))}; "
            f"p50/p99 {load['p50_ms']}/{load['p99_ms']} ms, 503 p50 {load['p50_503_ms']} ms; "
            f"send lag p99 {load['send_lag_p99_ms']} ms"
        )
        lines.append(
            f"    daemon: served {d['served']}, failed {d['failed']}, refused {d['refused']}, admitted but late "
            f"{d['admitted_late']}; batches {d['batch_sizes']} (engine {d['engine_ms_per_batch']} ms each); "
            f"RSS MB {rss['before']} / {rss['peak']} / {rss['after']}"
        )
        cpu = f["cpu"]
        lines.append(
            f"    CPU s in {cpu['wall_s']} s: daemon {cpu['daemon_s']}, load generator {cpu['load_s']}, "
            f"other processes {cpu['other_s']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = run(args)
    print(json.dumps(figures) if args.json else render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
