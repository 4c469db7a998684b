"""Training data sources: NATIX parquet sets and image folders, read as records.

Each source is a `SourceSpec`. Scanning one reads every image once to hash it
(sha256 of the encoded bytes, as the samples database keys its images) and
keeps only a `Record`: hash, label, source, origin and a reference to load
the bytes again, so a large set never sits in memory. svd.train.splits
deduplicates the records, splits them by hash and mixes sources by weight.

- NATIX parquet (`natix_parquet`): every *.parquet under a directory, or a
  dataset repo in the local Hugging Face cache (never the network). Rows are
  read as the validator reads them (natix/validator/cache/extract.py and
  image_cache.py): the image column is the first whose name contains
  "image"; a struct gives the value of its first key containing "bytes" or
  "image", raw binary is used as is, and bytes PIL cannot open are tried as
  base64. `label` must be 0 or 1. A row is skipped when its
  `scene_description` disagrees with the label: a truthy description with
  label 0, or an empty/null one with label 1 (the rule applies when the
  column exists). Skips are counted by reason.
- Image folders (`image_folder`): one sub-folder per class, `0`/`none` and
  `1`/`roadwork` (case-insensitive), images found recursively below each.

Further kinds (logged samples, whose records carry the serving backbone's
features) register a scanner in SCANNERS.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import structlog
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from svd.config import Config

log = structlog.get_logger(__name__)

NATIX_PARQUET = "natix_parquet"
IMAGE_FOLDER = "image_folder"
REAL = "real"
SYNTHETIC = "synthetic"
CLASS_FOLDERS = {"0": 0, "none": 0, "1": 1, "roadwork": 1}
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
HUB_FETCH_HINT = (
    "hf auth login, accept the dataset's terms on huggingface.co, then: hf download {repo} --repo-type dataset"
)


class SourceError(Exception):
    """A source cannot be read: missing, not in the cache, or not in the expected layout."""


@dataclass(frozen=True)
class SourceSpec:
    """One training data source, as the config names it.

    Attributes:
        name: unique name, used in records and the run report.
        kind: NATIX_PARQUET or IMAGE_FOLDER (scanners in SCANNERS; more kinds can register there).
        path: a local directory (parquet files below it, or class folders).
        repo_id: a Hugging Face dataset repo read from the local hub cache (natix_parquet only);
            give path or repo_id, not both.
        revision: branch, tag or commit of repo_id in the cache (default: main).
        weight: share of the training epoch, relative to the other sources' weights (see module doc).
        synthetic: the images are generated (validators send half synthetic), not photos.
    """

    name: str
    kind: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    weight: float = 1.0
    synthetic: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a source needs a name")
        if (self.path is None) == (self.repo_id is None):
            raise ValueError(f"source {self.name}: give a path or a repo_id, not both or neither")
        if self.repo_id is not None and self.kind != NATIX_PARQUET:
            raise ValueError(f"source {self.name}: repo_id is for {NATIX_PARQUET} sources only")
        if not self.weight >= 0:  # also refuses NaN
            raise ValueError(f"source {self.name}: weight must be >= 0, got {self.weight}")

    @property
    def origin(self) -> str:
        return SYNTHETIC if self.synthetic else REAL

    @property
    def location(self) -> str:
        return str(self.path) if self.path is not None else f"hf:{self.repo_id}"


class ImageRef(Protocol):
    """Where a record's encoded image lives; read() returns its bytes."""

    def read(self) -> bytes: ...


@dataclass(frozen=True)
class FileRef:
    path: Path

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class ParquetRef:
    """Row `row` of row group `row_group` in a parquet file; read_images() reads a group once for many rows."""

    path: Path
    row_group: int
    row: int
    column: str

    def read(self) -> bytes:
        return read_images([self])[0]


