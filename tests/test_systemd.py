"""systemd/svd.service: the directives svd relies on, and systemd's own verdict on the unit."""

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "svd.service"
ENV_EXAMPLE = ROOT / "systemd" / "svd.env.example"
EXEC = "/opt/svd/.venv/bin/svd"
# `systemd-analyze security` rates the unit 0 (locked down) to 10; it was 8.6 before the sandbox.
MAX_EXPOSURE = 2.0

# Each directive with every value it must have, in order.
REQUIRED = {
    # Lifecycle: sd_notify READY/WATCHDOG/STOPPING, a bounded graceful stop, restarts.
    "Type": ["notify"],
    "NotifyAccess": ["main"],
    "WatchdogSec": ["30"],
    "KillSignal": ["SIGTERM"],
    "TimeoutStopSec": ["60"],
    "Restart": ["always"],
    "User": ["svd"],
    "ExecStart": [f"{EXEC} --config /etc/svd/config.toml run"],
    # systemctl reload: SIGHUP re-reads the config file.
    "ExecReload": ["/bin/kill -HUP $MAINPID"],
    "EnvironmentFile": ["-/etc/svd/svd.env"],
    # Logs: svd's <N> prefixes become journal priorities.
    "StandardOutput": ["journal"],
    "SyslogLevelPrefix": ["yes"],
    # Files svd creates are its own: samples.db was 0644.
    "UMask": ["0077"],
    "CacheDirectory": ["svd"],
    "NoNewPrivileges": ["yes"],
    "CapabilityBoundingSet": [""],
    "AmbientCapabilities": [""],
    "RestrictSUIDSGID": ["yes"],
    "ProtectSystem": ["strict"],
    "ReadWritePaths": ["/opt/svd/state /opt/svd/engines"],
    "ProtectHome": ["yes"],
    "PrivateTmp": ["yes"],
    "PrivateMounts": ["yes"],
    "ProtectKernelTunables": ["yes"],
    "ProtectKernelModules": ["yes"],
    "ProtectKernelLogs": ["yes"],
    "ProtectControlGroups": ["yes"],
    "ProtectClock": ["yes"],
    "ProtectHostname": ["yes"],
    "ProtectProc": ["invisible"],
    "LockPersonality": ["yes"],
    "RestrictRealtime": ["yes"],
    "RestrictNamespaces": ["yes"],
    # The GPU: an allow-list, never a private /dev without /dev/nvidia*.
    "PrivateDevices": ["no"],
    "DevicePolicy": ["closed"],
    "DeviceAllow": ["char-nvidia* rw"],
    "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"],
    "SystemCallFilter": ["@system-service", "~@privileged"],
    "SystemCallErrorNumber": ["EPERM"],
    "SystemCallArchitectures": ["native"],
}
# CUDA and PyTorch need writable+executable pages, a private /dev hides the GPU,
# and a process-only /proc hides /proc/driver/nvidia.
FORBIDDEN = ("MemoryDenyWriteExecute", "ProcSubset", "PrivateUsers")
# What the NVIDIA driver and CUDA's allocator call; a SystemCallFilter=~ naming any breaks the GPU.
CUDA_SYSCALLS = ("@resources", "@memlock", "ioctl", "mmap", "mprotect", "mremap", "madvise", "mbind")


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found[key.strip()].append(value.strip())
    return found


UNIT_DIRECTIVES = directives(UNIT.read_text())


@pytest.mark.parametrize(("key", "values"), REQUIRED.items(), ids=REQUIRED.keys())
def test_the_unit_sets(key: str, values: list[str]) -> None:
    assert UNIT_DIRECTIVES.get(key) == values


@pytest.mark.parametrize("key", FORBIDDEN)
def test_the_unit_leaves_out(key: str) -> None:
    assert key not in UNIT_DIRECTIVES


def test_no_system_call_filter_takes_away_what_cuda_uses() -> None:
    denied = {
        name for value in UNIT_DIRECTIVES["SystemCallFilter"] if value.startswith("~") for name in value[1:].split()
    }
    assert not denied & set(CUDA_SYSCALLS)


def test_everything_svd_writes_is_inside_a_writable_path() -> None:
    writable = [Path(p) for p in UNIT_DIRECTIVES["ReadWritePaths"][0].split()]
    caches = [Path("/var/cache") / name for name in UNIT_DIRECTIVES["CacheDirectory"]]
    env = dict(value.split("=", 1) for value in UNIT_DIRECTIVES["Environment"])
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    assert Path(example["HF_HOME"]).is_relative_to(writable[0])
    for key in ("XDG_CACHE_HOME", "CUDA_CACHE_PATH", "MPLCONFIGDIR"):
        assert any(Path(env[key]).is_relative_to(cache) for cache in caches), key


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with its ExecStart binary swapped for one that exists here: verify checks it is executable."""
    program = tmp_path / "svd"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    copy = tmp_path / "svd.service"
    copy.write_text(UNIT.read_text().replace(EXEC, str(program)))
    return copy


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian/Ubuntu package: systemd)"
)


@needs_systemd_analyze
def test_systemd_analyze_verify_finds_nothing(unit_copy: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_copy)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "svd.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


@needs_systemd_analyze
def test_systemd_analyze_security_rates_the_unit_low(unit_copy: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no --offline (systemd 250+): {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for svd\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
