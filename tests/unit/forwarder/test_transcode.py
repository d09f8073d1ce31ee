"""Transcoding: lossless targets decode to the very same pixels, frame by frame; what
cannot be transcoded goes as received with a reason; bad targets fail at start-up."""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_fragmented_frames, parse_basic_offsets
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from stowaway.forwarder.transcode import TranscodeConfigError, TranscodeTarget, transcode
from tests.support.dicom_files import make_ct
from tests.support.peak_rss import run_with_peak_rss
from tests.support.phi_instances import write_sparse_ct

REPO = Path(__file__).resolve().parents[3]

LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless]


def multiframe(
    path: Path, frames: int, *, rgb: bool = False, ts: UID = ExplicitVRLittleEndian
) -> Path:
    """A multi-frame instance with smooth (compressible), distinct frames."""
    make_ct(path, 32, 48)
    ds = pydicom.dcmread(path)
    rng = np.random.default_rng(7)
    if rgb:
        arr = rng.integers(0, 255, (frames, 32, 48, 3), dtype=np.uint8)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        for k in ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth"):
            delattr(ds, k)
    else:
        base = np.add.outer(np.arange(32), np.arange(48)).astype(np.uint16) * 40
        arr = np.stack(
            [base + i * 7 + rng.integers(0, 3, base.shape, dtype=np.uint16) for i in range(frames)]
        )
        ds.BitsStored, ds.HighBit = 12, 11
        arr &= 0x0FFF
    ds.NumberOfFrames = frames
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OB" if rgb else "OW"
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("target", LOSSLESS, ids=lambda u: u.name)
@pytest.mark.parametrize("rgb", [False, True], ids=["mono12", "rgb8"])
def test_lossless_transcode_decodes_to_identical_pixels(
    tmp_path: Path, target: UID, rgb: bool
) -> None:
    src = multiframe(tmp_path / "src.dcm", 3, rgb=rgb)
    dest = tmp_path / "out.dcm"
    result = transcode(src, dest, TranscodeTarget.from_config(str(target)))
    assert result.applied, result.reason
    assert result.frames == 3 and result.transfer_syntax == target
    before, after = pydicom.dcmread(src), pydicom.dcmread(dest)
    assert after.file_meta.TransferSyntaxUID == target
    assert after.SOPInstanceUID == before.SOPInstanceUID
    assert after.file_meta.MediaStorageSOPInstanceUID == before.SOPInstanceUID
    assert after.PatientName == before.PatientName
    assert "LossyImageCompression" not in after
    np.testing.assert_array_equal(after.pixel_array, before.pixel_array)
    assert dest.stat().st_size < src.stat().st_size or rgb  # random RGB does not compress


def test_frames_are_encoded_one_by_one_with_an_offset_table(tmp_path: Path) -> None:
    src = multiframe(tmp_path / "src.dcm", 4)
    dest = tmp_path / "out.dcm"
    assert transcode(src, dest, TranscodeTarget.from_config("JPEG2000Lossless")).applied
    ds = pydicom.dcmread(dest)
    frames = list(generate_fragmented_frames(ds.PixelData, number_of_frames=4))
    assert len(frames) == 4 and all(len(f) == 1 for f in frames)
    offsets = parse_basic_offsets(BytesIO(ds.PixelData))
    assert len(offsets) == 4 and offsets[0] == 0


def test_implicit_vr_source_is_written_explicit(tmp_path: Path) -> None:
    src = multiframe(tmp_path / "src.dcm", 2, ts=ImplicitVRLittleEndian)
    dest = tmp_path / "out.dcm"
    assert transcode(src, dest, TranscodeTarget.from_config(str(RLELossless))).applied
    np.testing.assert_array_equal(
        pydicom.dcmread(dest).pixel_array, pydicom.dcmread(src).pixel_array
    )