@dataclass(frozen=True)
class Record:
    """One training image.

    Attributes:
        sha256: hex sha256 of the encoded image bytes.
        label: 1 roadwork, 0 none.
        source: the SourceSpec name it came from.
        origin: REAL or SYNTHETIC.
        ref: how to load the bytes again.
        features: backbone features already computed (logged samples carry the serving engine's),
            or None; not part of equality.
        caption: what the source says the image shows (NATIX's `scene_description`), or None;
            synthetic prompts start from it (svd.train.synth.prompts). Not part of equality.
    """

    sha256: str
    label: int
    source: str
    origin: str
    ref: ImageRef
    features: np.ndarray | None = field(default=None, compare=False, repr=False)
    caption: str | None = field(default=None, compare=False, repr=False)

    def read(self) -> bytes:
        return read_records([self])[0]


@dataclass
class SourceScan:
    """What scanning one source found: its records in order and the rows skipped, by reason."""

    spec: SourceSpec
    records: list[Record] = field(default_factory=list)
    rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_records(records: Sequence[Record]) -> list[bytes]:
    """The encoded images of the records, in order, each checked against its hash.

    Raises:
        SourceError: an image is gone or changed since its source was scanned.
    """
    blobs = read_images([r.ref for r in records])
    for record, blob in zip(records, blobs, strict=True):
        if image_sha256(blob) != record.sha256:
            raise SourceError(
                f"source {record.source}: image {record.sha256} changed since it was scanned ({record.ref})"
            )
    return blobs


def read_images(refs: Sequence[ImageRef]) -> list[bytes]:
    """The bytes of each ref, in order; parquet row groups are read once however many rows are asked of them."""
    import pyarrow.parquet as pq

    groups: dict[tuple[Path, int, str], list[Any]] = {}
    for ref in refs:
        if isinstance(ref, ParquetRef):
            groups.setdefault((ref.path, ref.row_group, ref.column), [])
    for path, group, column in groups:
        values = pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).to_pylist()
        groups[(path, group, column)] = values
    out = []
    for ref in refs:
        if isinstance(ref, ParquetRef):
            data = image_bytes(groups[(ref.path, ref.row_group, ref.column)][ref.row])
            if data is None:
                raise SourceError(f"{ref.path}: row {ref.row} of row group {ref.row_group} has no readable image")
            out.append(data)
        else:
            out.append(ref.read())
    return out


def image_bytes(value: Any) -> bytes | None:
    """The encoded image in a parquet cell, the validator's way, or None when there is none PIL can open."""
    if isinstance(value, dict):
        key = next((k for k in value if "bytes" in k.lower() or "image" in k.lower()), None)
        value = value[key] if key is not None else None
    if isinstance(value, str):
        value = value.encode("ascii", errors="ignore")
    if not isinstance(value, bytes | bytearray) or not value:
        return None
    data = bytes(value)
    if _opens(data):
        return data
    try:
        decoded = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        return None
    return decoded if _opens(decoded) else None


def _opens(data: bytes) -> bool:
    # Image.open reads the header only: cheap, and enough to tell an image from garbage.
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        return False


def disagreement(label: int, description: Any) -> str | None:
    """The validator's skip rule (image_cache.py sample()): why a row is skipped, or None to keep it."""
    if description and label == 0:
        return "description_with_label_0"
    if not description and label == 1:
        return "no_description_with_label_1"
    return None


def scan_natix_parquet(spec: SourceSpec, hub_cache: Path | None = None) -> SourceScan:
    """Records of every *.parquet below the spec's directory or cached hub snapshot, in path order."""
    root = spec.path if spec.path is not None else resolve_hub_dataset(spec.repo_id or "", spec.revision, hub_cache)
    if not root.is_dir():
        raise SourceError(f"source {spec.name}: {root} is not a directory")
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise SourceError(f"source {spec.name}: no *.parquet files under {root}")
    scan = SourceScan(spec)
    for path in files:
        _scan_parquet_file(path, spec, scan)
    return scan


