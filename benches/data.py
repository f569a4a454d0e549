"""Benchmark inputs: synthetic high-resolution DICOM images, written once per size and
transfer syntax into the work folder and reused by later runs.

The base image is a smooth, structured 12-bit picture (discs, rings, a gradient and a little
seeded noise) so that the compressed syntaxes see realistic, not trivial, entropy. Every
compressed version is made by the tools a PACS would use (dcmtk, GDCM, OpenJPH); the files
carry a window in the header so the default pixel policy windows them.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# fixed, fake identities (2.25 UIDs); no patient attributes beyond obvious placeholders
STUDY_UID = "2.25.400000000000000000000000000000000001"
SERIES_UID = "2.25.400000000000000000000000000000000002"
SOP_UID = "2.25.400000000000000000000000000000000003"


@dataclass(frozen=True)
class Syntax:
    """One transfer syntax of the decode benchmark and how its file is made."""

    name: str
    uid: str
    bits: int  # bits stored of the source image
    tool: str  # "base", "dcmtk:<program>", "gdcm", "ojph"
    args: tuple[str, ...] = ()


SYNTAXES = (
    Syntax("Explicit VR Little Endian", "1.2.840.10008.1.2.1", 12, "base"),
    Syntax("Deflated Explicit VR Little Endian", "1.2.840.10008.1.2.1.99", 12, "dcmtk:dcmconv", ("+td",)),
    Syntax("RLE Lossless", "1.2.840.10008.1.2.5", 12, "dcmtk:dcmcrle"),
    Syntax("JPEG Baseline (8-bit)", "1.2.840.10008.1.2.4.50", 8, "dcmtk:dcmcjpeg", ("+eb", "+q", "90")),
    Syntax("JPEG Extended (12-bit)", "1.2.840.10008.1.2.4.51", 12, "dcmtk:dcmcjpeg", ("+ee", "+q", "90")),
    Syntax("JPEG Lossless SV1", "1.2.840.10008.1.2.4.70", 12, "dcmtk:dcmcjpeg", ("+e1",)),
    Syntax("JPEG-LS Lossless", "1.2.840.10008.1.2.4.80", 12, "dcmtk:dcmcjpls", ("+el",)),
    Syntax("JPEG 2000 Lossless", "1.2.840.10008.1.2.4.90", 12, "gdcm", ("--j2k",)),
    Syntax("JPEG 2000 (lossy, 20:1)", "1.2.840.10008.1.2.4.91", 12, "gdcm", ("--j2k", "--lossy", "-r", "20")),
    Syntax("HTJ2K Lossless", "1.2.840.10008.1.2.4.201", 12, "ojph", ("-reversible", "true")),
)


def picture(size: int, bits: int, seed: int = 7) -> np.ndarray:
    """Unsigned `bits`-bit picture, size x size."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size - 1)
    r = np.hypot((x - 0.45) * 1.2, y - 0.5)
    img = 0.6 * np.exp(-((r / 0.33) ** 2)) + 0.2 * (np.sin(r * 60) > 0) * (r < 0.55) + 0.25 * x * (1 - y)
    r2 = np.hypot(x - 0.75, y - 0.3)
    img += 0.3 * (r2 < 0.08)
    img += np.random.default_rng(seed).normal(0.0, 0.01, img.shape).astype(np.float32)
    img = (img - img.min()) / (img.max() - img.min())
    top = (1 << bits) - 1
    return np.round(img * top).astype(np.uint16 if bits > 8 else np.uint8)


