"""The checks of `svd doctor` (svd/tools/doctor.py is the command).

Every check is a small function of a shared `_Probe` returning a Verdict (ok,
warn or fail); the runner names it and turns an unexpected exception into a
fail line, so one broken check never hides the others. Checks only read: the
one write is the temporary file that proves the state dir writable. The
chain, the one slow edge, comes in as a ChainSource that tests replace.

Over the ~400 lines the style asks for, on purpose: the checks stand
in the order doctor prints them, so a reader finds a line's check by reading
down; split by topic, that order would live in a third place.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import structlog

from svd.config import DEFAULT_CONFIG, DEV_HOTKEY, Config
from svd.control import running_status
from svd.engine.backends.select import choose_backend
from svd.engine.load import newest_engine
from svd.engine.manifest import EngineError, Manifest, verify_engine_dir
from svd.engine.serving import engine_to_serve
from svd.samples.db import LABEL_SQL, DatabaseError, connect_readonly, schema_version
from svd.serve.chain import Bittensor11Source, ChainError, ChainSnapshot, ChainSource, Neuron
from svd.serve.wallet import WalletError, hotkey_wallets, load_hotkey
from svd.status import last_query, quiet_s
from svd.tools.doctor_verdict import Check, Verdict, fail, ok, warn
from svd.validators import ValidatorLog

GB = 1_000_000_000
MIN_FREE_BYTES = 2 * GB
FAIL_FREE_BYTES = 200_000_000
CHAIN_TIMEOUT_S = 10.0
STATUS_TIMEOUT_S = 2.0
TRAIN_MODULES = ("albumentations", "matplotlib", "tqdm", "pyarrow")
GATED_BACKBONES = ("facebook/dinov3-",)
NATIX_DATASET = "natix-network-org/roadwork"
# adjtimex(2) on a zeroed struct timex (modes 0) only reads; TIME_ERROR: the clock is not disciplined.
TIMEX_BYTES = 512
TIME_ERROR = 5


@dataclass
class _Probe:
    """What the checks share: the config, and what earlier checks learned."""

    cfg: Config
    config_path: Path | None
    chain: ChainSource | None
    hotkey: str | None = None
    manifest: Manifest | None = None  # None: no engine to serve (the backend is not checked)
    snapshot: ChainSnapshot | None = None

    @property
    def online(self) -> bool:
        return self.cfg.auth.mode == "online"

    def own(self) -> Neuron | None:
        return self.snapshot.neurons.get(self.hotkey) if self.snapshot and self.hotkey else None

    @cached_property
    def daemon(self) -> dict[str, Any] | None:
        """The running svd's status (asked once), or None when none answers on the control socket."""
        return _running_daemon(self.cfg)


def run_checks(cfg: Config, config_path: Path | None, chain: ChainSource | None = None) -> list[Check]:
    """Every check that applies to `cfg`, in order; never raises."""
    probe = _Probe(cfg, config_path, chain)
    table = [*LOCAL_CHECKS, *(ONLINE_CHECKS if probe.online else OFFLINE_CHECKS), *QUERY_CHECKS, *DATA_CHECKS]
    with _quiet_logs():
        return [_run_one(name, fn, probe) for name, fn in table]


def _run_one(name: str, fn: Callable[[_Probe], Verdict], probe: _Probe) -> Check:
    try:
        return Check(name, *fn(probe))
    except Exception as e:  # one broken check must not hide the others
        return Check(name, "fail", f"check failed unexpectedly: {type(e).__name__}: {e}", "report this line")


@contextmanager
def _quiet_logs() -> Iterator[None]:
    # The code the checks call logs its own events (backend_skipped, ...) to stdout; the lines say it all.
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    try:
        yield
    finally:
        structlog.configure(**saved)


def _config(p: _Probe) -> Verdict:
    if p.config_path is not None:
        return ok(f"{p.config_path} (valid)")
    return warn(
        f"built-in defaults: no {DEFAULT_CONFIG} in {Path.cwd()}",
        "copy the repository's commented config.toml here, or name one: svd --config PATH doctor",
    )


