"""Read the records of an offline W&B run file (LevelDB log framing of wandb_internal Record protobufs)."""

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # crc32c (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        block_left = BLOCK - pos % BLOCK
        if block_left < HEADER:  # trailer padding of a block
            pos += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # zero padding up to the block's end: records go on in the next block
            pos += block_left - HEADER
            pending = b""
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def summarize(path: Path) -> dict:
    """{"config": {key: json}, "history": [{key: json}], "summary": {key: json}} of a run file."""
    import json

    out = {"config": {}, "history": [], "summary": {}}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)
