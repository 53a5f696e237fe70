"""The on-disk format of cached training data: ArrayRecord shards of encoded samples.

A prepared dataset is a directory holding
  `data-SSSSS.array_record`  shards; each record is a msgpack map of `caption` (str) and the arrays
                             `latents` (h, w, C), `text` (L, C_text), `text_mask` (L,), each stored as
                             {"dtype": numpy dtype string, "shape": [...], "data": raw bytes};
  `null_caption.npz`         `text` (L, C_text) and `text_mask` (L,) of the empty prompt, for caption dropout
                             and classifier-free guidance;
  `metadata.json`            record count, shapes, the encoders used and the inputs that were skipped.
Shards are written with `group_size:1` so every record is one random-access read.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter

SHARD_SUFFIX = ".array_record"
METADATA = "metadata.json"
NULL_CAPTION = "null_caption.npz"
_ARRAY_KEYS = ("latents", "text", "text_mask")


def shard_name(index: int) -> str:
    return f"data-{index:05d}{SHARD_SUFFIX}"


def _pack_array(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}


def _unpack_array(packed: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(packed["data"], dtype=np.dtype(packed["dtype"])).reshape(packed["shape"])


def encode_record(latents: np.ndarray, text: np.ndarray, text_mask: np.ndarray, caption: str) -> bytes:
    """Serialises one sample: latents (h, w, C), text (L, C_text), text_mask (L,), caption."""
    arrays = {"latents": latents, "text": text, "text_mask": text_mask}
    packed = {key: _pack_array(np.asarray(value)) for key, value in arrays.items()}
    return msgpack.packb({"caption": str(caption), **packed})


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of `encode_record`; raises ValueError when `data` is not a complete record."""
    try:
        packed = msgpack.unpackb(data)
        record = {key: _unpack_array(packed[key]) for key in _ARRAY_KEYS}
        record["caption"] = packed["caption"]
    except Exception as e:  # msgpack and numpy raise several unrelated types on garbage
        raise ValueError(f"not a record ({type(e).__name__}: {e})") from e
    if not isinstance(record["caption"], str):
        raise ValueError(f"expected a str caption, found {type(record['caption']).__name__}")
    return record


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Writes serialised records to an ArrayRecord file atomically; returns how many were written."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = ArrayRecordWriter(str(partial), "group_size:1")
    count = 0
    try:
        for record in records:
            writer.write(record)
            count += 1
    finally:
        writer.close()
    os.replace(partial, path)
    return count


def shard_paths(directory: str | os.PathLike) -> list[str]:
    """The shards of a prepared dataset, in order; an error if there are none."""
    paths = sorted(str(p) for p in Path(directory).glob(f"*{SHARD_SUFFIX}"))
    if not paths:
        raise FileNotFoundError(f"no *{SHARD_SUFFIX} shards in {directory}")
    return paths


def write_null_caption(directory: str | os.PathLike, text: np.ndarray, text_mask: np.ndarray) -> None:
    np.savez(Path(directory) / NULL_CAPTION, text=text, text_mask=text_mask)


def read_null_caption(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt's (text (L, C_text) float32, text_mask (L,) int32) stored with a dataset."""
    with np.load(Path(directory) / NULL_CAPTION) as stored:
        return stored["text"].astype(np.float32), stored["text_mask"].astype(np.int32)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / METADATA).read_text())


def write_metadata(directory: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    (Path(directory) / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


class RecordSource:
    """Random access to the records of several shards, decoded.

    Element i is a dict with float32 `latents` and `text`, int32 `text_mask`, the `caption` and
    `prompt_id` = i. A record that cannot be read or decoded raises ValueError naming its shard and
    its index in that shard.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._shards = []
        for path in self.paths:
            try:
                self._shards.append(ArrayRecordDataSource([path]))
            except Exception as e:
                raise ValueError(f"cannot open shard {path}: {e}") from e
        self._starts = np.cumsum([0] + [len(s) for s in self._shards]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        try:
            record = decode_record(self._shards[shard][local])
        except Exception as e:
            raise ValueError(f"corrupt record {local} in shard {self.paths[shard]}: {e}") from e
        return {
            "latents": np.asarray(record["latents"], np.float32),
            "text": np.asarray(record["text"], np.float32),
            "text_mask": np.asarray(record["text_mask"], np.int32),
            "caption": record["caption"],
            "prompt_id": np.int64(index),
        }

    def __repr__(self) -> str:
        return f"RecordSource({len(self.paths)} shards, {len(self)} records)"