def _state(p: _Probe) -> Verdict:
    path = p.cfg.state_dir
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        return fail(f"{path} cannot be created: {base} is not a directory", "set [daemon] state_dir to a directory")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        return fail(f"{base} is not writable ({e.strerror})", f"let svd's user write {base}, or set [daemon] state_dir")
    free = shutil.disk_usage(base).free
    where = f"{path}{'' if base == path else ' (svd run creates it)'} writable, {free / GB:.1f} GB free"
    fix = "free space on that disk, or move [daemon] state_dir (and samples.db) to a larger one"
    if free < FAIL_FREE_BYTES:
        return fail(f"{where}: below {FAIL_FREE_BYTES // 1_000_000} MB, svd cannot keep samples or snapshots", fix)
    max_bytes = p.cfg.samples.max_bytes if p.cfg.samples.enabled else 0
    if free < max_bytes:
        return warn(f"{where}: below samples.max_bytes ({max_bytes / GB:.1f} GB), what the samples may take", fix)
    if free < MIN_FREE_BYTES:
        return warn(f"{where}: below {MIN_FREE_BYTES // GB} GB", fix)
    return ok(where)


def _hotkey(p: _Probe) -> Verdict:
    w = p.cfg.wallet
    named, local = (wallet.hotkey_file for wallet in hotkey_wallets(w, p.cfg.state_dir))
    # Offline, load_hotkey() would create the missing hotkey; the doctor only says that svd run will.
    if not p.online and not named.exists_on_device() and not local.exists_on_device():
        return ok(f"offline: no hotkey at {named.path}; svd run generates one at {local.path}")
    try:
        key = load_hotkey(w, p.cfg.state_dir, offline=not p.online)
    except WalletError as e:
        return fail(str(e), "do as it says, or point [wallet] name, hotkey and path at an unencrypted hotkey")
    p.hotkey = key.ss58_address
    return ok(f"{key.ss58_address} ({named.path if named.exists_on_device() else local.path})")


