//! New DICOM instances fptserve makes for a classified one (the Structured Report, the
//! saliency Secondary Capture): in the source's patient and study, a new series, the source
//! referenced. What they share is here once: the copied patient and study attributes, the
//! UIDs (fresh, or derived from the caller's request id so that a retried call names the
//! same instances), the series and SOP common attributes, and the Part 10 file.
//!
//! The patient and study attributes are copied element by element from the source (with
//! its Specific Character Set), never parsed or logged.

use std::sync::atomic::{AtomicU64, Ordering};

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use sha2::{Digest, Sha256};

const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
/// fptserve's implementation class UID (a 2.25 UUID-derived UID made for it).
const IMPLEMENTATION_CLASS_UID: &str = "2.25.186530113408093152440383457223174213";
/// fptserve's private coding scheme (class codes: code value = class index).
pub const PRIVATE_SCHEME: &str = "99FPTSERVE";

/// Source attributes copied into a new instance as they are: Patient, General Study and
/// Patient Study modules (the ones a PACS files the instance by).
const COPIED: &[Tag] = &[
    tags::SPECIFIC_CHARACTER_SET,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_ID,
    tags::ACCESSION_NUMBER,
    tags::STUDY_DESCRIPTION,
];

/// Why no instance could be made.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The source lacks an identifier the new instance must reference.
    #[error("cannot reference the source instance in a {made}: it has no {missing}")]
    MissingSource {
        /// What was being made.
        made: &'static str,
        /// The missing attribute.
        missing: &'static str,
    },
    /// Writing the instance failed (a bug, not bad input).
    #[error("writing the {made}: {message}")]
    Write {
        /// What was being made.
        made: &'static str,
        /// Why.
        message: String,
    },
}

/// A new UID under the 2.25 root (ITU-T X.667: a UUID as a decimal integer) from a
/// digest of the time, the process, a counter and `seed`: unique without a random source.
fn new_uid(seed: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hash = Sha256::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    hash.update(now.to_le_bytes());
    hash.update(std::process::id().to_le_bytes());
    hash.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hash.update(seed.as_bytes());
    uid_from(hash)
}

/// The UID for `parts` alone (each length-prefixed): the same parts give the same UID in
/// every process, different ones a different UID (a UUID version 4 digest, as above).
fn derived_uid(parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"fptserve structured report UID\0");
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    uid_from(hash)
}

fn uid_from(hash: Sha256) -> String {
    let digest = hash.finalize();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&digest[..16]);
    // RFC 4122 version 4 / variant bits, as a random UUID has them
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    format!("2.25.{}", u128::from_be_bytes(uuid))
}

pub fn text(tag: Tag, vr: VR, value: impl Into<String>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value.into()))
}

pub fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

pub fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        text(tags::CODE_VALUE, VR::SH, value),
        text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        text(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

/// What a new instance needs of the classified one.
pub struct Source {
    /// Study Instance UID.
    pub study: String,
    /// Series Instance UID.
    pub series: String,
    /// SOP Class UID.
    pub sop_class: String,
    /// SOP Instance UID.
    pub sop_instance: String,
}

impl Source {
    /// The source's UIDs, read from its parsed header, for making a `made`.
    pub fn read(obj: &InMemDicomObject, made: &'static str) -> Result<Self, InstanceError> {
        let uid = |tag: Tag, missing: &'static str| {
            obj.element_opt(tag)
                .ok()
                .flatten()
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_matches(['\0', ' ']).to_string())
                .filter(|s| !s.is_empty())
                .ok_or(InstanceError::MissingSource { made, missing })
        };
        Ok(Source {
            study: uid(tags::STUDY_INSTANCE_UID, "Study Instance UID")?,
            series: uid(tags::SERIES_INSTANCE_UID, "Series Instance UID")?,
            sop_class: uid(tags::SOP_CLASS_UID, "SOP Class UID")?,
            sop_instance: uid(tags::SOP_INSTANCE_UID, "SOP Instance UID")?,
        })
    }

    /// The source instance as a referenced SOP.
    pub fn referenced_sop(&self) -> InMemDicomObject {
        referenced_sop(&self.sop_class, &self.sop_instance)
    }
}

/// An instance as a referenced SOP (class and instance UID).
pub fn referenced_sop(class: &str, instance: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, class),
        text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, instance),
    ])
}

/// A new instance's identity: its series and SOP instance UIDs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Series Instance UID.
    pub series: String,
    /// SOP Instance UID.
    pub sop_instance: String,
}

impl Identity {
    /// The UIDs of the `kind` instance made for `source`: with `request` (the caller's
    /// request id with what else makes the call what it is) a function of it, the kind and
    /// the source's UIDs, so a repeated call names the same instance, which a PACS stores
    /// once; without it new each time.
    pub fn new(kind: &str, source: &Source, request: Option<&str>) -> Self {
        let made_for = |what: &str| match request {
            // the report (kind "") keeps the UIDs it had before other kinds existed, so a
            // request retried across an upgrade still names the report it made
            Some(id) if kind.is_empty() => {
                derived_uid(&[what, &source.study, &source.sop_instance, id])
            }
            Some(id) => derived_uid(&[what, &source.study, &source.sop_instance, id, kind]),
            None => new_uid(&source.sop_instance),
        };
        Identity {
            series: made_for("series"),
            sop_instance: made_for("sop instance"),
        }
    }
}

