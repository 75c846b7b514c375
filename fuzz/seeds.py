#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target (run from fuzz/): valid
handshakes, data batches with correct round-end checksums, state records.
The fuzzers mutate these; they are what a real peer sends."""
import os
import struct
import zlib

PS = 4096


def header(kind, length, arg, flags=0):
    return struct.pack("<BBHIQ", kind, flags, 0, length, arg)


def hello(streams=2, regions=((0, 64 * PS), (1 << 20, 64 * PS))):
    body = b"HPMIG\r\n\x1a" + struct.pack("<HHBBHIII", 1, 1, 2, 0, streams, PS, 0, len(regions))
    body += bytes(16) + bytes(32)
    for base, size in regions:
        body += struct.pack("<QQ", base, size)
    return header(1, len(body), 0) + body


def welcome():
    body = struct.pack("<HHI", 1, 0, 0) + bytes(16) + bytes(32)
    return header(2, len(body), 0) + body


def round_of(records, rnd, last=False):
    data = b"".join(records)
    end = header(7, 16, rnd, 1 if last else 0) + struct.pack("<QII", len(records), zlib.crc32(data), 0)
    return data + end


def segment(gpa, payload):
    return header(3, len(payload), gpa) + payload


def zero(gpa):
    return header(4, 0, gpa)


def page(gpa, fill):
    return header(5, PS, gpa) + bytes([fill]) * PS


def words(gpa, mask_bits, payload_words):
    """A Words record (version 4): a bit per 8-byte word of the page, then
    the marked words in order."""
    mask = bytearray(PS // 64)
    for bit in mask_bits:
        mask[bit // 8] |= 1 << (bit % 8)
    body = bytes(mask) + b"".join(w.ljust(8, b"\0") for w in payload_words)
    return header(20, len(body), gpa) + body


def write(target, name, data):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    with open(f"corpus/{target}/{name}", "wb") as f:
        f.write(data)


r0 = round_of([segment(3 * PS + 10, b"hello"), zero(5 * PS), page(7 * PS, 0xAB)], 0)
r1 = round_of([segment(3 * PS + 100, b"\x01" * 8), segment(3 * PS + 200, b"\x02" * 8)], 1, last=True)
write("records", "hello", hello())
write("records", "welcome", welcome())
write("records", "rounds", r0 + r1)
write("records", "proof", header(12, 32, 0) + bytes(32))
write("records", "error", header(11, 12, 1) + b"refused: no!")
write("handshake", "hello", hello()[16:])
write("handshake", "hello4", hello(4, ((0, 1 << 30), (1 << 32, 1 << 30), (8 << 30, 2 << 20)))[16:])
write("handshake", "welcome", welcome()[16:])
write("handshake", "emulated-state", b"hpmig-emulated-v1 workload=sparse vcpus=2 rate=1000")
write("handshake", "kvm-state-empty", b"hpmig-kvm-v1" + struct.pack("<I", 0) + struct.pack("<I", 0))
write("apply", "rounds", b"\x00" + r0 + r1)
write("apply", "rounds-zstd-flag", b"\x01" + r0)
write("apply", "one-segment", b"\x00" + segment(PS, b"x"))
write("apply", "words", b"\x00" + round_of([words(3 * PS, (0, 9), (b"hello", b"word!\n"))], 0))
