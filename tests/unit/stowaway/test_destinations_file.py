"""Destinations files, ours and Google's: parsed into destinations and a routing table,
with a one-line error naming the entry and the field for every mistake."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from stowaway.destinations import (
    DEFAULT_NAME,
    DestinationConfigError,
    FlagDefaults,
    destination_config,
    load_destinations_file,
    parse_google_config,
    parse_google_filter,
)
from stowaway.forwarder.auth import AuthKind
from stowaway.forwarder.destinations import ConflictPolicy, DicomwebDestination, DimseDestination
from stowaway.receiver.routing import Arrival, Matching, dataset_attributes
from stowaway.settings import (
    COMMON,
    FORWARDER,
    HTTP,
    RECEIVER,
    ROUTING,
    Settings,
    SettingsError,
    add_options,
    load_settings,
)

HEALTHCARE = (
    "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/dicomStores/{}/dicomWeb"
)
DEFAULTS = FlagDefaults()


def arrival(calling: str = "DEVICE_A", peer: str = "10.1.2.3", **attrs: object) -> Arrival:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return Arrival(dataset_attributes(ds), calling, "IMPORTADAPTER", peer)


def write(tmp_path: Path, text: str, name: str = "destinations.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


OURS = """
destinations:
  - {name: clinical, kind: dicomweb, url: "CLINICAL_URL"}
  - name: research
    kind: dicomweb
    url: http://127.0.0.1:8042/dicom-web
    auth: none
    workers: 2
    batch_max_instances: 5
    on_conflict: overwrite
    read_timeout: 30s
    max_attempts: 7
  - {name: pacs, kind: dimse, host: 127.0.0.1, port: 11112, called_aet: PACS,
     max_associations: 3, tls: {ca: /etc/ca.pem}}
matching: all
default: clinical
rules:
  - name: mammography
    when: {Modality: MG, calling_aet: {not: "TEST*"}}
    to: [research, clinical]
  - name: from-the-clinic
    when: {peer: {in_network: 10.9.0.0/16}, "(0008,0080)": {regex: "Clinic .*"}}
    to: pacs
