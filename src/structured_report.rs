//! Results as DICOM: a Comprehensive SR for the classified instance, so that a PACS keeps
//! the AI result next to the image, in the same patient and study, in the style of IHE AI
//! Results (a new series and instance, the source instance referenced as evidence, the
//! algorithm's name and version, VerificationFlag UNVERIFIED until a human verifies it).
//!
//! Content tree (README, "Structured Report"):
//!
//! ```text
//! CONTAINER (126000, DCM, "Imaging Measurement Report")
//!   CONTAINS CONTAINER (125007, DCM, "Measurement Group")       one per task
//!     CONTAINS TEXT  (111001, DCM, "Algorithm Name")    = task
//!     CONTAINS TEXT  (111003, DCM, "Algorithm Version") = adapter version
//!     CONTAINS CODE  (121071, DCM, "Finding")           = (i, 99FPTSERVE, label)
//!     CONTAINS NUM   (i, 99FPTSERVE, class name)        = probability, unit ("1", UCUM)
//!     CONTAINS IMAGE (121112, DCM, "Source of Measurement") -> the source instance
//! ```
//!
//! The patient and study attributes are copied element by element from the source (with
//! its Specific Character Set), never parsed or logged.

use std::sync::atomic::{AtomicU64, Ordering};

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use sha2::{Digest, Sha256};

use crate::engine::TaskOutcome;

/// Comprehensive SR Storage.
pub const COMPREHENSIVE_SR: &str = "1.2.840.10008.5.1.4.1.1.88.33";
const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
/// fptserve's implementation class UID (a 2.25 UUID-derived UID made for it).
const IMPLEMENTATION_CLASS_UID: &str = "2.25.186530113408093152440383457223174213";
/// The private coding scheme of class codes (code value = class index).
const CLASS_SCHEME: &str = "99FPTSERVE";

/// Source attributes copied into the report as they are: Patient, General Study and
/// Patient Study modules (the ones a PACS files the report by).
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

/// Why no report could be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The source lacks an identifier the report must reference.
    #[error("cannot reference the source instance in a report: it has no {0}")]
    MissingSource(&'static str),
    /// Writing the report failed (a bug, not bad input).
    #[error("writing the structured report: {0}")]
    Write(String),
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

fn text(tag: Tag, vr: VR, value: impl Into<String>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value.into()))
}

fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        text(tags::CODE_VALUE, VR::SH, value),
        text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        text(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

/// A content item: relationship CONTAINS, its value type and concept name.
fn item(value_type: &str, concept: InMemDicomObject) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        text(tags::RELATIONSHIP_TYPE, VR::CS, "CONTAINS"),
        text(tags::VALUE_TYPE, VR::CS, value_type),
        sequence(tags::CONCEPT_NAME_CODE_SEQUENCE, vec![concept]),
    ])
}

fn text_item(concept: InMemDicomObject, value: &str) -> InMemDicomObject {
    let mut i = item("TEXT", concept);
    i.put(text(tags::TEXT_VALUE, VR::UT, value));
    i
}

/// The source instance as a referenced SOP.
fn referenced_sop(source: &Source) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        text(
            tags::REFERENCED_SOP_CLASS_UID,
            VR::UI,
            source.sop_class.as_str(),
        ),
        text(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            source.sop_instance.as_str(),
        ),
    ])
}