def write_native(path: Path, pixels: np.ndarray, bits: int) -> Path:
    """Explicit VR Little Endian MONOCHROME2 file with a window covering most of the range."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = SOP_UID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "2.25.300000000000000000000000000000000001"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = SOP_UID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.PatientName = "Bench^Synthetic"
    ds.PatientID = "FPTSERVE-BENCH"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    top = (1 << bits) - 1
    ds.WindowCenter = round(top * 0.45)
    ds.WindowWidth = round(top * 0.8)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")


def _ojph(source: Path, out: Path, pixels: np.ndarray, bits: int, args: tuple[str, ...], work: Path) -> None:
    """HTJ2K: OpenJPH encodes the raw samples; the codestream is wrapped here into DICOM."""
    import pydicom
    from pydicom.encaps import encapsulate

    raw = work / (out.stem + ".rawl")
    j2c = work / (out.stem + ".j2c")
    raw.write_bytes(pixels.astype("<u2").tobytes())
    rows, cols = pixels.shape
    _run([
        "ojph_compress", "-i", str(raw), "-o", str(j2c), "-dims", f"{{{cols},{rows}}}", "-num_comps", "1",
        "-bit_depth", str(bits), "-signed", "false", "-downsamp", "{1,1}", *args,
    ])
    ds = pydicom.dcmread(source)
    ds.PixelData = encapsulate([j2c.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
    ds.save_as(out, enforce_file_format=True)
    raw.unlink()
    j2c.unlink()


def dicom_file(work: Path, size: int, syntax: Syntax) -> Path:
    """The benchmark DICOM for (size, syntax), made on first use."""
    folder = work / "dicom" / str(size)
    slug = syntax.uid.replace(".", "_")
    out = folder / f"{slug}.dcm"
    if out.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / f"native_{syntax.bits}bit.dcm"
    if not source.exists():
        write_native(source, picture(size, syntax.bits), syntax.bits)
    partial = out.with_suffix(".partial")
    if syntax.tool == "base":
        shutil.copyfile(source, partial)
    elif syntax.tool.startswith("dcmtk:"):
        _run([syntax.tool.split(":", 1)[1], *syntax.args, str(source), str(partial)])
    elif syntax.tool == "gdcm":
        _run(["gdcmconv", *syntax.args, str(source), str(partial)])
    elif syntax.tool == "ojph":
        _ojph(source, partial, picture(size, syntax.bits), syntax.bits, syntax.args, folder)
    else:
        raise ValueError(f"unknown tool {syntax.tool}")
    partial.rename(out)
    return out


def serving_dicom(work: Path, size: int) -> Path:
    """The uncompressed 16-bit (12 stored) DICOM of the serving cases."""
    return dicom_file(work, size, SYNTAXES[0])


# The syntaxes whose codecs decode at reduced resolution (README: DICOM).
REDUCED_UIDS = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",
})


def distinct_j2k(work: Path, size: int, count: int) -> list[Path]:
    """`count` different JPEG 2000 lossless pictures (GDCM) of size x size, made on first use."""
    folder = work / "dicom" / str(size) / "distinct-j2k"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        out = folder / f"{i}.dcm"
        if not out.exists():
            native = folder / f"native-{i}.dcm"
            write_native(native, picture(size, 12, seed=300 + i), 12)
            partial = out.with_suffix(".partial")
            _run(["gdcmconv", "--j2k", str(native), str(partial)])
            partial.rename(out)
            native.unlink()
        paths.append(out)
    return paths


def pydicom_reduced_inputs() -> list[tuple[str, bytes, int]]:
    """(name, bytes, frame) for every file of the pydicom and pydicom-data wheels in a syntax
    with a reduced decode: first and last frame (colour, multi-frame, MONOCHROME1 among them)."""
    import sys

    import pydicom

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import dicom_parity

    inputs = []
    for f in dicom_parity.all_test_files():
        try:
            ds = pydicom.dcmread(f.path, stop_before_pixels=True)
            uid = str(ds.file_meta.TransferSyntaxUID)
        except Exception:  # noqa: BLE001 - not a DICOM file with a file meta group
            continue
        if uid not in REDUCED_UIDS or "Rows" not in ds:
            continue
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        blob = Path(f.path).read_bytes()
        for frame in sorted({0, frames - 1}):
            inputs.append((f.name, blob, frame))
    return inputs
