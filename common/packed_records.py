"""A message's arrays as one object on the wire, and back, bit for bit.

In a deployment Flower moves every Array of a message as objects of its own (the array and its
chunks), one HTTPS request each between SuperNode and SuperLink, on both legs of the trip and
on the 2 cores a site may also train on. The default model's adapter is 26 small arrays: a train
reply took ~0.6 s to push where an evaluate reply (metrics only) took 0.05 s (docs/benchmarks.md,
"Where a message's seconds go"). Packed, each ArrayRecord of more than one array travels as a
single Array whose bytes are its arrays' bytes end to end; a ConfigRecord holds each one's
layout (name, dtype, shape, stype, length). The server packs what it sends (server/prompt_grid.py);
a site that receives a packed message unpacks it before any handler or mod sees it and packs its
reply the same way (client/entry.py). Imports no torch or numpy: the ClientApp that only forwards
to a site runtime stays light.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.errors import FedLoraError

PACKED_KEY = "fedlora-packed"  # the ConfigRecord: record key -> its arrays' layout (JSON)
PACKED_ARRAY = "packed"
PACKED_STYPE = "fedlora.packed"


def pack(content: RecordDict) -> RecordDict:
    """`content` with each ArrayRecord of several arrays as one array (unchanged otherwise)."""
    if PACKED_KEY in content:
        raise FedLoraError(f"a message's record named {PACKED_KEY!r} is fedlora's own")
    packed, layouts = RecordDict(), {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord) and len(record) > 1:
            layouts[key] = json.dumps([[name, array.dtype, list(array.shape), array.stype,
                                        len(array.data)] for name, array in record.items()])
            blob = b"".join(array.data for array in record.values())
            record = ArrayRecord({PACKED_ARRAY: Array(dtype="uint8", shape=(len(blob),),
                                                      stype=PACKED_STYPE, data=blob)})
        packed[key] = record
    if layouts:
        packed[PACKED_KEY] = ConfigRecord(layouts)
    return packed


def is_packed(content: RecordDict) -> bool:
    return PACKED_KEY in content


def unpack(content: RecordDict) -> RecordDict:
    """What `pack` was given; FedLoraError (one line) when the packed records do not add up."""
    if not is_packed(content):
        return content
    layouts = content[PACKED_KEY]
    if not isinstance(layouts, ConfigRecord):
        raise FedLoraError(f"packed message: {PACKED_KEY!r} is not a ConfigRecord")
    unpacked = RecordDict()
    for key, record in content.items():
        if key == PACKED_KEY:
            continue
        if key in layouts:
            record = _unpacked_record(key, record, layouts[key])
        unpacked[key] = record
    missing = set(layouts) - set(content)
    if missing:
        raise FedLoraError(f"packed message: no record {sorted(missing)[0]!r} for its layout")
    return unpacked


def _unpacked_record(key: str, record, layout_json) -> ArrayRecord:
    if not (isinstance(record, ArrayRecord) and list(record) == [PACKED_ARRAY]
            and record[PACKED_ARRAY].stype == PACKED_STYPE):
        raise FedLoraError(f"packed message: record {key!r} is not one packed array")
    try:
        layout = json.loads(layout_json)
        entries = [(str(name), str(dtype), tuple(int(n) for n in shape), str(stype), int(size))
                   for name, dtype, shape, stype, size in layout]
    except (TypeError, ValueError) as err:
        raise FedLoraError(f"packed message: record {key!r} has an unreadable layout ({err})"
                           ) from None
    blob = record[PACKED_ARRAY].data
    if sum(size for *_, size in entries) != len(blob) or any(e[4] < 0 for e in entries):
        raise FedLoraError(f"packed message: record {key!r} holds {len(blob)} bytes, its "
                           f"layout says {sum(size for *_, size in entries)}")
    arrays, offset = OrderedDict(), 0
    for name, dtype, shape, stype, size in entries:
        arrays[name] = Array(dtype=dtype, shape=shape, stype=stype, data=blob[offset:offset + size])
        offset += size
    if len(arrays) != len(entries):
        raise FedLoraError(f"packed message: record {key!r} names an array twice")
    return ArrayRecord(arrays)
