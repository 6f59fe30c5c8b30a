"""Read training records from the formats users have, as conversation records with absolute image paths.

One ``DatasetSource`` per recipe ``data`` entry (``orion_mllm.data.entries.DatasetEntry``), opened
with ``open_dataset(entry, data_root)``. A source is a random-access list of ``RawSample``: a record
that ``orion_mllm.data.records.parse_conversation`` accepts, plus where it came from (``FILE:LINE`` or
``SHARD.tar:KEY``) for error messages. Formats:

- ``conversations``: JSONL, one record per line, LLaVA (``conversations`` + ``image``/``images``) or
  ms-swift (``messages`` + ``images``) form. Relative image paths are resolved against the entry's
  ``image_root`` (itself relative to ``data_root``) or else the JSONL file's folder.
- ``captions``: ``.txt``/``.tsv`` lines ``image_path<TAB>caption`` or ``.jsonl`` objects
  ``{"image", "caption"}``; each becomes a text-to-image conversation whose request is drawn from
  ``orion_mllm.data.templates`` (deterministic per (seed, index)).
- ``webdataset``: plain tar shards (``shards/{00000..00009}.tar`` or a glob); a sample is the members
  sharing a key, with one image (jpg/jpeg/png/webp) and a caption (``.txt``, or ``.json`` with
  ``caption``/``text``). The image is decoded here and handed on as a PIL image.

Opening indexes the data once (byte offsets of lines, tar member names) and keeps no record text in
memory. A missing file or shard is a config error and fails at open (``FileNotFoundError``); a bad
record fails on ``get`` with ``DataError`` naming the file and line or shard and key, so a trainer
can skip it and keep going. Images of path-based records are not loaded here: ``SequenceBuilder``
loads them and raises ``ImageLoadError`` naming the file.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import io
import json
import os
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from orion_mllm.data.entries import DatasetEntry
from orion_mllm.data.records import parse_conversation
from orion_mllm.data.templates import generation_prompt
from orion_mllm.sequence import ConversationError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a key has several
CAPTION_EXTENSIONS = ("txt", "json")
CAPTION_FILE_SUFFIXES = (".txt", ".tsv", ".jsonl")


class DataError(ValueError):
    """A bad record: the message names the file (and line or tar member) and the reason."""


@dataclass(frozen=True)
class RawSample:
    record: dict[str, Any]  # a conversation record that orion_mllm.data.records.parse_conversation accepts
    source: str  # where it came from, e.g. "/abs/train.jsonl:17" or "/abs/shard-0003.tar:sample_0042"


@runtime_checkable
class DatasetSource(Protocol):
    """A random-access dataset of conversation records; ``get`` raises ``DataError`` for a bad one."""

    name: str
    task: str

    def __len__(self) -> int: ...

    def get(self, index: int) -> RawSample: ...


# ----------------------------------------------------------------------------- helpers


def _resolve(path: str | Path, root: str | Path | None) -> Path:
    """``path`` if absolute, else ``root / path`` (``root`` None: the working directory); absolute."""
    p = Path(path).expanduser()
    if not p.is_absolute() and root is not None:
        p = Path(root).expanduser() / p
    return p.absolute()


def _image_root(entry: DatasetEntry, data_root: str | Path | None, data_file: Path) -> Path:
    if entry.image_root is not None:
        return _resolve(entry.image_root, data_root)
    return data_file.parent


def _resolve_image(value: Any, root: Path) -> Any:
    """Absolute path string for a relative path string; anything else (PIL, URL, absolute) unchanged."""
    if not isinstance(value, (str, Path)) or (isinstance(value, str) and "://" in value):
        return value
    p = Path(value)
    return str(p if p.is_absolute() else root / p)


def _resolve_record_images(record: dict[str, Any], root: Path) -> dict[str, Any]:
    """A copy of ``record`` with every image path that parse_conversation would read made absolute.

    parse_conversation takes images from the top-level ``images`` (else ``image``) field, a string or
    a list, and from structured content parts ``{"type": "image", "image": ...}`` (or an untyped part
    with an ``image`` key) in ``messages`` or LLaVA ``conversations`` (``value``). Shapes it would
    reject are left alone so that its own error reaches the user.
    """
    out = copy.deepcopy(record)  # the caller may cache records; never mutate what we were given
    for key in ("images", "image"):
        found = out.get(key)
        if isinstance(found, (str, Path)):
            out[key] = _resolve_image(found, root)
        elif isinstance(found, list):
            out[key] = [_resolve_image(v, root) for v in found]
    for turns_key, content_key in (("messages", "content"), ("conversations", "value")):
        turns = out.get(turns_key)
        if not isinstance(turns, list):
            continue
        for turn in turns:
            content = turn.get(content_key) if isinstance(turn, dict) else None
            if not isinstance(content, list):
                continue
            for part in content:
                if not isinstance(part, dict) or "image" not in part:
                    continue
                if part.get("type") in ("image", None):
                    part["image"] = _resolve_image(part["image"], root)
    return out


def _stable_seed(*values: object) -> int:
    """A 64-bit seed from values, stable across processes (Python's ``hash`` is salted per process)."""
    text = "/".join(str(v) for v in values).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def generation_record(caption: str, image: Any, *, seed: int, index: int) -> dict[str, Any]:
    """A text-to-image conversation: a templated request for ``caption``, answered with ``image``.

    The template is drawn with ``random.Random`` seeded from (seed, index), so a record reads the same
    in every epoch, worker and resumed run. Raises ``ValueError`` for an empty caption.
    """
    prompt = generation_prompt(caption, random.Random(_stable_seed(seed, index)))
    return {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "image", "image": image}]},
        ]
    }


