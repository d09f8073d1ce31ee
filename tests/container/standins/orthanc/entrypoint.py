"""The orthancteam/orthanc image's configuration by environment, in brief: ORTHANC__NAME=x
sets "Name": "x" (each __ a level, each word capitalised), DICOM_WEB_PLUGIN_ENABLED=true
loads the DICOMweb plugin. Then Orthanc runs in the foreground as PID 1."""

import json
import os

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CONFIG = "/tmp/orthanc.json"


def value(text: str) -> object:
    try:
        return json.loads(text)  # true, false, numbers, JSON objects
    except ValueError:
        return text


config: dict[str, object] = {
    "StorageDirectory": "/var/lib/orthanc/standin",
    "IndexDirectory": "/var/lib/orthanc/standin",
    "HttpPort": 8042,
    "DicomPort": 4242,
    "RemoteAccessAllowed": True,
    "AuthenticationEnabled": True,
    "Plugins": [],
}
for name, text in os.environ.items():
    if not name.startswith("ORTHANC__"):
        continue
    keys = ["".join(w.capitalize() for w in part.split("_")) for part in name[9:].split("__")]
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})  # type: ignore[assignment]
    node[keys[-1]] = value(text)
if os.environ.get("DICOM_WEB_PLUGIN_ENABLED", "").lower() == "true":
    config["Plugins"] = [PLUGIN]
    config.setdefault("DicomWeb", {"Enable": True, "Root": "/dicom-web/"})
with open(CONFIG, "w") as f:
    json.dump(config, f)
os.execv("/usr/sbin/Orthanc", ["Orthanc", CONFIG])
