#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz corpora (committed; rerun
only to change them). Fuzzing adds to the corpora; see tests/fuzz/README.md."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# core_model_fuzzer: [app][opcode % 15][operation bytes...] per step.
INIT, OPEN, CLOSE, MAKE, DROP, ANSWER, DEALLOC, STATUS, NEWCALLS, SHUTDOWN, OFFER, SETSTATE, FORCE, TIME, KEEPALIVE = range(15)
MODEL = {
    "lifecycle": [0, INIT, 1, 0, OPEN, 0, 3, 0, MAKE, 0, 1, 0, STATUS, 0, 0, DROP, 0,
                  0, DEALLOC, 0, 0, CLOSE, 0, 0, SHUTDOWN],
    "monitor": [0, INIT, 1, 1, INIT, 1, 1, OPEN, 0, 2, 0, OPEN, 0, 1, 0, MAKE, 0, 1,
                1, STATUS, 1, 0, CLOSE, 0, 1, DROP, 1],
    "inbound": [0, INIT, 1, 0, OPEN, 1, 1, 1, INIT, 1, 1, OPEN, 1, 2, 0, OFFER, 1, 0,
                ANSWER, 0, 0, SETSTATE, 2, 9, 0, FORCE, 1, 1, NEWCALLS, 0],
    "quota": [0, INIT, 1] + [0, OPEN, 0, 1] * 4 + [0, MAKE, 0, 1] * 6 + [2, OFFER, 0] * 6,
    "lease": [0, INIT, 1, 0, OPEN, 0, 3, 0, MAKE, 0, 1, 1, INIT, 1, 1, OPEN, 0, 2,
              2, TIME, 12, 1, KEEPALIVE, 0, MAKE, 0, 1],
    "idempotent": [0, INIT, 1, 0, OPEN, 0, 0, 0, MAKE, 0, 9, 0, MAKE, 0, 9, 0, MAKE, 0, 8,
                   0, TIME, 15, 0, TIME, 15, 0, MAKE, 0, 9],
}

# durable_model_fuzzer: the same steps; an opcode byte of 240 or more
# restarts the core on its store (the app byte before it is ignored).
# Decoding, as the harness does it: a line pick of 2 is the app's own line
# when it has one; a handle pick of 2 (3 when two apps hold the call) is the
# app's own handle; MakeCall's choice 17 is dest "100" with request id
# "r1", 25 with "r2"; a call-id pick of 2 is the first call.
RESTART = 255
DURABLE = {
    "lifecycle-restart": [0, INIT, 1, 0, OPEN, 0, 1, 0, MAKE, 2, 17, 0, RESTART,
                          0, STATUS, 2, 0, DROP, 2, 0, RESTART, 0, DEALLOC, 2,
                          0, CLOSE, 2, 0, RESTART, 0, SHUTDOWN],
    "idempotent-restart": [0, INIT, 1, 0, OPEN, 0, 1, 0, MAKE, 2, 17, 0, RESTART,
                           0, MAKE, 2, 17, 0, MAKE, 2, 25, 0, RESTART,
                           0, MAKE, 2, 25, 0, MAKE, 2, 17],
    "monitor-restart": [0, INIT, 1, 1, INIT, 1, 0, OPEN, 0, 1, 1, OPEN, 0, 2,
                        0, MAKE, 2, 17, 0, RESTART, 1, STATUS, 3, 0, DROP, 3,
                        0, RESTART, 1, DEALLOC, 3, 1, CLOSE, 4, 0, RESTART,
                        0, SHUTDOWN, 1, SHUTDOWN],
    "inbound-restart": [0, INIT, 1, 0, OPEN, 1, 1, 1, INIT, 1, 1, OPEN, 1, 2,
                        2, OFFER, 1, 0, RESTART, 0, ANSWER, 3, 2, SETSTATE, 2, 15,
                        0, RESTART, 0, DROP, 3, 1, NEWCALLS, 4, 2, FORCE, 1,
                        0, RESTART, 0, SHUTDOWN, 1, SHUTDOWN],
    "void-restart": [0, INIT, 1, 0, OPEN, 0, 1, 0, MAKE, 2, 17, 0, DROP, 2,
                     0, DEALLOC, 2, 0, RESTART, 0, MAKE, 2, 25, 0, STATUS, 2,
                     0, CLOSE, 2, 0, RESTART, 0, TIME, 12, 0, KEEPALIVE],
}

# request_fuzzer: [rpc][length][message bytes] per record.
def varint_field(number, value):
    out = bytearray([number << 3])
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)

def record(rpc, body=b""):
    return bytes([rpc, len(body)]) + body

REQUEST = {
    "lifecycle": record(0, varint_field(1, 1)) + record(2, varint_field(1, 1) + b"\x12\x03100")
                 + record(4, varint_field(1, 1)) + record(7, varint_field(1, 1)),
    "provider": record(11, varint_field(1, 1)) + record(12, varint_field(1, 1) + varint_field(2, 9))
                + record(13, varint_field(1, 0)),
    "list": record(9, varint_field(1, 1)) + record(9, b"\x12\x011") + record(8, varint_field(1, 1)),
    "garbage": record(5, b"\xff\xff\xff\xff") + record(15, b"0" * 48) + record(14, b"\x0a\x01\n"),
}

def write(corpus, seeds):
    directory = os.path.join(HERE, "corpus", corpus)
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(directory, "seed-" + name), "wb") as f:
            f.write(bytes(data))

write("core_model_fuzzer", MODEL)
write("durable_model_fuzzer", DURABLE)
write("request_fuzzer", REQUEST)
print("seeds written", file=sys.stderr)