""".replace("CLINICAL_URL", HEALTHCARE.format("clinical"))


def test_our_file_gives_each_destination_its_own_settings(tmp_path: Path) -> None:
    config = load_destinations_file(write(tmp_path, OURS), DEFAULTS)
    clinical, research, pacs = config.destinations
    assert isinstance(clinical, DicomwebDestination) and clinical.auth is AuthKind.GOOGLE
    assert isinstance(research, DicomwebDestination) and research.auth is AuthKind.NONE
    assert research.delivery.workers == 2 and research.delivery.max_attempts == 7
    assert research.on_conflict is ConflictPolicy.OVERWRITE and research.read_timeout == 30
    assert research.batch_max_instances == 5
    assert isinstance(pacs, DimseDestination) and pacs.max_associations == 3
    assert pacs.calling_aet == "IMPORTADAPTER" and pacs.tls is not None
    assert config.routing.matching is Matching.ALL and config.routing.default == "clinical"


def test_our_file_routes_by_attribute_aet_and_peer(tmp_path: Path) -> None:
    table = load_destinations_file(write(tmp_path, OURS), DEFAULTS).routing
    assert table.route(arrival(Modality="MG")).destinations == ("research", "clinical")
    assert table.route(arrival(calling="TEST1", Modality="MG")).destinations == ("clinical",)
    clinic = arrival(peer="10.9.1.1", InstitutionName="Clinic North", Modality="CT")
    assert table.route(clinic).destinations == ("pacs",)


def test_json_works_as_well(tmp_path: Path) -> None:
    document = {"destinations": [{"name": "a", "kind": "dicomweb", "url": "http://h/dw"}]}
    path = write(tmp_path, json.dumps(document), "d.json")
    config = load_destinations_file(path, DEFAULTS, dicomweb_url="http://other/dw")
    assert [d.name for d in config.destinations] == ["a", DEFAULT_NAME]
    assert config.routing.default == DEFAULT_NAME  # --dicomweb-url is the default route


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("destinations: []", "destinations: expected a non-empty list"),
        (
            "destinations: [{name: a, kind: ftp}]",
            r"destinations\[0\] \('a'\): kind: expected one of",
        ),
        ("destinations: [{name: a, kind: dicomweb}]", r"\('a'\): url: required"),
        ("destinations: [{name: a, kind: dicomweb, url: h, wokers: 2}]", "unknown field 'wokers'"),
        ("destinations: [{name: 'a b', kind: dicomweb, url: 'http://h'}]", "name: expected a name"),
        (
            "destinations: [{name: a, kind: dicomweb, url: 'http://h'}, "
            "{name: a, kind: dicomweb, url: 'http://i'}]",
            "name 'a' is used twice",
        ),
        ("destinations: [{name: a, kind: dimse, host: h, port: 0, called_aet: X}]", "port"),
        (
            "destinations: [{name: a, kind: dicomweb, url: 'http://h'}]\nrules: [{to: b}]",
            r"rules\[0\]: to: no destination named 'b' \(known: a\)",
        ),
        (
            "destinations: [{name: a, kind: dicomweb, url: 'http://h'}]\n"
            "rules: [{when: {Modalty: MG}, to: a}]",
            r"when.Modalty: 'Modalty' is neither a DICOM keyword",
        ),
        (
            "destinations: [{name: a, kind: dicomweb, url: 'http://h'}]\n"
            "rules: [{when: {Modality: {regex: '('}}, to: a}]",
            "regex:",
        ),
        (
            "destinations: [{name: a, kind: dicomweb, url: 'http://h'}]\ndefault: b",
            "default: no destination named 'b'",
        ),
        ("destinations: [{name: a, kind: dicomweb, url: 'http://h', workers: 0}]", "workers"),
        ("[unclosed", "not valid YAML or JSON"),
    ],
)
def test_every_mistake_is_one_line_naming_where(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DestinationConfigError, match=message) as caught:
        load_destinations_file(write(tmp_path, text), DEFAULTS)
    assert "\n" not in str(caught.value)
    assert str(tmp_path / "destinations.yaml") in str(caught.value)


# --- Google's format ----------------------------------------------------------------------

# From Google's own tests of its parser (ParseDestinationTest), single quotes and all.
GOOGLE_TEST_CONFIG = (
    (
        "["
        "{'filter': 'AETitle=DEVICE_A', 'dicomweb_destination': '%s' }, "
        "{'filter': 'AETitle=DEVICE_B', 'name': 'DEVICE_B', "
        "'host': '192.168.0.1', 'port': 11114 }, "
        "{'filter': 'AETitle=DEVICE_C', 'dicomweb_destination': '%s' }, "
        "{'filter': 'AETitle=DEVICE_C', 'dicomweb_destination': '%s' }"
        "]"
    )
    .replace("%s", HEALTHCARE.format("your-store"), 2)
    .replace("%s", HEALTHCARE.format("second"))
)


def test_googles_own_example_parses_and_fans_out_with_send_to_all() -> None:
    config = parse_google_config(
        GOOGLE_TEST_CONFIG, DEFAULTS, dicomweb_url=HEALTHCARE.format("main"), send_to_all=True
    )
    kinds = [(type(d).__name__, d.name) for d in config.destinations]
    assert kinds == [
        ("DicomwebDestination", "your-store"),
        ("DimseDestination", "DEVICE_B"),
        ("DicomwebDestination", "your-store-2"),
        ("DicomwebDestination", "second"),
        ("DicomwebDestination", DEFAULT_NAME),
    ]
    device_b = config.by_name("DEVICE_B")
    assert isinstance(device_b, DimseDestination)
    assert (device_b.host, device_b.port, device_b.called_aet) == ("192.168.0.1", 11114, "DEVICE_B")
    table = config.routing
    assert table.route(arrival(calling="DEVICE_C")).destinations == ("your-store-2", "second")
    # Google answers Success and sends such an instance nowhere; we keep it unrouted.
    assert table.route(arrival(calling="OTHER")).unrouted


def test_google_first_match_rejects_a_repeated_filter_and_defaults_to_the_address() -> None:
    with pytest.raises(DestinationConfigError, match="appears twice"):
        parse_google_config(GOOGLE_TEST_CONFIG, DEFAULTS, dicomweb_url=None, send_to_all=False)
    one = json.dumps(
        [{"filter": "Modality=MG", "dicomweb_destination": HEALTHCARE.format("mammo") + "/studies"}]
    )
    config = parse_google_config(
        one, DEFAULTS, dicomweb_url=HEALTHCARE.format("main"), send_to_all=False
    )
    mammo = config.by_name("mammo")
    assert isinstance(mammo, DicomwebDestination)
    assert mammo.url == HEALTHCARE.format("mammo")  # /studies is ours to add
    assert config.routing.route(arrival(Modality="MG")).destinations == ("mammo",)
    assert config.routing.route(arrival(Modality="CT")).destinations == (DEFAULT_NAME,)


def test_google_filter_semantics() -> None:
    def matches(text: str, **attrs: object) -> bool:
        calling = str(attrs.pop("calling", "DEVICE_A"))
        a = arrival(calling=calling, **attrs)
        return all(c.holds(a) for c in parse_google_filter(text, "t"))

    assert matches(
        "StudyDate=19720812&AccessionNumber=A1", StudyDate="19720812", AccessionNumber="A1"
    )
    assert not matches(
        "StudyDate=19720812&AccessionNumber=A1", StudyDate="19720812", AccessionNumber="A2"
    )
    assert matches("Modality=CT\\MR", Modality="MR")  # backslash: any of
    assert matches("Modality=C*", Modality="CT") and not matches("Modality=c*", Modality="CT")
    assert matches("00080060=MG", Modality="MG")  # tag in hex
    assert not matches("AccessionNumber=*")  # absent never matches, not even *
    assert matches("ImageType=AXIAL", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    assert matches("AETitle=DEVICE_A") and not matches("AETitle=device_a")
    assert not matches("AETitle=DEVICE*", calling="DEVICE_A")  # the AE title is exact


@pytest.mark.parametrize("bad", ["Modality", "Modality=", "Modality=CT=MR", "Modalty=CT", "=CT"])
def test_google_filter_errors_as_googles(bad: str) -> None:
    with pytest.raises(DestinationConfigError, match="filter: invalid"):
        parse_google_filter(bad, "[0]")


def test_a_google_entry_without_a_filter_is_refused() -> None:
    with pytest.raises(DestinationConfigError, match=r"\[0\]: filter: required"):
        parse_google_config(
            "[{'name': 'DEVICE_A', 'host': 'localhost', 'port': 11113}]",
            DEFAULTS,
            dicomweb_url=None,
            send_to_all=True,
        )


# --- from flags and variables -------------------------------------------------------------


def settings_from(args: list[str], environ: dict[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_options(parser, {COMMON, RECEIVER, FORWARDER, HTTP, ROUTING})
    return load_settings(parser.parse_args(args), environ or {})


def one_google_entry(store: str) -> str:
    return json.dumps([{"filter": "Modality=MG", "dicomweb_destination": HEALTHCARE.format(store)}])


def test_googles_sources_in_googles_precedence_inline_then_path_then_variable(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, one_google_entry("from-path"), "google.json")
    env = {"ENV_DESTINATION_CONFIG_JSON": one_google_entry("from-env")}

    def names(args: list[str]) -> list[str]:
        config = destination_config(settings_from(args, env))
        assert config is not None
        return [d.name for d in config.destinations]

    inline = ["--destination_config_inline", one_google_entry("inline")]
    assert names([*inline, "--destination_config_path", str(path)]) == ["inline"]
    assert names(["--destination_config_path", str(path)]) == ["from-path"]
    assert names([]) == ["from-env"]


def test_dicomweb_url_alone_is_one_destination_and_nothing_is_receive_only() -> None:
    config = destination_config(settings_from(["--dicomweb-url", "http://127.0.0.1:8042/dw"]))
    assert config is not None and [d.name for d in config.destinations] == [DEFAULT_NAME]
    assert config.routing.route(arrival()).destinations == (DEFAULT_NAME,)
    assert destination_config(settings_from([])) is None


def test_a_bad_destinations_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "destinations: [{name: a, kind: dicomweb}]")
    with pytest.raises(SettingsError, match=r"destinations\[0\] \('a'\): url: required"):
        settings_from(["--destinations", str(path)])
    google = ["--destination_config_inline", "[{'filter': 'Modality'}]"]
    with pytest.raises(SettingsError, match="filter: invalid parameter 'Modality'"):
        settings_from(google)
    with pytest.raises(SettingsError, match="either it or Google's"):
        settings_from(["--destinations", str(path), *google])


def test_query_retrieve_reads_the_named_or_the_default_dicomweb_destination(
    tmp_path: Path,
) -> None:
    from stowaway.querying import query_settings
    from stowaway.runtime import StartupError

    path = write(
        tmp_path,
        "destinations:\n"
        "  - {name: clinical, kind: dicomweb, url: 'http://127.0.0.1:1/dw', auth: none}\n"
        "  - {name: research, kind: dicomweb, url: 'http://127.0.0.1:2/dw', auth: none}\n"
        "  - {name: pacs, kind: dimse, host: 127.0.0.1, port: 104, called_aet: PACS}\n"
        "default: clinical\n",
    )
    base = ["--destinations", str(path)]
    assert query_settings(settings_from(base)).query_source == "http://127.0.0.1:1/dw"
    named = query_settings(settings_from([*base, "--query-destination", "research"]))
    assert named.query_source == "http://127.0.0.1:2/dw" and named.auth == "none"
    with pytest.raises(StartupError, match="'pacs' is not a DICOMweb destination"):
        query_settings(settings_from([*base, "--query-destination", "pacs"]))
    off = settings_from([*base, "--query-url", "off"])
    assert query_settings(off).query_source is None
