#!/usr/bin/env python3
"""DICOM parity of fptserve against pydicom (issue 4), on every file pydicom ships.

    .venv/bin/python tools/dicom_parity.py [--binary target/debug/fptserve] [--out tests/python/DICOM_PARITY.md]

For every file with pixel data that the PyPI wheels `pydicom` and `pydicom-data` ship
(pydicom.data.get_testdata_files(), offline), frame 0 and, for multi-frame files, the last
frame are decoded twice:
  * by pydicom (with the pylibjpeg / GDCM plugins), and put through the pixel policy "auto"
    of tests/python/dicom_reference.py;
  * by `fptserve decode FILE --frame N --output stored|display --npy OUT.npy`.
Each (file, frame) is classified:
  exact              identical values
  within tolerance   lossy syntax, |diff| <= 1 (<= 3 for colour JPEG baseline/extended)
  known difference   listed, with the reason, in tests/python/dicom_known_differences.json
  error              fptserve answered a clear error status (code + message) where pydicom decodes
  error (both fail)  fptserve answered an error status and pydicom cannot decode it either: agreement
  MISMATCH           different values, shape or header fields; or fptserve decodes a file pydicom
                     cannot (nothing to verify it against)
  CRASH              any exit other than 0 (ok) / 1 (error JSON), a hang, or unreadable output
The display output is checked twice: against the policy applied to fptserve's OWN stored values
(must be exact: tests the policy independently of the codecs) and against the policy applied to
pydicom's values (exact for lossless syntaxes, the tolerance above for lossy ones, where a stored
difference already within tolerance may propagate through the window).

The tests (tests/python/test_dicom_parity.py) import these functions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))

import dicom_reference as ref  # noqa: E402

DEFAULT_BINARY = Path(os.environ.get("FPTSERVE_BIN", ROOT / "target" / "debug" / "fptserve"))
DEFAULT_OUT = ROOT / "tests" / "python" / "DICOM_PARITY.md"
KNOWN_DIFFERENCES = ROOT / "tests" / "python" / "dicom_known_differences.json"
DECODE_TIMEOUT_S = float(os.environ.get("FPTSERVE_PARITY_TIMEOUT", "180"))

ERROR_CODES = ("INVALID_ARGUMENT", "UNIMPLEMENTED", "RESOURCE_EXHAUSTED")

EXACT = "exact"
TOLERANCE = "within tolerance"
KNOWN = "known difference"
ERROR = "error"
BOTH_FAIL = "error (both fail)"
MISMATCH = "MISMATCH"
CRASH = "CRASH"
NA = "n/a"
OUTCOMES = (EXACT, TOLERANCE, KNOWN, ERROR, BOTH_FAIL, MISMATCH, CRASH)
# worst first, for the overall outcome of a (file, frame)
SEVERITY = (CRASH, MISMATCH, ERROR, KNOWN, TOLERANCE, BOTH_FAIL, EXACT, NA)

# Syntaxes whose pixel values are allowed to differ between conforming decoders.
LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 and 4)",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.93": "JPEG 2000 Part 2 Multi-component",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
}
COLOUR_JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}


def tolerance(ts: str, samples: int) -> int:
    """Largest |diff| accepted for this syntax: 0 lossless, 1 lossy, 3 colour JPEG (the YCbCr
    in the JPEG stream: chroma upsampling and colour conversion rounding differ between IJG
    libjpeg, libjpeg-turbo, GDCM and Rust decoders)."""
    if ts not in LOSSY_SYNTAXES:
        return 0
    if ts in COLOUR_JPEG_SYNTAXES and samples == 3:
        return 3
    return 1


def syntax_name(uid: str) -> str:
    if not uid:
        return "(none in file)"
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name != uid else "(unknown)"


# --------------------------------------------------------------------------- files


@dataclass
class TestFile:
    name: str  # unique, relative to the package's data folder
    path: str


def _display_name(path: str) -> str:
    p = Path(path)
    parts = p.parts
    if "test_files" in parts:
        return "/".join(parts[parts.index("test_files") + 1 :])
    if "data_store" in parts:
        i = parts.index("data_store")
        rest = parts[i + 2 :] if len(parts) > i + 2 and parts[i + 1] == "data" else parts[i + 1 :]
        return "/".join(rest)
    return p.name


def all_test_files() -> list[TestFile]:
    """Every regular file pydicom's get_testdata_files() finds (pydicom + pydicom-data)."""
    from pydicom.data import get_testdata_files

    files, seen = [], Counter()
    for path in sorted(get_testdata_files()):
        if not os.path.isfile(path):
            continue
        name = _display_name(path)
        seen[name] += 1
        if seen[name] > 1:
            name = f"{name} ({'pydicom-data' if 'data_store' in path else 'pydicom'})"
        files.append(TestFile(name, path))
    return files