class _LineIndex:
    """Byte offsets and 1-based line numbers of the non-blank lines of a text file.

    Built by reading the file once in binary; only two int64 arrays stay in memory (16 bytes per
    record). Lines are read back with ``os.pread``, which takes an explicit offset: a descriptor
    inherited by forked DataLoader workers has one shared file position, and a seek-then-read there
    would race between workers.
    """

    def __init__(self, path: Path):
        self.path = path
        offsets: list[int] = []
        linenos: list[int] = []
        pos = 0
        with path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                if raw.strip():
                    offsets.append(pos)
                    linenos.append(lineno)
                pos += len(raw)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.linenos = np.asarray(linenos, dtype=np.int64)
        self.file_size = pos
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None  # descriptors do not travel; reopened on first read
        return state

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):  # interpreter shutdown may have closed it already
                os.close(self._fd)

    def read(self, index: int) -> tuple[str, str]:
        """(``FILE:LINE``, the decoded line without its newline); DataError if not UTF-8."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range [0, {len(self)})")
        where = f"{self.path}:{int(self.linenos[index])}"
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start = int(self.offsets[index])
        # The line ends at the next newline; the next record's offset is an upper bound (blank lines
        # in between are whitespace, stripped below).
        end = int(self.offsets[index + 1]) if index + 1 < len(self) else self.file_size
        raw = os.pread(self._fd, end - start, start).split(b"\n", 1)[0]
        try:
            # utf-8-sig: a byte-order mark at the start of the file is not part of the first record.
            return where, raw.decode("utf-8-sig").strip()
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from err


def _load_json_line(lines: _LineIndex, index: int) -> tuple[str, dict[str, Any]]:
    where, text = lines.read(index)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not valid JSON (expected an object, got {type(obj).__name__})")
    return where, obj


def _check_record(record: dict[str, Any], where: str) -> None:
    """Parse once here so a structurally bad record is a DataError naming its file and line."""
    try:
        parse_conversation(record, record_id=str(record.get("id", "")))
    except (ConversationError, TypeError, AttributeError) as err:  # the latter two: unforeseen shapes
        raise DataError(f"{where}: {err}") from err


# ----------------------------------------------------------------------------- sources


class ConversationSource:
    """A JSONL file of conversation records (LLaVA or ms-swift form)."""

    def __init__(
        self, name: str, task: str, path: Path, image_root: Path, *, qtypes: tuple[str, ...] | None = None
    ):
        self.name, self.task = name, task
        self.path, self.image_root = path, image_root
        self._lines = _LineIndex(path)
        # Line positions of the selected records (None: every line). Selecting reads each record once.
        self._rows = None if qtypes is None else self._select(qtypes)

    def _select(self, qtypes: tuple[str, ...]) -> np.ndarray:
        rows, matched = [], 0
        for i in range(len(self._lines)):
            try:
                qtype = _load_json_line(self._lines, i)[1].get("qtype")
            except DataError:
                rows.append(i)  # kept so that reading it fails by name (and is counted) like any bad line
                continue
            if qtype in qtypes:
                rows.append(i)
                matched += 1
        if not matched:
            raise ValueError(f"dataset {self.name!r}: no record of {self.path} has a qtype in {list(qtypes)}")
        return np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._lines) if self._rows is None else len(self._rows)

    def get(self, index: int) -> RawSample:
        if self._rows is not None:
            if not 0 <= index < len(self._rows):
                raise IndexError(f"dataset {self.name!r}: index {index} out of range [0, {len(self._rows)})")
            index = int(self._rows[index])
        where, record = _load_json_line(self._lines, index)
        record = _resolve_record_images(record, self.image_root)
        _check_record(record, where)
        return RawSample(record, where)

    def __repr__(self) -> str:
        return f"ConversationSource({self.name!r}, {self.path}, {len(self)} records)"


class CaptionSource:
    """Image/caption pairs (``.txt``/``.tsv`` with a tab, or ``.jsonl``) as generation conversations."""

    def __init__(self, name: str, task: str, path: Path, image_root: Path, *, seed: int = 0):
        if path.suffix.lower() not in CAPTION_FILE_SUFFIXES:
            raise ValueError(
                f"dataset {name!r}: caption file {path} must end in one of {list(CAPTION_FILE_SUFFIXES)}"
            )
        self.name, self.task, self.seed = name, task, seed
        self.path, self.image_root = path, image_root
        self._jsonl = path.suffix.lower() == ".jsonl"
        self._lines = _LineIndex(path)

    def __len__(self) -> int:
        return len(self._lines)

    def _pair(self, index: int) -> tuple[str, Any, Any]:
        if self._jsonl:
            where, obj = _load_json_line(self._lines, index)
            missing = [k for k in ("image", "caption") if obj.get(k) is None]
            if missing:
                raise DataError(f"{where}: missing key(s) {missing} (expected 'image' and 'caption')")
            return where, obj["image"], obj["caption"]
        where, text = self._lines.read(index)
        image, tab, caption = text.partition("\t")
        if not tab:
            raise DataError(f"{where}: expected 'image_path<TAB>caption', found no tab")
        return where, image.strip(), caption

    def get(self, index: int) -> RawSample:
        where, image, caption = self._pair(index)
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: image must be a non-empty path string, got {image!r}")
        if not isinstance(caption, str) or not caption.strip().rstrip("."):
            raise DataError(f"{where}: empty caption")
        record = generation_record(
            caption, _resolve_image(image, self.image_root), seed=self.seed, index=index
        )
        return RawSample(record, where)

    def __repr__(self) -> str:
        return f"CaptionSource({self.name!r}, {self.path}, {len(self)} records)"


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` (zero-padded to the first bound's width) and ``{a,b}`` groups, in order."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        if int(hi) < int(lo):
            raise ValueError(f"shard pattern {pattern!r}: range {{{body}}} goes down")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: cannot expand {{{body}}} (use {{000..009}} or {{a,b}})")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: key = the member path up to the first '.' of its basename; ext = the rest."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class WebDatasetSource:
    """Tar shards in webdataset layout; each key with an image and a caption is one generation sample.

    Indexing reads each shard's headers once and keeps, per sample, the shard number, the key, and
    where the image and caption members' bytes lie (offset, size; -1 when missing, so the sample
    still has an index and fails on ``get``: indices must not shift when a shard has a bad sample).
    ``get`` reads those bytes with ``os.pread`` on a freshly opened descriptor instead of keeping
    ``TarFile`` objects open: random access over thousands of shards would otherwise exhaust file
    descriptors or rescan a shard's headers on every reopen, and a descriptor-free object is safe to
    pickle, fork into DataLoader workers and share with a prefetch thread. The price: shards must be
    uncompressed ``.tar`` (the webdataset norm; a gzip stream cannot be read at an offset).
    """

    def __init__(self, name: str, task: str, shards: list[Path], *, seed: int = 0):
        self.name, self.task, self.seed = name, task, seed
        self.shards = shards
        self._keys: list[str] = []
        shard_ids: list[int] = []
        spans: list[tuple[int, int, int, int]] = []  # image offset, size, caption offset, size
        self._kinds: list[tuple[str, str]] = []  # (image ext, caption ext), "" when missing
        for shard_index, shard in enumerate(shards):
            for key, image, caption in self._index_shard(shard):
                self._keys.append(key)
                shard_ids.append(shard_index)
                spans.append((*(image[1:] if image else (-1, -1)), *(caption[1:] if caption else (-1, -1))))
                self._kinds.append((image[0] if image else "", caption[0] if caption else ""))
        self._shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self._spans = np.asarray(spans, dtype=np.int64).reshape(-1, 4)

    @staticmethod
    def _index_shard(
        shard: Path,
    ) -> list[tuple[str, tuple[str, int, int] | None, tuple[str, int, int] | None]]:
        with shard.open("rb") as handle:
            magic = handle.read(6)
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":
            raise DataError(
                f"{shard}: compressed shard; random access needs plain .tar shards (decompress it)"
            )
        members: dict[str, dict[str, tuple[str, int, int]]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for info in tar:  # headers only: member data is skipped, not read
                    if not info.isfile():
                        continue
                    key, ext = _split_member(info.name)
                    kind = ext.rpartition(".")[2]  # "v2.jpg" is a jpg
                    # The first member of a kind wins, as a webdataset reader keeps one per extension.
                    members.setdefault(key, {}).setdefault(kind, (ext, info.offset_data, info.size))
        except tarfile.TarError as err:
            raise DataError(f"{shard}: not a readable tar file ({err})") from err
        out = []
        for key, by_kind in members.items():
            image = next((by_kind[e] for e in IMAGE_EXTENSIONS if e in by_kind), None)
            caption = next((by_kind[e] for e in CAPTION_EXTENSIONS if e in by_kind), None)
            out.append((key, image, caption))
        return out

    def __len__(self) -> int:
        return len(self._keys)

    def _read(self, shard: Path, offset: int, size: int, where: str) -> bytes:
        try:
            fd = os.open(shard, os.O_RDONLY)
            try:
                data = os.pread(fd, size, offset)
            finally:
                os.close(fd)
        except OSError as err:
            raise DataError(f"{where}: cannot read shard ({err})") from err
        if len(data) != size:  # the shard was truncated or rewritten since indexing
            raise DataError(f"{where}: shard ends early (read {len(data)} of {size} bytes)")
        return data

    def get(self, index: int) -> RawSample:
        if not 0 <= index < len(self):
            raise IndexError(f"dataset {self.name!r}: index {index} out of range [0, {len(self)})")
        shard = self.shards[int(self._shard_ids[index])]
        where = f"{shard}:{self._keys[index]}"
        image_ext, caption_ext = self._kinds[index]
        image_off, image_size, caption_off, caption_size = (int(v) for v in self._spans[index])
        if not image_ext:
            raise DataError(f"{where}: no image member (expected one of {list(IMAGE_EXTENSIONS)})")
        if not caption_ext:
            raise DataError(f"{where}: no caption member (expected .txt or .json)")
        caption = self._caption(self._read(shard, caption_off, caption_size, where), caption_ext, where)
        data = self._read(shard, image_off, image_size, where)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now: a corrupt member fails here, named, not inside the processor
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{where}: cannot decode image .{image_ext} ({err})") from err
        record = generation_record(caption, image, seed=self.seed, index=index)
        return RawSample(record, where)

    @staticmethod
    def _caption(data: bytes, ext: str, where: str) -> str:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: caption .{ext} is not UTF-8") from err
        if ext.endswith("json"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: caption .{ext} is not valid JSON ({err.msg})") from err
            found = obj.get("caption", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(found, str):
                raise DataError(f"{where}: caption .{ext} has no string 'caption' or 'text' key")
            text = found
        if not text.strip().rstrip("."):
            raise DataError(f"{where}: empty caption")
        return text.strip()

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.name!r}, {len(self.shards)} shards, {len(self)} samples)"


def _find_shards(name: str, pattern: str) -> list[Path]:
    shards: list[Path] = []
    missing: list[str] = []
    for expanded in expand_braces(pattern):
        if glob.has_magic(expanded):
            found = sorted(glob.glob(expanded))
            if not found:
                missing.append(expanded)
            shards.extend(Path(f) for f in found)
        elif Path(expanded).is_file():
            shards.append(Path(expanded))
        else:
            missing.append(expanded)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"dataset {name!r}: no shard file at {shown} (pattern {pattern})")
    return shards


def open_dataset(entry: DatasetEntry, data_root: str | Path | None, *, seed: int = 0) -> DatasetSource:
    """Open (and index) the dataset of one recipe ``data`` entry.

    ``entry.path`` and ``entry.image_root`` are relative to ``data_root`` unless absolute. ``seed``
    picks the request templates of caption datasets. Raises ``FileNotFoundError`` naming the dataset
    when its file or shards are missing.
    """
    if entry.format == "webdataset":
        pattern = str(_resolve(entry.path, data_root))
        return WebDatasetSource(entry.name, entry.task, _find_shards(entry.name, pattern), seed=seed)
    path = _resolve(entry.path, data_root)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {entry.name!r}: file not found: {path}")
    image_root = _image_root(entry, data_root, path)
    if entry.format == "captions":
        return CaptionSource(entry.name, entry.task, path, image_root, seed=seed)
    return ConversationSource(entry.name, entry.task, path, image_root, qtypes=entry.qtypes)
