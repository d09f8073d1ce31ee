#!/usr/bin/env python3
"""The orthancteam image's liveness probe, in brief: Orthanc answers GET /changes?last."""

import sys
import urllib.request

try:
    urllib.request.urlopen("http://127.0.0.1:8042/changes?last", timeout=4)
except Exception as exc:
    sys.exit(f"orthanc not alive: {exc}")
