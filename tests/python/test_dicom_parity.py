"""fptserve's DICOM decoding and pixel policy against pydicom, on every file the PyPI wheels
`pydicom` and `pydicom-data` ship (issue 4). The comparison itself lives in
tools/dicom_parity.py (which also writes tests/python/DICOM_PARITY.md); these tests run it
and fail on:
  * a MISMATCH (values, shape or header fields differ beyond the syntax's tolerance, or
    fptserve decodes a file pydicom cannot) or a CRASH (exit code other than 0 / 1, hang);
  * an entry of tests/python/dicom_known_differences.json that no longer differs, or names
    a file that does not exist (the list stays honest);
  * any file pydicom ships (pixel data or not, deliberately broken or not) answered with
    anything but a decoded frame or a clear error (known code + message);
  * an error answer where pydicom decodes the file and no known difference explains it
    (test_error_only_where_pydicom_fails_or_explained).
Missing reference plugins are a failure with the install hint, never a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicom_parity as dp  # noqa: E402
import dicom_reference as ref  # noqa: E402

BINARY = Path(os.environ.get("FPTSERVE_BIN", ROOT / "target" / "debug" / "fptserve"))



try:
    PIXEL_FILES = {f.name: f for f in dp.pixel_test_files()}
    ALL_FILES = {f.name: f for f in dp.all_test_files()}
except Exception as e:  # noqa: BLE001 - reported by test_reference_is_installed
    PIXEL_FILES, ALL_FILES, COLLECT_ERROR = {}, {}, e
else:
    COLLECT_ERROR = None
OTHER_FILES = sorted(set(ALL_FILES) - set(PIXEL_FILES))


@pytest.fixture(scope="session")
def binary():
    assert BINARY.exists(), f"{BINARY} is missing: build it with `cargo build` (make test does)"
    probe = subprocess.run([str(BINARY), "decode", "--help"], capture_output=True, text=True)
    assert probe.returncode == 0, f"{BINARY} has no `decode` subcommand:\n{probe.stderr}"
    return BINARY


@lru_cache(maxsize=None)
def known():
    return tuple(dp.load_known())


@lru_cache(maxsize=None)
def cases(name: str) -> tuple:
    tf = PIXEL_FILES[name]
    return tuple(dp.compare_case(BINARY, tf, frame, list(known())) for frame in dp.cases_for(tf))


def describe(c: dp.Case) -> str:
    return (f"{c.file} frame {c.frame} ({c.ts} {c.ts_name}, {c.photometric}, {c.bits}): "
            f"stored {c.stored.outcome}, display {c.display.outcome}, max |diff| {c.max_diff}: {c.note()}")


def test_reference_is_installed():
    """pydicom's plugins and pydicom-data are there, and the test files are found offline."""
    ref.require_plugins()
    assert COLLECT_ERROR is None, f"listing pydicom's test files failed: {COLLECT_ERROR!r}; {ref.INSTALL_HINT}"
    from_data_store = [f for f in PIXEL_FILES.values() if "data_store" in f.path]
    assert len(from_data_store) >= 60, f"pydicom-data's files are missing ({len(from_data_store)} found): {ref.INSTALL_HINT}"
    assert len(PIXEL_FILES) >= 150, f"only {len(PIXEL_FILES)} test files with pixel data: {ref.INSTALL_HINT}"


@pytest.mark.parametrize("name", sorted(PIXEL_FILES))
def test_decode_matches_pydicom(binary, name):
    ref.require_plugins()
    bad = []
    for c in cases(name):
        if c.outcome in (dp.MISMATCH, dp.CRASH):
            bad.append(describe(c))
        if c.stored.known_stale or c.display.known_stale:
            bad.append(f"{c.file} frame {c.frame} is listed in {dp.KNOWN_DIFFERENCES.name} but no longer differs: "
                       f"remove the entry ({describe(c)})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", sorted(PIXEL_FILES))
def test_error_only_where_pydicom_fails_or_explained(binary, name):
    """An error status is only accepted where pydicom cannot decode the file either, or where
    dicom_known_differences.json says why. UNIMPLEMENTED must name what is not implemented."""
    problems = []
    for c in cases(name):
        if c.outcome == dp.ERROR:
            problems.append(f"fptserve answers an error where pydicom decodes: {describe(c)}")
        if c.fptserve_code == "UNIMPLEMENTED":
            named = [x for x in (c.ts, c.photometric, c.ts_name) if x and x in c.fptserve_error]
            if not named and "Bits" not in c.fptserve_error:
                problems.append(f"UNIMPLEMENTED without naming the transfer syntax or photometric: {describe(c)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", OTHER_FILES)
def test_other_files_answer_clearly(binary, name):
    """Files pydicom ships that it cannot read as an image (not DICOM, no pixel data,
    deliberately broken): fptserve answers a clear error, never a crash, and does not
    claim to decode what pydicom finds no pixel data in."""
    r = dp.check_robustness(binary, ALL_FILES[name])
    assert not r.crashed, f"{name}: crashed: {r.answer}"
    assert r.clear, f"{name}: unclear answer: {r.answer}"
    if r.answer == "ok" and not dp.known_entry(list(known()), name, 0, "stored"):
        pytest.fail(f"{name}: fptserve decodes a file in which pydicom finds no decodable pixel data ({r.pydicom})")


def test_known_differences_name_real_files():
    entries = dp.load_known()
    names = set(ALL_FILES)
    stale = [e["file"] for e in entries if e["file"] not in names]
    assert not stale, f"{dp.KNOWN_DIFFERENCES.name} names files pydicom does not ship: {stale}"
    for e in entries:
        assert len(e["reason"].strip()) >= 20, f"explain the known difference for {e['file']}"