def _port(p: _Probe) -> Verdict:
    host, port = p.cfg.server.host, p.cfg.server.port
    if port == 0:
        return ok("server.port is 0: the system picks a free port at start")
    status = p.daemon
    if status is not None and str(status.get("listen", "")).rpartition(":")[2] == str(port):
        return ok(f"{host}:{port} in use by this svd (pid {status.get('pid')})")
    try:
        _bind_test(host, port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return fail(
                f"server.port {port} on {host} is in use by another process",
                f"stop it (`ss -ltnp 'sport = :{port}'` names it), or set [server] port to a free one",
            )
        fix = "set [server] host to an address of this machine"
        if e.errno == errno.EACCES:
            fix = "set [server] port to 1024 or above, or give svd CAP_NET_BIND_SERVICE"
        return fail(f"cannot bind {host}:{port} ({e.strerror})", fix)
    return ok(f"{host}:{port} free")


def _running_daemon(cfg: Config) -> dict[str, Any] | None:
    return running_status(cfg.socket_path, STATUS_TIMEOUT_S)


def _bind_test(host: str, port: int) -> None:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as sock:
        # Off: a port only in TIME_WAIT would pass with it on, and one bound by another socket must not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        sock.bind(addr)


def _engine(p: _Probe) -> Verdict:
    cfg, engines = p.cfg.engine, p.cfg.engines_dir
    try:
        # engine_to_serve() would build the demo into an empty engines/; the doctor only says that svd run will.
        path = engine_to_serve(cfg, engines) if cfg.name else newest_engine(engines)
        if path is None:
            if cfg.build_demo_if_empty:
                return warn(
                    f"no engine in {engines}: svd run builds a demo engine (random weights, it earns nothing)",
                    "build a real one: svd build-engine --head CKPT --backbone ID --name NAME",
                )
            return fail(f"no engine in {engines}", "svd build-engine --demo, or copy an engine directory there")
        manifest = verify_engine_dir(path)
    except EngineError as e:
        return fail(str(e), "copy or rebuild that engine, or set [engine] name to another one in engines/")
    p.manifest = manifest
    detail = f"{path}: {manifest.name} v{manifest.version}, parts verified"
    if all(b.startswith("random:") for b in manifest.backbone_ids):
        if p.online:
            return warn(f"{detail}; a demo (random weights)", "serve a trained engine: svd build-engine --head ...")
        detail += " (demo, random weights)"
    return ok(detail)


def _backend(p: _Probe) -> Verdict:
    if p.manifest is None:
        return warn("not checked: no engine to serve", "fix the engine line above")
    choice = choose_backend(p.cfg.engine.backend, p.cfg.engine.threads, manifest=p.manifest)
    choice.backend.close()  # never loaded: choosing only constructs it
    name = choice.backend.name
    if choice.plan_unusable is not None:
        return warn(
            f"{name} would serve; the engine's TensorRT plan cannot here: {choice.plan_unusable}",
            "the ONNX backbone serves meanwhile; for TensorRT here, fix what the reason names, or rebuild the "
            "engine on this machine (svd build-engine with the gpu extra)",
        )
    skipped = "; ".join(f"{k}: {why}" for k, why in choice.skipped.items())
    return ok(f"{name} would serve it" + (f" (skipped {skipped})" if skipped else ""))


def _gpu(p: _Probe) -> Verdict:
    import onnxruntime as ort
    import torch

    from svd.engine.backends.tensorrt import unavailable_reason

    if not torch.cuda.is_available():
        return ok("no CUDA device: engines run on the CPU (TensorRT and ORT's CUDA provider not used)")
    gpu, problems, fixes = torch.cuda.get_device_name(0), [], []
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        problems.append("ONNX Runtime has no CUDA provider (ONNX backbones run on the CPU)")
        fixes.append("pip uninstall onnxruntime && pip install onnxruntime-gpu")
    if (reason := unavailable_reason()) is not None:
        problems.append(reason)
        fixes.append("pip install -e '.[gpu]' for TensorRT plans")
    if problems:
        return warn(f"{gpu}: {'; '.join(problems)}", "; ".join(fixes))
    return ok(f"{gpu}: TensorRT and ONNX Runtime's CUDA provider available")


def _offline(p: _Probe) -> Verdict:
    return ok("offline mode (auth.mode), chain not used")


def _allowlist(p: _Probe) -> Verdict:
    callers, host = p.cfg.auth.allowlist, p.cfg.server.host
    dev = next((c for c in callers if c.hotkey == DEV_HOTKEY), None)
    if dev is None:
        return ok(f"{len(callers)} allowlisted callers, no development key")
    if not _listens_beyond_loopback(host):
        return ok(f"the development key (//Alice, svd bench's) is allowlisted; {host} serves this machine only")
    return warn(
        f"the development key {DEV_HOTKEY} (//Alice, what svd bench signs with) is allowlisted with stake "
        f"{dev.stake:g} while [server] host {host or '(all addresses)'} listens beyond this machine: its private "
        "key is public, so anyone who reaches the port can query and be trusted as a validator",
        f'remove its [[auth.allowlist]] entry (hotkey = "{DEV_HOTKEY}"), or set [server] host = "127.0.0.1"',
    )


def _listens_beyond_loopback(host: str) -> bool:
    """Whether [server] host takes connections from other machines: all addresses (0.0.0.0, ::) or another IP."""
    if host == "localhost":
        return False
    try:
        addresses = {ipaddress.ip_address(host)} if host else set()
    except ValueError:  # a host name: what it resolves to
        try:
            addresses = {ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, None)}
        except (OSError, ValueError):
            return False  # svd run cannot bind it either; the port line says so
    return not addresses or any(not a.is_loopback for a in addresses)


def _advertise(p: _Probe) -> Verdict:
    ip, fix = p.cfg.chain.advertise_ip, 'set [chain] advertise_ip = "<your public IP>" (and advertise_port)'
    if not ip:
        return warn("chain.advertise_ip is empty: validators cannot reach you unless the chain holds your address", fix)
    if not ipaddress.ip_address(ip).is_global:
        return warn(f"chain.advertise_ip {ip} is not a public address: validators cannot reach it", fix)
    return ok(f"{ip}:{p.cfg.chain.advertise_port or p.cfg.server.port}")


def _bittensor(p: _Probe) -> Verdict:
    if find_spec("bittensor") is None:
        return fail("bittensor is not installed: online mode cannot read the chain", "pip install -e '.[chain]'")
    return ok("bittensor installed (the chain extra)")


