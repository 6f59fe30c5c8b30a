"""Dataset sources: JSONL conversations, caption lists and webdataset shards -> parseable records."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from orion_mllm.data.entries import DatasetEntry
from orion_mllm.data.records import parse_conversation
from orion_mllm.data.sources import (
    CaptionSource,
    DataError,
    DatasetSource,
    RawSample,
    expand_braces,
    open_dataset,
)
from orion_mllm.sequence import ImagePart, TextPart


def entry(path: str, fmt: str = "conversations", **kw) -> DatasetEntry:
    return DatasetEntry(
        name=kw.pop("name", "ds"), path=path, format=fmt, task=kw.pop("task", "mixed"), weight=1.0, **kw
    )


def png_bytes(size=(12, 8), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def images_of(record) -> list:
    return [p.image for m in parse_conversation(record) for p in m.parts if isinstance(p, ImagePart)]


def user_text(record) -> str:
    messages = parse_conversation(record)
    return "".join(p.text for m in messages if m.role == "user" for p in m.parts if isinstance(p, TextPart))


# ----------------------------------------------------------------------------- conversations

LLAVA = {
    "id": "a",
    "image": "imgs/cat.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A cat."},
    ],
}
SWIFT = {
    "messages": [
        {"role": "user", "content": "<image><image>Compare."},
        {"role": "assistant", "content": "Same."},
    ],
    "images": ["imgs/a.png", "/abs/b.png"],
}
STRUCTURED = {
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Draw a cat."}]},
        {"role": "assistant", "content": [{"type": "image", "image": "gen/cat.png"}]},
    ]
}


def test_conversations_roundtrip_and_resolve_against_file_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_lines(
        data / "train.jsonl", [json.dumps(LLAVA), "", "   ", json.dumps(SWIFT), json.dumps(STRUCTURED)]
    )
    src = open_dataset(entry("data/train.jsonl", task="understanding"), tmp_path)
    assert isinstance(src, DatasetSource)
    assert len(src) == 3  # blank lines are not records
    assert src.name == "ds" and src.task == "understanding"

    first = src.get(0)
    assert isinstance(first, RawSample)
    assert first.source == f"{data / 'train.jsonl'}:1"
    assert first.record["image"] == str(data / "imgs/cat.png")
    assert first.record["conversations"] == LLAVA["conversations"]
    assert LLAVA["image"] == "imgs/cat.png"  # a copy was changed, not the input
    assert images_of(first.record) == [str(data / "imgs/cat.png")]

    second = src.get(1)
    assert second.source.endswith("train.jsonl:4")  # line numbers count the blank lines
    assert images_of(second.record) == [str(data / "imgs/a.png"), "/abs/b.png"]

    third = src.get(2)
    assert images_of(third.record) == [str(data / "gen/cat.png")]
    assert all(Path(p).is_absolute() for p in images_of(third.record))


def test_conversations_image_root(tmp_path):
    write_lines(tmp_path / "train.jsonl", [json.dumps(LLAVA), json.dumps(STRUCTURED)])
    src = open_dataset(entry("train.jsonl", image_root="pictures"), tmp_path)
    assert images_of(src.get(0).record) == [str(tmp_path / "pictures/imgs/cat.png")]
    assert images_of(src.get(1).record) == [str(tmp_path / "pictures/gen/cat.png")]
    absolute = open_dataset(entry(str(tmp_path / "train.jsonl"), image_root=str(tmp_path / "x")), None)
    assert images_of(absolute.get(0).record) == [str(tmp_path / "x/imgs/cat.png")]


def test_conversations_bad_lines(tmp_path):
    path = write_lines(
        tmp_path / "bad.jsonl",
        [json.dumps(SWIFT), "", '{"messages": [', "[1, 2]", json.dumps({"messages": "nope"})],
    )
    src = open_dataset(entry(str(path)), None)
    assert len(src) == 4
    src.get(0)
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        src.get(1)
    with pytest.raises(DataError, match=rf"{path}:4: not valid JSON \(expected an object"):
        src.get(2)
    with pytest.raises(DataError, match=rf"{path}:5: .*'messages' must be a list"):
        src.get(3)
    with pytest.raises(IndexError):
        src.get(4)


def test_conversations_selected_by_qtype(tmp_path):
    """``qtypes`` keeps only the records of those question types (a curriculum phase's data), in file
    order; a line that cannot be read stays in, so that it fails by name like any bad line."""
    mcq, colour = {**LLAVA, "qtype": "mcq"}, {**LLAVA, "qtype": "colour"}
    lines = [json.dumps({**colour, "id": "c0"}), json.dumps({**mcq, "id": "m0"}), "{oops",
             json.dumps(LLAVA), json.dumps({**mcq, "id": "m1"})]  # fmt: skip
    path = write_lines(tmp_path / "und.jsonl", lines)
    src = open_dataset(entry("und.jsonl", qtypes=["mcq"]), tmp_path)
    assert len(src) == 3
    assert [src.get(i).record["id"] for i in (0, 2)] == ["m0", "m1"]
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        src.get(1)
    with pytest.raises(IndexError, match="'ds'"):
        src.get(3)
    assert len(open_dataset(entry("und.jsonl", qtypes=["mcq", "colour"]), tmp_path)) == 4
    assert len(open_dataset(entry("und.jsonl"), tmp_path)) == 5
    with pytest.raises(ValueError, match=r"'ds': no record of .*und\.jsonl has a qtype in \['count'\]"):
        open_dataset(entry("und.jsonl", qtypes=["count"]), tmp_path)
    with pytest.raises(ValueError, match="qtypes selects conversation records, not captions"):
        entry("caps.txt", "captions", qtypes=["mcq"])


def test_conversations_survive_pickling_and_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(SWIFT).encode() + b"\n" + json.dumps(LLAVA).encode())
    src = open_dataset(entry(str(path)), None)
    assert len(src) == 2
    assert src.get(0).record["messages"] == SWIFT["messages"]
    clone = pickle.loads(pickle.dumps(src))
    assert clone.get(1).record == src.get(1).record


def test_missing_file_names_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'ds'.*nope\.jsonl"):
        open_dataset(entry("nope.jsonl"), tmp_path)
    with pytest.raises(FileNotFoundError, match="'caps'"):
        open_dataset(entry("nope.txt", "captions", name="caps"), tmp_path)


# ----------------------------------------------------------------------------- captions


def test_captions_txt(tmp_path):
    path = write_lines(
        tmp_path / "caps.txt",
        ["img/0.png\tA red circle.", "", "/abs/1.png\ta blue square", "no tab here", "img/2.png\t  ."],
    )
    src = open_dataset(entry("caps.txt", "captions", task="generation"), tmp_path, seed=3)
    assert len(src) == 4
    s0 = src.get(0)
    assert s0.source == f"{path}:1"
    messages = parse_conversation(s0.record)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert "a red circle" in user_text(s0.record)
    assert messages[1].parts == (ImagePart(str(tmp_path / "img/0.png")),)
    assert images_of(src.get(1).record) == ["/abs/1.png"]
    assert "a blue square" in user_text(src.get(1).record)
    with pytest.raises(DataError, match=rf"{path}:4: .*no tab"):
        src.get(2)
    with pytest.raises(DataError, match=rf"{path}:5: empty caption"):
        src.get(3)


def test_captions_deterministic_per_seed_and_index(tmp_path):
    lines = [f"img/{i}.png\ta shape number {i}" for i in range(40)]
    write_lines(tmp_path / "caps.tsv", lines)
    e = entry("caps.tsv", "captions")
    a = open_dataset(e, tmp_path, seed=0)
    b = open_dataset(e, tmp_path, seed=0)
    c = open_dataset(e, tmp_path, seed=1)
    prompts_a = [user_text(a.get(i).record) for i in range(40)]
    assert prompts_a == [user_text(b.get(i).record) for i in range(40)]
    assert prompts_a == [user_text(a.get(i).record) for i in range(40)]  # repeatable reads
    assert prompts_a != [user_text(c.get(i).record) for i in range(40)]
    assert len({p.replace(str(i), "") for i, p in enumerate(prompts_a)}) > 3  # templates vary


def test_captions_jsonl(tmp_path):
    path = write_lines(
        tmp_path / "caps.jsonl",
        [
            json.dumps({"image": "x.png", "caption": "Two green triangles"}),
            json.dumps({"image": "y.png"}),
            json.dumps({"image": "z.png", "caption": ""}),
            "not json",
        ],
    )
    src = open_dataset(entry("caps.jsonl", "captions", image_root="imgs"), tmp_path)
    rec = src.get(0).record
    assert "two green triangles" in user_text(rec)
    assert images_of(rec) == [str(tmp_path / "imgs/x.png")]
    with pytest.raises(DataError, match=rf"{path}:2: missing key\(s\) \['caption'\]"):
        src.get(1)
    with pytest.raises(DataError, match=rf"{path}:3: empty caption"):
        src.get(2)
    with pytest.raises(DataError, match=rf"{path}:4: not valid JSON"):
        src.get(3)


def test_caption_file_suffix_checked(tmp_path):
    (tmp_path / "caps.csv").write_text("a.png,b\n")
    with pytest.raises(ValueError, match="must end in"):
        open_dataset(entry("caps.csv", "captions"), tmp_path)
    assert CaptionSource  # exported for direct use


# ----------------------------------------------------------------------------- webdataset


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data)
    return path


def test_expand_braces():
    assert expand_braces("s/{000..003}.tar") == [f"s/{i:03d}.tar" for i in range(4)]
    assert expand_braces("s/{8..11}.tar") == ["s/8.tar", "s/9.tar", "s/10.tar", "s/11.tar"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError):
        expand_braces("s/{x}.tar")


def test_webdataset_samples(tmp_path):
    make_shard(
        tmp_path / "shards/00000.tar",
        {
            "s0": {"png": png_bytes((16, 10)), "txt": b"A red rectangle."},
            "dir/s1.v2": {"jpg": _jpeg_bytes(), "json": json.dumps({"caption": "a photo"}).encode()},
        },
    )
    make_shard(
        tmp_path / "shards/00001.tar",
        {
            "s2": {"webp": _webp_bytes(), "json": json.dumps({"text": "a webp picture"}).encode()},
            "s3": {"txt": b"no image here"},
            "s4": {"png": png_bytes()},
            "s5": {"png": b"\x89PNG\r\n\x1a\nthis is not a png", "txt": b"broken"},
        },
    )
    src = open_dataset(entry("shards/{00000..00001}.tar", "webdataset", task="generation"), tmp_path)
    assert len(src) == 6  # bad samples keep their index
    s0 = src.get(0)
    assert s0.source == f"{tmp_path / 'shards/00000.tar'}:s0"
    (image,) = images_of(s0.record)
    assert isinstance(image, Image.Image) and image.size == (16, 10)
    assert "a red rectangle" in user_text(s0.record)
    assert [m.role for m in parse_conversation(s0.record)] == ["user", "assistant"]

    s1 = src.get(1)
    assert s1.source.endswith("00000.tar:dir/s1")  # key: up to the first '.' of the basename
    assert images_of(s1.record)[0].size == (20, 12)
    assert "a photo" in user_text(s1.record)
    assert "a webp picture" in user_text(src.get(2).record)

    shard1 = tmp_path / "shards/00001.tar"
    with pytest.raises(DataError, match=rf"{shard1}:s3: no image"):
        src.get(3)
    with pytest.raises(DataError, match=rf"{shard1}:s4: no caption"):
        src.get(4)
    with pytest.raises(DataError, match=rf"{shard1}:s5: cannot decode image"):
        src.get(5)

    # Picklable (DataLoader workers) and gives the same samples.
    clone = pickle.loads(pickle.dumps(src))
    assert user_text(clone.get(0).record) == user_text(s0.record)
    assert images_of(clone.get(2).record)[0].size == (9, 9)


def test_webdataset_rejects_compressed_and_truncated_shards(tmp_path):
    path = tmp_path / "z.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "a.png", png_bytes())
        add_member(tar, "a.txt", b"a cat")
    with pytest.raises(DataError, match=r"z\.tar\.gz: compressed shard"):
        open_dataset(entry(str(path), "webdataset"), None)
    shard = make_shard(tmp_path / "t.tar", {"a": {"txt": b"a cat", "png": png_bytes((64, 64))}})
    src = open_dataset(entry(str(shard), "webdataset"), None)
    with shard.open("r+b") as handle:  # cut the shard inside the image member after indexing
        handle.truncate(1100)
    with pytest.raises(DataError, match=r"t\.tar:a: shard ends early"):
        src.get(0)


def test_webdataset_glob_and_missing(tmp_path):
    for i in range(3):
        make_shard(tmp_path / f"wds/part-{i}.tar", {f"k{i}": {"png": png_bytes(), "txt": b"a dot"}})
    src = open_dataset(entry(str(tmp_path / "wds/part-*.tar"), "webdataset"), None)
    assert len(src) == 3
    assert [src.get(i).source.rsplit(":", 1)[1] for i in range(3)] == ["k0", "k1", "k2"]
    with pytest.raises(FileNotFoundError, match=r"'shapes'.*part-3\.tar"):
        open_dataset(entry("wds/part-{0..3}.tar", "webdataset", name="shapes"), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'shapes'"):
        open_dataset(entry("none/*.tar", "webdataset", name="shapes"), tmp_path)


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _webp_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (9, 9), (10, 10, 200)).save(buf, format="WEBP")
    return buf.getvalue()