/// One task's measurement group.
fn group(result: &TaskOutcome, source: &Source) -> InMemDicomObject {
    let mut content = vec![
        text_item(code("111001", "DCM", "Algorithm Name"), &result.task),
        text_item(
            code("111003", "DCM", "Algorithm Version"),
            &result.adapter_version,
        ),
    ];
    let label_index = result
        .scores
        .iter()
        .position(|s| s.name == result.label)
        .unwrap_or_default();
    let mut finding = item("CODE", code("121071", "DCM", "Finding"));
    finding.put(sequence(
        tags::CONCEPT_CODE_SEQUENCE,
        vec![code(&label_index.to_string(), CLASS_SCHEME, &result.label)],
    ));
    content.push(finding);
    for (index, score) in result.scores.iter().enumerate() {
        let mut num = item("NUM", code(&index.to_string(), CLASS_SCHEME, &score.name));
        let probability = f64::from(score.probability);
        num.put(sequence(
            tags::MEASURED_VALUE_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                // DS holds at most 16 characters
                text(tags::NUMERIC_VALUE, VR::DS, format!("{probability:.12}")),
                DataElement::new(
                    tags::FLOATING_POINT_VALUE,
                    VR::FD,
                    PrimitiveValue::from(probability),
                ),
                sequence(
                    tags::MEASUREMENT_UNITS_CODE_SEQUENCE,
                    vec![code("1", "UCUM", "no units")],
                ),
            ])],
        ));
        content.push(num);
    }
    let mut image = item("IMAGE", code("121112", "DCM", "Source of Measurement"));
    image.put(sequence(
        tags::REFERENCED_SOP_SEQUENCE,
        vec![referenced_sop(source)],
    ));
    content.push(image);

    let mut group = item("CONTAINER", code("125007", "DCM", "Measurement Group"));
    group.put(text(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    group.put(sequence(tags::CONTENT_SEQUENCE, content));
    group
}

/// What the report needs of the classified instance.
struct Source {
    study: String,
    series: String,
    sop_class: String,
    sop_instance: String,
}

fn uid(obj: &InMemDicomObject, tag: Tag, name: &'static str) -> Result<String, ReportError> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
        .filter(|s| !s.is_empty())
        .ok_or(ReportError::MissingSource(name))
}

/// The report, as a DICOM Part 10 file, of `results` for the instance `source` (the
/// parsed classified file), made at `now` (DICOM DA and TM).
///
/// `identity` (the caller's request id, frame and tasks) makes the report's Series and SOP
/// Instance UIDs a function of it and of the source's UIDs: the same request repeated
/// (a retry after a lost answer, a gateway restarted mid-call) gives the same report
/// identity, which a PACS stores once. Without it they are new each time.
pub fn build(
    source: &InMemDicomObject,
    results: &[TaskOutcome],
    now: (String, String),
    identity: Option<&str>,
) -> Result<Vec<u8>, ReportError> {
    let src = Source {
        study: uid(source, tags::STUDY_INSTANCE_UID, "Study Instance UID")?,
        series: uid(source, tags::SERIES_INSTANCE_UID, "Series Instance UID")?,
        sop_class: uid(source, tags::SOP_CLASS_UID, "SOP Class UID")?,
        sop_instance: uid(source, tags::SOP_INSTANCE_UID, "SOP Instance UID")?,
    };
    let mut sr = InMemDicomObject::new_empty();
    for &tag in COPIED {
        if let Ok(Some(element)) = source.element_opt(tag) {
            sr.put(element.clone());
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
        if sr.element_opt(tag).ok().flatten().is_none() {
            sr.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
        }
    }
    let (date, time) = now;
    let made_for = |what: &str, source_uid: &str| match identity {
        Some(id) => derived_uid(&[what, &src.study, source_uid, id]),
        None => new_uid(source_uid),
    };
    let sop_instance = made_for("sop instance", &src.sop_instance);
    for element in [
        text(tags::SOP_CLASS_UID, VR::UI, COMPREHENSIVE_SR),
        text(tags::SOP_INSTANCE_UID, VR::UI, sop_instance.as_str()),
        text(tags::INSTANCE_CREATION_DATE, VR::DA, date.as_str()),
        text(tags::INSTANCE_CREATION_TIME, VR::TM, time.as_str()),
        text(tags::MODALITY, VR::CS, "SR"),
        text(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            made_for("series", &src.sop_instance),
        ),
        text(tags::SERIES_NUMBER, VR::IS, "9001"),
        text(tags::SERIES_DESCRIPTION, VR::LO, "fptserve AI results"),
        text(tags::INSTANCE_NUMBER, VR::IS, "1"),
        text(tags::MANUFACTURER, VR::LO, "fptserve"),
        text(tags::SOFTWARE_VERSIONS, VR::LO, env!("CARGO_PKG_VERSION")),
        text(tags::CONTENT_DATE, VR::DA, date.as_str()),
        text(tags::CONTENT_TIME, VR::TM, time.as_str()),
        text(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"),
        text(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"),
        sequence(
            tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
            Vec::new(),
        ),
        sequence(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, Vec::new()),
        // the evidence: the classified instance, by study, series and instance
        sequence(
            tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                text(tags::STUDY_INSTANCE_UID, VR::UI, src.study.as_str()),
                sequence(
                    tags::REFERENCED_SERIES_SEQUENCE,
                    vec![InMemDicomObject::from_element_iter([
                        text(tags::SERIES_INSTANCE_UID, VR::UI, src.series.as_str()),
                        sequence(tags::REFERENCED_SOP_SEQUENCE, vec![referenced_sop(&src)]),
                    ])],
                ),
            ])],
        ),
        // the document root
        text(tags::VALUE_TYPE, VR::CS, "CONTAINER"),
        sequence(
            tags::CONCEPT_NAME_CODE_SEQUENCE,
            vec![code("126000", "DCM", "Imaging Measurement Report")],
        ),
        text(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"),
        sequence(
            tags::CONTENT_SEQUENCE,
            results.iter().map(|r| group(r, &src)).collect(),
        ),
    ] {
        sr.put(element);
    }
    let file = sr
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_VR_LITTLE_ENDIAN)
                .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
                .implementation_version_name(concat!("FPTSERVE_", env!("CARGO_PKG_VERSION"))),
        )
        .map_err(|e| ReportError::Write(e.to_string()))?;
    let mut bytes = Vec::new();
    file.write_all(&mut bytes)
        .map_err(|e| ReportError::Write(e.to_string()))?;
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