def _chain(p: _Probe) -> Verdict:
    c = p.cfg.chain
    try:
        source = p.chain or Bittensor11Source(c.network, min(c.timeout_s, CHAIN_TIMEOUT_S))
        p.snapshot = source.fetch(c.netuid)
    except ChainError as e:
        return fail(f"{c.network} netuid {c.netuid} not read: {e}", "check chain.network, and that this box reaches it")
    return ok(f"{c.network} netuid {c.netuid}: block {p.snapshot.block}, {len(p.snapshot.neurons)} neurons")


def _registered(p: _Probe) -> Verdict:
    if p.snapshot is None or p.hotkey is None:
        return warn("not checked: needs the hotkey and the chain", "fix the hotkey or chain line above")
    c, w, own = p.cfg.chain, p.cfg.wallet, p.own()
    if own is None:
        return fail(
            f"hotkey {p.hotkey} is not registered on netuid {c.netuid} ({c.network})",
            f"btcli subnets register --netuid {c.netuid} --network {c.network} "
            f"--wallet.name {w.name} --wallet.hotkey {w.hotkey}",
        )
    return ok(f"uid {own.uid} on netuid {c.netuid}, stake {own.stake:.2f}")


def _axon(p: _Probe) -> Verdict:
    if (own := p.own()) is None:
        return warn("not checked: not registered, or the chain not read", "fix the lines above")
    held = own.axon if own.axon and not own.axon.startswith("0.0.0.0:") else None
    c = p.cfg.chain
    if not c.advertise_ip:
        if held is not None:
            return ok(f"the chain holds {held} (advertise_ip empty: svd leaves it)")
        return fail("the chain holds no address for you, and chain.advertise_ip is empty", "set [chain] advertise_ip")
    want = f"{c.advertise_ip}:{c.advertise_port or p.cfg.server.port}"
    if held == want:
        return ok(f"the chain holds {want}")
    return warn(
        f"the chain holds {held or 'no address'}, not {want}",
        "start svd: it publishes advertise_ip:port; if it runs, look for axon_publish_failed in its log",
    )


def _clock(p: _Probe) -> Verdict:
    # A ChainSnapshot carries no block time, so skew against the chain is not measured;
    # what the kernel knows of its own sync is the honest stand-in.
    fix = "enable time sync (timedatectl set-ntp true, or chrony): a skewed clock refuses validators' nonces"
    if (synced := _kernel_clock_synced()) is None:
        return warn("not checked: the chain gives no block time, and adjtimex is not available here", fix)
    state = "synchronized" if synced else "unsynchronized"
    detail = f"the kernel reports the clock {state} (adjtimex); skew against the chain not measured"
    return ok(detail) if synced else warn(detail, fix)


def _kernel_clock_synced() -> bool | None:
    if not sys.platform.startswith("linux"):
        return None
    timex = ctypes.create_string_buffer(TIMEX_BYTES)  # zeroed: modes = 0 only reads
    state = int(ctypes.CDLL(None, use_errno=True).adjtimex(timex))
    return None if state < 0 else state != TIME_ERROR


def _validators(p: _Probe) -> Verdict:
    window_h, path = p.cfg.daemon.no_query_warn_h, p.cfg.validators_path
    record = (p.daemon or {}).get("validators")
    where = f"the running svd, pid {p.daemon['pid']}" if record and p.daemon else str(path)
    if not record:
        try:
            record = ValidatorLog.read(path, (DEV_HOTKEY,)).status()
        except FileNotFoundError:
            return ok(f"{path} not created yet (svd run records every validator's queries there)")
        except (OSError, ValueError) as e:
            return warn(f"{path} unreadable: {e}", "stop svd and move the file aside: svd starts a new record")
    now = time.time()
    detail = f"last validator query {last_query(record, now)} ({where})"
    if quiet_s(record, now) <= window_h * 3600:
        return ok(detail if record["latest"] else f"{detail}; warns after {window_h:g} h")
    return warn(f"{detail}: over daemon.no_query_warn_h ({window_h:g} h)", _no_query_causes(p))