/// What a new instance says of itself: class, identity, modality and series.
pub struct Made<'a> {
    /// SOP Class UID.
    pub sop_class: &'a str,
    /// Its UIDs.
    pub identity: &'a Identity,
    /// Modality (`SR`, `OT`).
    pub modality: &'a str,
    /// Series Number.
    pub series_number: &'a str,
    /// Series Description.
    pub series_description: &'a str,
    /// Instance creation date and time (DICOM DA and TM).
    pub now: &'a (String, String),
}

/// A new instance in `source`'s patient and study: the Patient, General Study and Patient
/// Study attributes copied, and the SOP Common, General Series and equipment attributes of
/// `made`. The caller adds its modules.
pub fn new_instance(source: &InMemDicomObject, made: &Made<'_>) -> InMemDicomObject {
    let mut obj = InMemDicomObject::new_empty();
    for &tag in COPIED {
        if let Ok(Some(element)) = source.element_opt(tag) {
            obj.put(element.clone());
        }
    }
    // Type 2 attributes of the Patient and General Study modules: present, maybe empty
    for (tag, vr) in [
        (tags::PATIENT_NAME, VR::PN),
        (tags::PATIENT_ID, VR::LO),
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::STUDY_DATE, VR::DA),
        (tags::STUDY_TIME, VR::TM),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
        (tags::STUDY_ID, VR::SH),
        (tags::ACCESSION_NUMBER, VR::SH),
    ] {
        if obj.element_opt(tag).ok().flatten().is_none() {
            obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
        }
    }
    let (date, time) = made.now;
    for element in [
        text(tags::SOP_CLASS_UID, VR::UI, made.sop_class),
        text(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            made.identity.sop_instance.as_str(),
        ),
        text(tags::INSTANCE_CREATION_DATE, VR::DA, date.as_str()),
        text(tags::INSTANCE_CREATION_TIME, VR::TM, time.as_str()),
        text(tags::MODALITY, VR::CS, made.modality),
        text(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            made.identity.series.as_str(),
        ),
        text(tags::SERIES_NUMBER, VR::IS, made.series_number),
        text(tags::SERIES_DESCRIPTION, VR::LO, made.series_description),
        text(tags::INSTANCE_NUMBER, VR::IS, "1"),
        text(tags::MANUFACTURER, VR::LO, "fptserve"),
        text(tags::SOFTWARE_VERSIONS, VR::LO, env!("CARGO_PKG_VERSION")),
        text(tags::CONTENT_DATE, VR::DA, date.as_str()),
        text(tags::CONTENT_TIME, VR::TM, time.as_str()),
    ] {
        obj.put(element);
    }
    obj
}

/// `obj` as a DICOM Part 10 file (explicit VR little endian).
pub fn write(obj: InMemDicomObject, made: &'static str) -> Result<Vec<u8>, InstanceError> {
    let error = |e: &dyn std::fmt::Display| InstanceError::Write {
        made,
        message: e.to_string(),
    };
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_VR_LITTLE_ENDIAN)
                .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
                .implementation_version_name(concat!("FPTSERVE_", env!("CARGO_PKG_VERSION"))),
        )
        .map_err(|e| error(&e))?;
    let mut bytes = Vec::new();
    file.write_all(&mut bytes).map_err(|e| error(&e))?;
    Ok(bytes)
}

/// Today's date and the time now (UTC), as DICOM DA and TM.
pub fn now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    date_time(secs)
}

/// A Unix time (UTC) as DICOM DA and TM.
fn date_time(unix_secs: u64) -> (String, String) {
    let (days, rem) = (unix_secs / 86_400, unix_secs % 86_400);
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}{month:02}{day:02}"),
        format!("{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_fresh_and_valid() {
        let a = new_uid("1.2.3");
        let b = new_uid("1.2.3");
        assert_ne!(a, b);
        let c = derived_uid(&["sop instance", "1.2.3", "request-1"]);
        assert_eq!(c, derived_uid(&["sop instance", "1.2.3", "request-1"]));
        assert_ne!(c, derived_uid(&["sop instance", "1.2.3", "request-2"]));
        assert_ne!(c, derived_uid(&["sop instance", "1.2.3r", "equest-1"]));
        for uid in [&a, &b, &c] {
            assert!(uid.len() <= 64 && uid.starts_with("2.25."), "{uid}");
            assert!(uid[5..].bytes().all(|c| c.is_ascii_digit()) && !uid[5..].starts_with('0'));
        }
    }

    #[test]
    fn unix_times_become_the_utc_date_and_time() {
        // expected values from Python's datetime.fromtimestamp(s, timezone.utc)
        for (secs, date, time) in [
            (0, "19700101", "000000"),
            (951_782_400, "20000229", "000000"),
            (951_868_799, "20000229", "235959"),
            (1_795_564_799, "20261124", "235959"),
            (4_107_542_399, "21000228", "235959"),
        ] {
            assert_eq!(
                date_time(secs),
                (date.to_string(), time.to_string()),
                "{secs}"
            );
        }
    }
}
