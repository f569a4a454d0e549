//! Reading typed attributes from a parsed DICOM data set, absent and malformed values told
//! apart where it matters.

use dicom_object::InMemDicomObject;
use dicom_object::mem::InMemElement;

use crate::decode::DecodeError;

pub(super) fn element(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<&InMemElement> {
    obj.element_opt(tag).ok().flatten()
}

pub(super) fn string(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
    element(obj, tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

/// An unsigned integer attribute: absent is `Ok(None)`; present but not a number is an
/// error naming it (a wrong frame count must not silently become 1).
pub(super) fn uint(
    obj: &InMemDicomObject,
    tag: dicom_core::Tag,
    name: &str,
) -> Result<Option<u32>, DecodeError> {
    match element(obj, tag) {
        None => Ok(None),
        Some(e) if dicom_core::header::HasLength::is_empty(e) => Ok(None),
        Some(e) => e.to_int::<u32>().map(Some).map_err(|_| {
            DecodeError::Invalid(format!(
                "{name} ({:04X},{:04X}) is not a valid unsigned integer",
                tag.group(),
                tag.element()
            ))
        }),
    }
}

pub(super) fn floats(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Vec<f64> {
    element(obj, tag)
        .and_then(|e| e.to_multi_float64().ok())
        .unwrap_or_default()
}