def pixel_test_files() -> list[TestFile]:
    """Those of all_test_files() that pydicom reads as a dataset with Pixel Data."""
    out = []
    for f in all_test_files():
        try:
            ds, _ = ref.read_dataset(f.path)
        except Exception:  # noqa: BLE001 - not DICOM at all
            continue
        if any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            out.append(f)
    return out


# --------------------------------------------------------------------------- fptserve


@dataclass
class Answer:
    rc: int | None  # None: timed out
    json: dict[str, Any] | None
    array: np.ndarray | None
    stderr: str
    seconds: float

    @property
    def crashed(self) -> bool:
        return self.rc not in (0, 1) or self.json is None or "ok" not in self.json

    @property
    def ok(self) -> bool:
        return not self.crashed and self.rc == 0 and self.json.get("ok") is True

    def describe(self) -> str:
        if self.rc is None:
            return f"no answer after {DECODE_TIMEOUT_S:.0f} s (killed)"
        if self.crashed:
            tail = " | ".join(self.stderr.strip().splitlines()[-3:])
            return f"exit {self.rc}" + (f": {tail[:300]}" if tail else "")
        if self.ok:
            return "ok"
        return f"{self.json.get('code')}: {self.json.get('message', '')}"


def run_decode(binary: Path, path: str, frame: int | None = None, output: str = "stored") -> Answer:
    with tempfile.TemporaryDirectory(prefix="fptserve-parity-") as tmp:
        npy = Path(tmp) / "out.npy"
        cmd = [str(binary), "decode", str(path), "--output", output, "--npy", str(npy)]
        if frame is not None:
            cmd += ["--frame", str(frame)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DECODE_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return Answer(None, None, None, stderr, time.perf_counter() - t)
        seconds = time.perf_counter() - t
        try:
            answer = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
            if not isinstance(answer, dict):
                answer = None
        except ValueError:
            answer = None
        array = None
        if proc.returncode == 0 and answer and answer.get("ok") and npy.exists():
            try:
                array = np.load(npy, allow_pickle=False)
            except Exception as e:  # noqa: BLE001
                answer = dict(answer, _npy_error=str(e))
        return Answer(proc.returncode, answer, array, proc.stderr, seconds)


# --------------------------------------------------------------------------- known differences


def load_known(path: Path = KNOWN_DIFFERENCES) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    entries = data.get("differences", []) if isinstance(data, dict) else data
    for e in entries:
        if not e.get("file") or not e.get("reason"):
            raise ValueError(f"{path}: each entry needs 'file' and 'reason': {e}")
        if e.get("output", "both") not in ("stored", "display", "both"):
            raise ValueError(f"{path}: 'output' must be stored, display or both: {e}")
    return entries


def known_entry(known: list[dict[str, Any]], name: str, frame: int, output: str) -> dict[str, Any] | None:
    for e in known:
        if e["file"] != name:
            continue
        if "frame" in e and int(e["frame"]) != frame:
            continue
        if e.get("output", "both") not in ("both", output):
            continue
        return e
    return None


# --------------------------------------------------------------------------- comparison


@dataclass
class Check:
    outcome: str = NA
    max_diff: int | None = None
    note: str = ""
    known: bool = False  # a known-differences entry was used
    known_stale: bool = False  # an entry exists but the values agree


@dataclass
class Case:
    file: str
    path: str
    frame: int
    frames: int
    ts: str
    ts_name: str
    photometric: str
    bits: str
    samples: int
    pydicom_error: str = ""
    reference_note: str = ""
    fptserve_error: str = ""
    fptserve_code: str = ""
    stored: Check = field(default_factory=Check)
    display: Check = field(default_factory=Check)
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        outcomes = [self.stored.outcome, self.display.outcome]
        return min(outcomes, key=SEVERITY.index)

    @property
    def max_diff(self) -> int | None:
        diffs = [d for d in (self.stored.max_diff, self.display.max_diff) if d is not None]
        return max(diffs) if diffs else None

    def note(self) -> str:
        parts = []
        if self.reference_note:
            parts.append(self.reference_note)
        if self.pydicom_error:
            parts.append(f"pydicom: {self.pydicom_error}")
        if self.fptserve_error:
            parts.append(f"fptserve: {self.fptserve_error}")
        if self.stored.note:
            parts.append(f"stored: {self.stored.note}")
        if self.display.note:
            parts.append(f"display: {self.display.note}")
        return "; ".join(parts)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    if a.size == 0:
        return 0
    return int(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64))))