def test_lossy_target_only_with_its_quality_and_then_labelled_lossy(tmp_path: Path) -> None:
    with pytest.raises(TranscodeConfigError, match="is lossy: name its quality"):
        TranscodeTarget.from_config(str(JPEG2000))
    with pytest.raises(TranscodeConfigError, match="is lossy"):
        TranscodeTarget.from_config(str(JPEGLSNearLossless))
    src = multiframe(tmp_path / "src.dcm", 2)
    dest = tmp_path / "out.dcm"
    result = transcode(
        src, dest, TranscodeTarget.from_config({"syntax": str(JPEG2000), "j2k_psnr": 60})
    )
    assert result.applied and result.ratio and result.ratio > 1
    ds = pydicom.dcmread(dest)
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_15444_1"
    assert ds.pixel_array.shape == (2, 32, 48)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1.2.840.10008.1.2.4.50", "JPEG Baseline"),
        ("JPEGBaseline8Bit", "not supported: pydicom has no JPEG Baseline encoder"),
        ("1.2.840.10008.1.2.4.57", "is not one of"),
        ("JPEGMagic", "'JPEGMagic' is not a transfer syntax"),
        ({"syntax": str(JPEG2000Lossless), "j2k_psnr": 40}, "'j2k_psnr' does not apply"),
        ("", "give a transfer syntax UID"),
    ],
)
def test_unsupported_targets_fail_at_start_up_with_one_line(value: object, message: str) -> None:
    with pytest.raises(TranscodeConfigError) as caught:
        TranscodeTarget.from_config(value)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith("transcode: ")


def test_already_compressed_goes_as_received_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = multiframe(tmp_path / "src.dcm", 1)
    rle = tmp_path / "rle.dcm"
    assert transcode(src, rle, TranscodeTarget.from_config(str(RLELossless))).applied
    dest = tmp_path / "out.dcm"
    with caplog.at_level(logging.INFO, logger="stowaway.forwarder.transcode"):
        result = transcode(rle, dest, TranscodeTarget.from_config(str(JPEG2000Lossless)))
    assert not result.applied and result.reason == "already compressed (RLE Lossless)"
    assert result.transfer_syntax == RLELossless
    assert not dest.exists() and not list(tmp_path.glob("out.dcm.*"))
    (record,) = [r for r in caplog.records if r.message == "transcode_skipped"]
    assert record.reason == result.reason  # type: ignore[attr-defined]


def test_a_photometric_interpretation_the_encoder_refuses_goes_as_received(tmp_path: Path) -> None:
    src = multiframe(tmp_path / "src.dcm", 1, rgb=True)
    ds = pydicom.dcmread(src)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.save_as(src, enforce_file_format=True)
    dest = tmp_path / "out.dcm"
    result = transcode(src, dest, TranscodeTarget.from_config(str(JPEGLSLossless)))
    assert not result.applied and result.reason
    assert "Photometric Interpretation: YBR_FULL_422" in result.reason
    assert not dest.exists()


def test_no_pixel_data_goes_as_received(tmp_path: Path) -> None:
    src = make_ct(tmp_path / "src.dcm", 4, 4)
    ds = pydicom.dcmread(src)
    del ds.PixelData
    ds.save_as(src, enforce_file_format=True)
    result = transcode(src, tmp_path / "out.dcm", TranscodeTarget.from_config(str(RLELossless)))
    assert not result.applied and result.reason == "no pixel data"


CHILD = """
import sys
from pathlib import Path
from stowaway.forwarder.transcode import TranscodeTarget, transcode
result = transcode(Path(sys.argv[1]), Path(sys.argv[2]), TranscodeTarget.from_config(sys.argv[3]))
assert result.applied, result.reason
print(result.frames)
"""


def test_transcoding_holds_one_frame_not_the_instance(tmp_path: Path) -> None:
    """128 MiB of pixel data in 256 frames, transcoded with peak RSS well under 128 MiB."""
    src = tmp_path / "big.dcm"
    write_sparse_ct(src, 256 * 512 * 512 * 2)
    target = str(JPEGLSLossless)
    (frames,), peak = run_with_peak_rss(
        CHILD, str(src), str(tmp_path / "out.dcm"), target, cwd=REPO
    )
    assert int(frames) == 256
    assert peak < 110 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB"
