"""The redactor streams: pixel data copied byte for byte from the spool file, never loaded,
the output deterministic, and memory flat for a 1 GiB instance."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from stowaway.forwarder.deidentify import RedactionError, RedactionSpec, Redactor, UidMapper
from tests.support.dicom_files import make_ct
from tests.support.peak_rss import run_with_peak_rss
from tests.support.phi_instances import make_phi_ct, write_sparse_ct

REPO = Path(__file__).resolve().parents[3]
KEY = b"0123456789abcdef0123456789abcdef"
ONE_GIB = 1 << 30
RSS_LIMIT = 200 * 1024 * 1024


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "uid.key"
    path.write_bytes(KEY)
    return path


def dicom_basic(key_file: Path) -> Redactor:
    return Redactor(
        RedactionSpec.from_config({"profile": "DICOM_BASIC", "uid_key_file": str(key_file)})
    )


def pixel_element(data: bytes) -> bytes:
    """The encoded PixelData element (header and value) in a Part-10 file's bytes."""
    ds = pydicom.dcmread(io.BytesIO(data))
    start = ds.get_item("PixelData").value_tell
    length = ds.get_item("PixelData").length
    return data[start - 12 : start + length] if length != 0xFFFFFFFF else data[start - 12 :]


def test_same_source_gives_the_same_bytes_every_time(tmp_path: Path, key_file: Path) -> None:
    """A re-send must be byte-identical, or the Healthcare API answers 409."""
    src = make_phi_ct(tmp_path / "phi.dcm")
    first = io.BytesIO()
    dicom_basic(key_file).write(src, first)
    again = dicom_basic(key_file).prepare(src)
    assert b"".join(again.iter_bytes(chunk_size=1000)) == first.getvalue()
    assert again.open().read() == first.getvalue()
    assert again.size == len(first.getvalue())


def test_pixel_data_is_copied_byte_for_byte(tmp_path: Path, key_file: Path) -> None:
    src = make_phi_ct(tmp_path / "phi.dcm", rows=64, cols=64)
    out = io.BytesIO()
    dicom_basic(key_file).write(src, out)
    assert pixel_element(out.getvalue()) == pixel_element(src.read_bytes())
    decoded = pydicom.dcmread(io.BytesIO(out.getvalue())).pixel_array
    assert (decoded == pydicom.dcmread(src).pixel_array).all()


def test_encapsulated_pixel_data_is_copied_fragment_for_fragment(
    tmp_path: Path, key_file: Path
) -> None:
    src = make_ct(tmp_path / "ct.dcm", 32, 32)
    ds = pydicom.dcmread(src)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.PatientName = "Doe^Jane"
    ds.save_as(src, enforce_file_format=True)
    out = io.BytesIO()
    dicom_basic(key_file).write(src, out)
    result = pydicom.dcmread(io.BytesIO(out.getvalue()))
    assert result.file_meta.TransferSyntaxUID == RLELossless
    assert result.PatientName == ""
    assert result.PixelData == ds.PixelData
    assert (result.pixel_array == ds.pixel_array).all()


def test_elements_after_the_pixel_data_are_redacted_too(tmp_path: Path, key_file: Path) -> None:
    src = make_ct(tmp_path / "ct.dcm", 4, 4)
    ds = pydicom.dcmread(src)
    signature = Dataset()
    signature.DigitalSignatureUID = "1.2.3.4"
    ds.DigitalSignaturesSequence = Sequence([signature])  # (FFFA,FFFA): after (7FE0,0010)
    ds.DataSetTrailingPadding = b"\x00" * 64
    ds.save_as(src, enforce_file_format=True)
    out = io.BytesIO()
    dicom_basic(key_file).write(src, out)
    result = pydicom.dcmread(io.BytesIO(out.getvalue()))
    assert "DigitalSignaturesSequence" not in result  # Annex E: X
    assert "DataSetTrailingPadding" not in result
    assert result.PixelData == ds.PixelData


def test_an_instance_that_cannot_be_streamed_fails_instead_of_going_unredacted(
    tmp_path: Path, key_file: Path
) -> None:
    src = make_ct(tmp_path / "ct.dcm", 4, 4)
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(src, enforce_file_format=True)
    with pytest.raises(RedactionError, match="Deflated"):
        dicom_basic(key_file).prepare(src)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(RedactionError, match="not a readable DICOM file"):
        dicom_basic(key_file).prepare(junk)


def test_keyed_uids_differ_from_google_and_stay_consistent(tmp_path: Path, key_file: Path) -> None:
    src = make_phi_ct(tmp_path / "phi.dcm")
    original = pydicom.dcmread(src)
    out = io.BytesIO()
    report = dicom_basic(key_file).write(src, out)
    result = pydicom.dcmread(io.BytesIO(out.getvalue()))
    keyed = UidMapper.from_key_file(key_file)
    assert result.SOPInstanceUID == keyed.map(original.SOPInstanceUID) == report.sop_instance_uid
    assert result.StudyInstanceUID == keyed.map(original.StudyInstanceUID)
    assert result.ReferencedImageSequence[0].ReferencedSOPInstanceUID == result.SOPInstanceUID
    assert KEY not in out.getvalue()


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from stowaway.forwarder.deidentify import RedactionSpec, Redactor

    class Sink:
        written = 0
        def write(self, data):
            self.written += len(data)

    spec = RedactionSpec.from_config({"profile": "DICOM_BASIC", "uid_key_file": sys.argv[2]})
    redacted = Redactor(spec).prepare(Path(sys.argv[1]))
    sink = Sink()
    redacted.write(sink)
    assert sink.written == redacted.size, (sink.written, redacted.size)
    print(sink.written)
    """
)


def test_a_1_gib_instance_is_redacted_in_under_200_mb(tmp_path: Path, key_file: Path) -> None:
    src = tmp_path / "big.dcm"
    write_sparse_ct(src, ONE_GIB)
    (written,), peak = run_with_peak_rss(CHILD, str(src), str(key_file), cwd=REPO)
    assert int(written) > ONE_GIB
    assert peak < RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"


def test_a_large_header_value_is_emptied_though_it_was_not_loaded(
    tmp_path: Path, key_file: Path
) -> None:
    """Values over the defer size stay on disk while the header is parsed; an emptied or
    mapped one must not pass through for looking empty."""
    src = make_ct(tmp_path / "ct.dcm", 4, 4)
    ds = pydicom.dcmread(src)
    ds.add_new(0x00204000, "UT", "Doe^Jane " * 200_000)  # ImageComments, 1.8 MB
    ds.save_as(src, enforce_file_format=True)
    spec = RedactionSpec.from_config({"remove": ["ImageComments"], "uid_key_file": str(key_file)})
    out = io.BytesIO()
    report = Redactor(spec).write(src, out)
    assert b"Doe^Jane" not in out.getvalue()
    assert "(0020,4000)" in report.tags
    assert pydicom.dcmread(io.BytesIO(out.getvalue())).ImageComments == ""


def test_an_instance_without_pixel_data_is_redacted_whole(tmp_path: Path, key_file: Path) -> None:
    src = make_phi_ct(tmp_path / "phi.dcm")
    ds = pydicom.dcmread(src)
    del ds.PixelData
    del ds.DataSetTrailingPadding
    ds.save_as(src, enforce_file_format=True)
    redacted = dicom_basic(key_file).prepare(src)
    result = pydicom.dcmread(io.BytesIO(redacted.open().read()))
    assert redacted.size == len(b"".join(redacted.iter_bytes()))
    assert "PixelData" not in result and result.PatientName == ""