def _scan_parquet_file(path: Path, spec: SourceSpec, scan: SourceScan) -> None:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    image_col = next((n for n in names if "image" in n.lower()), None)
    if image_col is None or "label" not in names:
        raise SourceError(f"source {spec.name}: {path} has no image column or no label column (columns: {names})")
    described = "scene_description" in names
    columns = [image_col, "label"] + (["scene_description"] if described else [])
    for group in range(pf.num_row_groups):
        table = pf.read_row_group(group, columns=columns).to_pydict()
        descriptions = table["scene_description"] if described else [None] * len(table["label"])
        for row, (value, label, text) in enumerate(zip(table[image_col], table["label"], descriptions, strict=True)):
            scan.rows += 1
            reason = _row_problem(label, text, described)
            data = image_bytes(value) if reason is None else None
            if reason is None and data is None:
                reason = "no_image"
            if reason is not None:
                scan.skipped[reason] += 1
                continue
            assert data is not None
            ref = ParquetRef(path, group, row, image_col)
            caption = text.strip() if isinstance(text, str) and text.strip() else None
            scan.records.append(Record(image_sha256(data), int(label), spec.name, spec.origin, ref, caption=caption))


def _row_problem(label: Any, description: Any, described: bool) -> str | None:
    if isinstance(label, bool) or label not in (0, 1):
        return "bad_label"
    return disagreement(int(label), description) if described else None


def scan_image_folder(spec: SourceSpec, hub_cache: Path | None = None) -> SourceScan:
    """Records of the images under <path>/<class folder>/, sorted by path; other folders are counted and ignored."""
    root = spec.path
    if root is None or not root.is_dir():
        raise SourceError(f"source {spec.name}: {root} is not a directory")
    scan = SourceScan(spec)
    classes = [(d, CLASS_FOLDERS.get(d.name.lower())) for d in sorted(root.iterdir()) if d.is_dir()]
    if not any(label is not None for _, label in classes):
        raise SourceError(f"source {spec.name}: {root} has no class folder (0/none or 1/roadwork)")
    for folder, label in classes:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if label is None:
            scan.skipped["unknown_class_folder"] += len(files)
            scan.rows += len(files)
            continue
        for path in files:
            scan.rows += 1
            data = path.read_bytes()
            if not _opens(data):
                scan.skipped["no_image"] += 1
                continue
            scan.records.append(Record(image_sha256(data), label, spec.name, spec.origin, FileRef(path)))
    return scan


def resolve_hub_dataset(repo_id: str, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """The local snapshot folder of a dataset repo in the Hugging Face cache; never downloads.

    Raises:
        SourceError: the repo (or that revision) is not in the cache; the message says how to fetch it.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, repo_type="dataset", revision=revision, cache_dir=cache_dir, local_files_only=True
            )
        )
    except (OSError, ValueError) as exc:  # LocalEntryNotFoundError is an OSError; a malformed id a ValueError
        where = cache_dir or "the default Hugging Face cache (HF_HUB_CACHE)"
        rev = f" at revision {revision}" if revision else ""
        raise SourceError(
            f"dataset {repo_id}{rev} is not in {where}; svd never downloads it. Fetch it once on this box: "
            + HUB_FETCH_HINT.format(repo=repo_id)
        ) from exc


Scanner = Callable[[SourceSpec, "Path | None"], SourceScan]
# Source kinds and how to scan them; a further kind (logged samples) registers here.
SCANNERS: dict[str, Scanner] = {NATIX_PARQUET: scan_natix_parquet, IMAGE_FOLDER: scan_image_folder}


def configured_sources(cfg: Config) -> list[SourceSpec]:
    """The config's [[train.sources]] as scanners take them, in order, named by kind and position."""
    specs = []
    for i, src in enumerate(cfg.train.sources):
        path = cfg.source_path(src.path) if src.path else None
        specs.append(SourceSpec(f"{src.kind}-{i}", src.kind, path, src.repo or None, None, src.weight, src.synthetic))
    return specs


def scan_source(spec: SourceSpec, hub_cache: Path | None = None) -> SourceScan:
    """Scans one source with the scanner of its kind.

    Raises:
        SourceError: the source cannot be read.
        ValueError: no scanner for its kind.
    """
    scanner = SCANNERS.get(spec.kind)
    if scanner is None:
        raise ValueError(f"source {spec.name}: unknown kind {spec.kind!r} (known: {sorted(SCANNERS)})")
    return scanner(spec, hub_cache)
