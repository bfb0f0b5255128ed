#!/usr/bin/env python3
"""The `cmd` of the DVC stages in bench/noop.sh: the same outputs as pipe-testkit's kinds.

  dvc_stage.py emit OUT --chunks N --chunk-bytes B --seed S --files F [--data FILE]
      F > 0: chunk i goes to OUT/parts/<i % F>/chunk-<i>.bin (N files of B bytes, like `emit`);
      F = 0: one OUT/data.bin of N*B bytes.
  dvc_stage.py combine OUT UPSTREAM... [--salt S]
      OUT/data.bin = blake2b of the upstreams' data.bin (like `combine`).

The bytes differ from pipe-testkit's (which uses blake3 XOF) but the number and sizes of files,
which is all a no-op status or repro looks at, are the same.
"""
import argparse
import hashlib
import os
import random


def emit(a):
    extra = b""
    if a.data:
        with open(a.data, "rb") as f:
            extra = f.read()
    mix = int.from_bytes(hashlib.blake2b(extra, digest_size=8).digest(), "little")
    os.makedirs(a.out, exist_ok=True)
    chunks = []
    for i in range(a.chunks):
        buf = random.Random((a.seed << 32) ^ (i << 1) ^ mix).randbytes(a.chunk_bytes)
        if a.files > 0:
            d = os.path.join(a.out, "parts", str(i % a.files))
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"chunk-{i}.bin"), "wb") as f:
                f.write(buf)
        else:
            chunks.append(buf)
    if a.files == 0:
        with open(os.path.join(a.out, "data.bin"), "wb") as f:
            f.write(b"".join(chunks))


def combine(a):
    h = hashlib.blake2b(a.salt.encode())
    for up in a.parts:
        with open(os.path.join(up, "data.bin"), "rb") as f:
            h.update(f.read())
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "data.bin"), "wb") as f:
        f.write(h.digest()[:32])


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="kind", required=True)
    e = sub.add_parser("emit")
    e.add_argument("out")
    e.add_argument("--chunks", type=int, default=4)
    e.add_argument("--chunk-bytes", type=int, default=1024)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--files", type=int, default=0)
    e.add_argument("--data")
    c = sub.add_parser("combine")
    c.add_argument("out")
    c.add_argument("parts", nargs="+")
    c.add_argument("--salt", default="")
    a = ap.parse_args()
    emit(a) if a.kind == "emit" else combine(a)


if __name__ == "__main__":
    main()