def _short(msg: str, n: int = 160) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def _header_problems(ds, answer: dict[str, Any], frame: int, frames: int | None, ts: str, had_ts: bool) -> tuple[list[str], list[str]]:
    """(wrong header fields, absent header fields) of fptserve's JSON answer."""
    expected = {
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "samples_per_pixel": int(ds.get("SamplesPerPixel", 1)),
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": int(ds.get("BitsStored", ds.BitsAllocated)),
        "signed": int(ds.get("PixelRepresentation", 0)) == 1,
        "photometric_interpretation": str(ds.PhotometricInterpretation).strip(),
        "frame": frame,
    }
    if frames is not None:
        expected["frames"] = frames
    if had_ts:
        expected["transfer_syntax_uid"] = ts
    problems, absent = [], []
    for key, want in expected.items():
        if key not in answer:
            absent.append(key)
            continue
        got = answer.get(key)
        if isinstance(got, str):
            got = got.strip()
        if got != want:
            problems.append(f"header {key} {got!r} != {want!r}")
    return problems, absent


def expected_output_photometric(photometric: str, output: str) -> str:
    if output == "display":
        return "RGB"
    if photometric in ref.MONOCHROME or photometric == "PALETTE COLOR":
        return photometric
    return "RGB"


def _fptserve_stored(answer: Answer, ds) -> np.ndarray:
    arr = answer.array
    if arr.dtype != np.int32:
        raise ValueError(f"stored .npy dtype {arr.dtype}, expected int32")
    arr = arr.astype(np.int64)
    # int32 cannot hold unsigned 32-bit samples: read the bit pattern as uint32
    if int(ds.BitsAllocated) == 32 and int(ds.get("PixelRepresentation", 0)) == 0:
        arr = answer.array.view(np.uint32).astype(np.int64)
    return arr


def _classify(diff: int, tol: int, entry: dict | None, check: Check, what: str) -> None:
    check.max_diff = diff
    if diff == 0:
        check.outcome = EXACT
    elif diff <= tol:
        check.outcome = TOLERANCE
    elif entry is not None:
        check.outcome, check.known = KNOWN, True
        check.note = _short(entry["reason"])
    else:
        check.outcome = MISMATCH
        check.note = f"{what} max |diff| {diff} > tolerance {tol}"
    if entry is not None and check.outcome in (EXACT, TOLERANCE):
        check.known_stale = True


