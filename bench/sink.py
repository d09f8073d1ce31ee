"""A DICOMweb destination that accepts and discards: for the forwarder's memory case.

It reads each STOW-RS body in 1 MiB pieces and answers 200 with no body, which
the forwarder takes as success for every instance of the request. Orthanc would
parse and store a 1 GiB instance for minutes; the case measures stowaway's
memory, not the destination's.

    python bench/sink.py --port 18042

With ``--throttle-seconds S`` it is a rate-limited destination for the uplink
case's 429 storm: for S seconds from the first POST it answers 429 with
``Retry-After: --retry-after``, then 200; every POST is logged to stdout as
``post <monotonic seconds> <status>``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: --throttle-seconds, --retry-after, and when the first POST came
THROTTLE = {"seconds": 0.0, "retry_after": "1", "first": None}
_LOCK = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        left = int(self.headers.get("Content-Length", "0"))
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        now = time.monotonic()
        with _LOCK:
            first = THROTTLE["first"] = THROTTLE["first"] or now
            status = 429 if now - float(first) < float(THROTTLE["seconds"]) else 200
            print(f"post {now:.4f} {status}", flush=True)
        if status == 429:
            self.send_response(429)
            self.send_header("Retry-After", str(THROTTLE["retry_after"]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--throttle-seconds", type=float, default=0.0)
    parser.add_argument("--retry-after", default="1")
    args = parser.parse_args(argv)
    THROTTLE.update(seconds=args.throttle_seconds, retry_after=args.retry_after)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
