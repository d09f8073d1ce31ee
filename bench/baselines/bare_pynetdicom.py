"""The bare pynetdicom receiver the ingest targets are measured against.

Default AE settings (maximum PDU 16382, every timeout at its default), chunked
receive (the dataset is streamed to a temporary file), and a handler that only
moves that file into ``--out``: no fsync, no queue, no header parsing. It is
what "a receiver that writes files and does nothing else" costs in pynetdicom.

    python bench/baselines/bare_pynetdicom.py --port 11112 --out /tmp/bare
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from itertools import count
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    incoming = args.out / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(incoming)  # same file system, so the move is a rename
    numbers = count()

    def on_store(event: Event) -> int:
        os.replace(event.dataset_path, args.out / f"{next(numbers):07d}.dcm")
        return 0x0000

    ae = AE(ae_title="IMPORTADAPTER")
    server = ae.start_server(
        (args.host, args.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("listening", flush=True)
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