def compare_case(binary: Path, tf: TestFile, frame: int, known: list[dict[str, Any]]) -> Case:
    t0 = time.perf_counter()
    ds, note = ref.read_dataset(tf.path)
    ts = ref.transfer_syntax(ds)
    had_ts = not note
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    try:
        frames = ref.number_of_frames(ds)
    except ValueError:
        frames = None
    ba, bs = ds.get("BitsAllocated"), ds.get("BitsStored")
    bits = f"{ba}/{bs}" + (" signed" if int(ds.get("PixelRepresentation", 0) or 0) == 1 else "")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    case = Case(tf.name, tf.path, frame, frames or 0, ts, syntax_name(ts), photometric or "(none)", bits, samples,
                reference_note=note)
    tol = tolerance(ts, samples)
    entry_stored = known_entry(known, tf.name, frame, "stored")
    entry_display = known_entry(known, tf.name, frame, "display")

    # the reference
    expected = None
    try:
        expected = ref.pydicom_frame(ds, frame)
    except Exception as e:  # noqa: BLE001
        case.pydicom_error = _short(f"{type(e).__name__}: {e}")

    # fptserve, stored values
    stored = run_decode(binary, tf.path, frame, "stored")
    case.seconds = stored.seconds
    if stored.crashed:
        case.stored = Check(CRASH, note=stored.describe())
        case.seconds = time.perf_counter() - t0
        return case
    if not stored.ok:
        code = stored.json.get("code")
        case.fptserve_code = str(code)
        case.fptserve_error = _short(stored.describe(), 200)
        if code not in ERROR_CODES or not str(stored.json.get("message", "")).strip():
            case.stored = Check(MISMATCH, note=f"error answer without a known code and a message: {stored.json}")
        elif expected is None:
            case.stored = Check(BOTH_FAIL, known_stale=entry_stored is not None)
        elif entry_stored is not None:
            case.stored = Check(KNOWN, note=_short(entry_stored["reason"]), known=True)
        else:
            case.stored = Check(ERROR)
        case.seconds = time.perf_counter() - t0
        return case
    if expected is None:
        if entry_stored is not None:
            case.stored = Check(KNOWN, note=_short(entry_stored["reason"]), known=True)
        else:
            case.stored = Check(MISMATCH, note="fptserve decodes a file pydicom cannot: unverified values")
        return _display_only_own(binary, tf, frame, ds, stored, case, t0)

    problems, absent = _header_problems(ds, stored.json, frame, frames, ts, had_ts)
    try:
        got = _fptserve_stored(stored, ds)
    except (ValueError, TypeError, AttributeError) as e:
        problems.append(str(e))
        got = None
    if got is not None and got.shape != expected.shape:
        problems.append(f"stored shape {got.shape} != pydicom {expected.shape}")
        got = None
    if got is not None:
        _classify(_max_diff(got, expected), tol, entry_stored, case.stored, "stored")
    if problems:
        if entry_stored is not None:
            case.stored = Check(KNOWN, case.stored.max_diff, _short(entry_stored["reason"]), known=True)
        else:
            note = "; ".join(problems + ([case.stored.note] if case.stored.note else []))
            case.stored = Check(MISMATCH, case.stored.max_diff, _short(note, 300))
    if absent:
        extra = "JSON lacks " + ", ".join(absent)
        case.stored.note = f"{case.stored.note}; {extra}" if case.stored.note else extra
    want_photometric = expected_output_photometric(photometric, "stored")
    if stored.json.get("output_photometric") != want_photometric:
        extra = f"output_photometric {stored.json.get('output_photometric')!r}, expected {want_photometric!r}"
        case.stored.note = f"{case.stored.note}; {extra}" if case.stored.note else extra

    # fptserve, display
    disp = run_decode(binary, tf.path, frame, "display")
    case.seconds = time.perf_counter() - t0
    if disp.crashed:
        case.display = Check(CRASH, note=disp.describe())
        return case
    if not disp.ok:
        case.display = Check(ERROR, note=_short(disp.describe()))
        if entry_display is not None:
            case.display = Check(KNOWN, note=_short(entry_display["reason"]), known=True)
        return case
    arr = disp.array
    if arr is None or arr.dtype != np.uint8 or arr.shape != (int(ds.Rows), int(ds.Columns), 3):
        shape = None if arr is None else (arr.dtype, arr.shape)
        case.display = Check(MISMATCH, note=f"display .npy {shape}, expected uint8 ({ds.Rows}, {ds.Columns}, 3)")
        return case
    try:
        from_pydicom = ref.display(ds, expected, frame)
        from_own = ref.display(ds, got, frame) if got is not None and got.shape == expected.shape else None
    except Exception as e:  # noqa: BLE001
        case.display = Check(MISMATCH, note=f"reference policy failed: {_short(e)}")
        return case
    own_diff = None if from_own is None else _max_diff(arr, from_own)
    diff = _max_diff(arr, from_pydicom)
    _classify(diff, tol, entry_display, case.display, "display")
    if case.display.outcome == MISMATCH and own_diff == 0 and case.stored.outcome in (TOLERANCE,):
        # the codecs differ within tolerance and the window magnifies it; the policy is exact
        case.display.outcome = TOLERANCE
        case.display.note = f"policy exact on fptserve's own values; stored |diff| {case.stored.max_diff} magnified to {diff}"
    if own_diff not in (None, 0) and case.display.outcome != KNOWN:
        case.display.outcome = MISMATCH
        case.display.note = _short(f"policy on fptserve's own stored values differs by {own_diff}; " + case.display.note, 300)
    return case


