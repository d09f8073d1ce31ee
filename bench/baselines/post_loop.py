"""The bare STOW-RS loop the forwarder is measured against.

One ``requests.Session`` (one kept-alive connection), the files read into
memory and POSTed ``--batch`` at a time as ``multipart/related;
type="application/dicom"``, one request after the other, no queue, no
checksum, no retries. Prints ``{"seconds": ..., "instances": ...}`` as JSON,
timed from the first request to the last response.

    python bench/baselines/post_loop.py --url http://127.0.0.1:8042/dicom-web --batch 10 FILE...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import requests

BOUNDARY = "bench-post-loop-boundary"


def body(files: list[Path]) -> bytes:
    parts = bytearray()
    for path in files:
        parts += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        parts += path.read_bytes() + b"\r\n"
    parts += f"--{BOUNDARY}--\r\n".encode()
    return bytes(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="DICOMweb base URL")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--list", type=Path, required=True, help="file with one path per line")
    args = parser.parse_args(argv)
    files = [Path(line) for line in args.list.read_text().splitlines() if line]
    session = requests.Session()
    session.trust_env = False  # loopback only, never through a proxy
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        "Accept": "application/dicom+json",
    }
    started = time.time()
    for i in range(0, len(files), args.batch):
        response = session.post(
            f"{args.url}/studies",
            data=body(files[i : i + args.batch]),
            headers=headers,
            timeout=120,
        )
        if response.status_code != 200:
            print(f"HTTP {response.status_code}: {response.text[:300]}", file=sys.stderr)
            return 1
    print(json.dumps({"seconds": time.time() - started, "instances": len(files)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