def _no_query_causes(p: _Probe) -> str:
    """Why validators may not ask, most likely first, each with what to do."""
    c, port = p.cfg.chain, p.cfg.chain.advertise_port or p.cfg.server.port
    if p.online:
        chain = (
            "the chain does not send validators here: the hotkey is not registered, or the axon it holds is "
            f"not this address; compare svd status's chain line (uid, axon) with [chain] advertise_ip:port "
            f"({c.advertise_ip or 'empty'}:{port}), and the registered and axon lines above"
        )
    else:
        chain = (
            "[auth] mode is offline: the chain is not read and only [auth] allowlist hotkeys may ask; "
            'to mine on the subnet, set [auth] mode = "online" and [chain] (README: Mining on the subnet)'
        )
    return "causes, most likely first:\n" + "\n".join(
        [
            f"1. port {port} is not reachable from outside: from another machine, nc -vz "
            f"{c.advertise_ip or '<public ip>'} {port}; open it in the firewall, the NAT and the provider's port "
            "mapping",
            f"2. {chain}",
            "3. the subnet's validators query no one: the subnet's code has been halted since 2026-05-06 (no "
            "challenges); check NATIX's channels and github.com/natixnetwork/streetvision-subnet, nothing to fix here",
        ]
    )


def _samples(p: _Probe) -> Verdict:
    path = p.cfg.samples_db
    if not path.exists():
        return ok(f"{path} not created yet (svd run creates it)" if p.cfg.samples.enabled else "samples off")
    try:
        conn = connect_readonly(path)
    except DatabaseError as e:
        return fail(str(e), "do as it says; a corrupt file: stop svd and move it aside, svd starts a new one")
    try:
        version = schema_version(conn)
    finally:
        conn.close()
    return ok(f"{path}: schema version {version}, {path.stat().st_size / 1e6:.1f} MB")


def _train(p: _Probe) -> Verdict:
    t = p.cfg.train
    if not t.enabled:
        return ok("off ([train] enabled = false)")
    paths = [(i, p.cfg.source_path(s.path)) for i, s in enumerate(t.sources) if s.path]
    if missing := [f"train.sources[{i}].path {path}" for i, path in paths if not path.exists()]:
        return fail(f"missing: {'; '.join(missing)}", "correct the path, or remove that [[train.sources]] entry")
    if modules := [m for m in TRAIN_MODULES if find_spec(m) is None]:
        return warn(
            f"the train extra is not installed ({', '.join(modules)}): nightly runs fail, serving goes on",
            "pip install -e '.[train]', or set [train] enabled = false",
        )
    return ok(f"enabled ({t.schedule}), {len(t.sources)} sources, the train extra installed")


def _train_data(p: _Probe) -> Verdict:
    t = p.cfg.train
    if not t.enabled:
        return ok("off ([train] enabled = false)")
    labelled = _labelled_samples(p.cfg.samples_db) if t.use_samples else 0
    from_samples = f"{labelled} labelled samples in samples.db" if t.use_samples else "train.use_samples = false"
    if t.sources:
        return ok(f"{len(t.sources)} [[train.sources]], {from_samples}")
    if labelled >= t.min_images:
        return ok(f"no [[train.sources]]; {from_samples}")
    if not t.use_samples:
        held = from_samples
    elif labelled:
        held = f"samples.db holds {labelled} labelled samples, below train.min_images ({t.min_images})"
    else:
        held = "samples.db holds no labelled sample"
    return warn(
        f"no training source: [train] sources is empty and {held}: nightly runs end without training",
        "add a data set as [[train.sources]], then svd reload:\n"
        "generated street scenes: svd demo-data DIR prints the [[train.sources]] lines to add;\n"
        f"the NATIX set: hf download {NATIX_DATASET} --repo-type dataset, then add\n"
        f'[[train.sources]]\nkind = "natix_parquet"\nrepo = "{NATIX_DATASET}"',
    )