def _display_only_own(binary, tf, frame, ds, stored: Answer, case: Case, t0: float) -> Case:
    """pydicom cannot decode: still check the display policy on fptserve's own values."""
    disp = run_decode(binary, tf.path, frame, "display")
    case.seconds = time.perf_counter() - t0
    if disp.crashed:
        case.display = Check(CRASH, note=disp.describe())
        return case
    if not disp.ok or disp.array is None:
        case.display = Check(ERROR, note=_short(disp.describe()))
        return case
    try:
        own = ref.display(ds, _fptserve_stored(stored, ds), frame)
        d = _max_diff(disp.array, own)
        case.display = Check(EXACT if d == 0 else MISMATCH, d, "" if d == 0 else f"policy on fptserve's own values differs by {d}")
    except Exception as e:  # noqa: BLE001
        case.display = Check(NA, note=f"policy not checked: {_short(e)}")
    return case


def cases_for(tf: TestFile) -> list[int]:
    """Frame 0 and, for multi-frame files, the last frame."""
    ds, _ = ref.read_dataset(tf.path)
    try:
        n = ref.number_of_frames(ds)
    except ValueError:
        return [0]
    return [0] if n <= 1 else [0, n - 1]


def run_parity(binary: Path = DEFAULT_BINARY, files: list[TestFile] | None = None, workers: int | None = None,
               known: list[dict[str, Any]] | None = None) -> list[Case]:
    ref.require_plugins()
    binary = Path(binary)
    if not binary.exists():
        raise FileNotFoundError(f"{binary} is missing: build it with `cargo build`")
    files = pixel_test_files() if files is None else files
    known = load_known() if known is None else known
    jobs = [(tf, frame) for tf in files for frame in cases_for(tf)]
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda job: compare_case(binary, job[0], job[1], known), jobs))
    return results


# --------------------------------------------------------------------------- robustness


@dataclass
class Robustness:
    file: str
    pixel_data: bool
    pydicom: str  # "decodes", or why not
    answer: str
    crashed: bool
    clear: bool  # ok, or a known error code with a message


def check_robustness(binary: Path, tf: TestFile) -> Robustness:
    """`fptserve decode` on any file (not DICOM, no pixel data, broken): ok or a clear error."""
    try:
        ds, _ = ref.read_dataset(tf.path)
        has_pixels = "PixelData" in ds
        if has_pixels:
            ref.pydicom_frame(ds, 0)
            pyd = "decodes"
        else:
            pyd = "no Pixel Data"
    except Exception as e:  # noqa: BLE001
        has_pixels = False
        pyd = _short(f"{type(e).__name__}: {e}", 100)
    a = run_decode(binary, tf.path, None, "stored")
    clear = a.ok or (
        not a.crashed
        and a.json.get("code") in ERROR_CODES
        and bool(str(a.json.get("message", "")).strip())
    )
    return Robustness(tf.name, has_pixels, pyd, _short(a.describe(), 160), a.crashed, clear)


def run_robustness(binary: Path = DEFAULT_BINARY, workers: int | None = None) -> list[Robustness]:
    files = all_test_files()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda tf: check_robustness(Path(binary), tf), files))


# --------------------------------------------------------------------------- report


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_by_syntax(results: list[Case]) -> dict[str, Counter]:
    by = defaultdict(Counter)
    for c in results:
        by[c.ts][c.outcome] += 1
    return by