def _labelled_samples(path: Path) -> int:
    """Images with a label (reviewed, or testnet ground truth) in samples.db, as training counts them."""
    if not path.is_file():
        return 0
    try:
        conn = connect_readonly(path)
    except DatabaseError:  # the samples line says what is wrong with it
        return 0
    try:
        sql = f"SELECT count(DISTINCT image_sha256) FROM samples WHERE {LABEL_SQL} IS NOT NULL"
        return int(conn.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def _hub_repos(p: _Probe) -> tuple[list[str], list[str]]:
    datasets = [s.repo for s in p.cfg.train.sources if s.repo] if p.cfg.train.enabled else []
    ids = p.manifest.backbone_ids if p.manifest is not None else ()
    return datasets, [b for b in ids if b.startswith(GATED_BACKBONES)]


def _hf_token(p: _Probe) -> Verdict:
    datasets, gated = _hub_repos(p)
    if not datasets and not gated:
        return ok("not needed: no hub datasets in [train], no gated backbone")
    if find_spec("huggingface_hub") is None:
        return warn("huggingface_hub is not installed", "pip install -e '.[train]'")
    from huggingface_hub import get_token

    needs = ", ".join(datasets + [f"{b} (to rebuild the engine)" for b in gated])
    if get_token() is None:  # only whether there is one: a token is never printed
        return warn(f"no Hugging Face token; needed for {needs}", "hf auth login (and accept each repo's terms)")
    return ok(f"token present; needed for {needs}")


def _hf_cache(p: _Probe) -> Verdict:
    datasets, _ = _hub_repos(p)
    if not datasets:
        return ok("no hub datasets in [train]")
    if missing := [r for r in datasets if not _dataset_cached(r)]:
        return warn(
            f"not in the local hub cache (svd never downloads): {', '.join(missing)}",
            "; ".join(f"hf download {r} --repo-type dataset" for r in missing),
        )
    return ok(f"in the local hub cache: {', '.join(datasets)}")


def _dataset_cached(repo: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, repo_type="dataset", local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError; a malformed id a ValueError
        return False
    return True


def _synth(p: _Probe) -> Verdict:
    """The nightly synthetic-image job: the extra, the model on disk, a GPU (docs/synth.md)."""
    sc = p.cfg.synth
    if not sc.enabled:
        return ok("nightly job off ([synth] enabled = false; svd synth now works on a GPU box)")
    if find_spec("diffusers") is None:
        return warn("the synth extra is not installed: nightly jobs fail, serving goes on", "pip install -e '.[synth]'")
    model = p.cfg.synth_model
    if not Path(model).is_dir() and not _model_cached(model):
        return warn(
            f"{model} is neither a folder nor in the local hub cache (svd never downloads): nightly jobs fail",
            "docs/synth.md, On a GPU box: the hf download command for the fp16 files",
        )
    import torch

    if not torch.cuda.is_available() and not sc.allow_cpu:
        return warn(
            "no CUDA device: nightly jobs are refused (an SDXL image takes minutes on a CPU)",
            "set [synth] enabled = false on this box, or allow_cpu = true to generate anyway",
        )
    return ok(f"nightly ({sc.schedule}), {sc.count} images from {model}")


def _model_cached(repo: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, local_files_only=True, allow_patterns=["model_index.json"])
    except (OSError, ValueError):
        return False
    return True


CheckFn = Callable[[_Probe], Verdict]
LOCAL_CHECKS: tuple[tuple[str, CheckFn], ...] = (
    ("config", _config),
    ("state", _state),
    ("hotkey", _hotkey),
    ("port", _port),
    ("engine", _engine),
    ("backend", _backend),
    ("gpu", _gpu),
)
OFFLINE_CHECKS: tuple[tuple[str, CheckFn], ...] = (("chain", _offline), ("allowlist", _allowlist))
ONLINE_CHECKS: tuple[tuple[str, CheckFn], ...] = (
    ("advertise", _advertise),
    ("bittensor", _bittensor),
    ("chain", _chain),
    ("registered", _registered),
    ("axon", _axon),
    ("clock", _clock),
)
QUERY_CHECKS: tuple[tuple[str, CheckFn], ...] = (("validators", _validators),)
DATA_CHECKS: tuple[tuple[str, CheckFn], ...] = (
    ("samples", _samples),
    ("train", _train),
    ("train-data", _train_data),
    ("hf-token", _hf_token),
    ("hf-cache", _hf_cache),
    ("synth", _synth),
)