def markdown(results: list[Case], robustness: list[Robustness] | None, binary: Path, seconds: float) -> str:
    import pydicom

    versions = []
    for module, package in [("pydicom", "pydicom"), *ref.REQUIRED_PLUGINS.items()]:
        try:
            from importlib.metadata import version

            versions.append(f"{package} {version(package)}")
        except Exception:  # noqa: BLE001
            versions.append(f"{package} (missing)")
    lines = [
        "# DICOM parity: fptserve vs pydicom",
        "",
        "Generated by `.venv/bin/python tools/dicom_parity.py` (do not edit by hand). Reference: "
        + ", ".join(dict.fromkeys(versions)) + f"; binary `{_rel(binary)}`; {seconds:.0f} s.",
        "",
        "Every file with pixel data in the `pydicom` and `pydicom-data` wheels, frame 0 and (multi-frame) the last",
        "frame. *stored*: `fptserve decode --output stored` vs pydicom's `pixel_array` (YBR converted to RGB, palette",
        "indices); *display*: `--output display` vs the pixel policy `auto` (tests/python/dicom_reference.py) applied",
        "to pydicom's values, and, exactly, to fptserve's own stored values. Tolerance: 0 for lossless syntaxes, 1 for",
        "lossy ones, 3 for colour JPEG baseline/extended. `error (both fail)`: fptserve answers an error and pydicom",
        "cannot decode the file either (agreement). Known differences: tests/python/dicom_known_differences.json.",
        "",
        "## Summary by transfer syntax ((file, frame) cases, worst of stored and display)",
        "",
        "| transfer syntax | name | " + " | ".join(OUTCOMES) + " | total |",
        "|---|---|" + "---:|" * (len(OUTCOMES) + 1),
    ]
    by = summary_by_syntax(results)
    total = Counter()
    for ts in sorted(by, key=lambda u: [int(x) for x in u.split(".") if x.isdigit()] if u else [0]):
        counts = by[ts]
        total.update(counts)
        lines.append(f"| {ts or '(none)'} | {syntax_name(ts)} | " + " | ".join(str(counts.get(o, 0) or "") for o in OUTCOMES)
                     + f" | {sum(counts.values())} |")
    lines.append("| **all** | | " + " | ".join(f"**{total.get(o, 0)}**" for o in OUTCOMES) + f" | **{sum(total.values())}** |")
    lines += [
        "",
        "## Every (file, frame)",
        "",
        "| file | frame | transfer syntax | photometric | bits (alloc/stored) | frames | outcome | stored | display | max abs diff | note |",
        "|---|---:|---|---|---|---:|---|---|---|---:|---|",
    ]
    for c in sorted(results, key=lambda c: (c.file.lower(), c.frame)):
        diff = "" if c.max_diff is None else str(c.max_diff)
        lines.append(
            f"| {_cell(c.file)} | {c.frame} | {c.ts or '(none)'} {_cell(c.ts_name)} | {_cell(c.photometric)} | {c.bits} | "
            f"{c.frames or '?'} | {c.outcome} | {c.stored.outcome} | {c.display.outcome} | {diff} | {_cell(c.note())} |"
        )
    if robustness is not None:
        lines += [
            "",
            "## Every file pydicom ships, decoded as is (robustness: ok or a clear error, never a crash)",
            "",
            "Files whose pixel data pydicom decodes are covered above; this lists the others (not DICOM, no pixel data,",
            "deliberately broken) and fptserve's answer.",
            "",
            "| file | pydicom | fptserve | clear |",
            "|---|---|---|---|",
        ]
        for r in sorted(robustness, key=lambda r: r.file.lower()):
            if r.pydicom == "decodes" and r.clear:
                continue
            lines.append(f"| {_cell(r.file)} | {_cell(r.pydicom)} | {_cell(r.answer)} | {'yes' if r.clear else '**NO**'} |")
    lines.append("")
    return "\n".join(lines)


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", type=Path, default=DEFAULT_BINARY)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-robustness", action="store_true", help="skip decoding the files without pixel data")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    results = run_parity(args.binary, workers=args.workers)
    robustness = None if args.no_robustness else run_robustness(args.binary, args.workers)
    seconds = time.perf_counter() - t
    args.out.write_text(markdown(results, robustness, args.binary, seconds))
    counts = Counter(c.outcome for c in results)
    print(f"{len(results)} (file, frame) cases in {seconds:.0f} s: "
          + ", ".join(f"{o} {counts[o]}" for o in OUTCOMES if counts[o]) + f" -> {args.out}")
    bad = [c for c in results if c.outcome in (MISMATCH, CRASH)]
    for c in bad:
        print(f"  {c.outcome}: {c.file} frame {c.frame}: {c.note()}")
    if robustness:
        for r in robustness:
            if not r.clear:
                print(f"  unclear answer: {r.file}: {r.answer}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
