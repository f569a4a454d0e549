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
//!     CONTAINS IMAGE (SALIENCY, 99FPTSERVE, "Saliency map")  -> its Secondary Capture
//! ```
//!
//! With saliency Secondary Captures (`explain.secondary_capture`), each task's group also
//! holds `IMAGE (SALIENCY, 99FPTSERVE, "Saliency map")` referencing its capture, listed in
//! Pertinent Other Evidence. The shared parts of a new instance (patient and study copied,
//! UIDs, Part 10 file) are [`crate::dicom_instance`]'s.

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::dicom_instance::{
    self, Identity, InstanceError, Made, PRIVATE_SCHEME, Source, code, referenced_sop, sequence,
    text,
};
use crate::engine::TaskOutcome;

/// Comprehensive SR Storage.
pub const COMPREHENSIVE_SR: &str = "1.2.840.10008.5.1.4.1.1.88.33";
const MADE: &str = "structured report";

/// A task's saliency Secondary Capture, for the report to reference.
pub struct Capture {
    /// SOP Class UID.
    pub sop_class: String,
    /// Its UIDs.
    pub identity: Identity,
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

fn image_item(concept: InMemDicomObject, referenced: InMemDicomObject) -> InMemDicomObject {
    let mut image = item("IMAGE", concept);
    image.put(sequence(tags::REFERENCED_SOP_SEQUENCE, vec![referenced]));
    image
}

/// One task's measurement group.
fn group(result: &TaskOutcome, source: &Source, capture: Option<&Capture>) -> InMemDicomObject {
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
        vec![code(
            &label_index.to_string(),
            PRIVATE_SCHEME,
            &result.label,
        )],
    ));
    content.push(finding);
    for (index, score) in result.scores.iter().enumerate() {
        let mut num = item("NUM", code(&index.to_string(), PRIVATE_SCHEME, &score.name));
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
    content.push(image_item(
        code("121112", "DCM", "Source of Measurement"),
        source.referenced_sop(),
    ));
    if let Some(capture) = capture {
        content.push(image_item(
            code("SALIENCY", PRIVATE_SCHEME, "Saliency map"),
            referenced_sop(&capture.sop_class, &capture.identity.sop_instance),
        ));
    }

    let mut group = item("CONTAINER", code("125007", "DCM", "Measurement Group"));
    group.put(text(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    group.put(sequence(tags::CONTENT_SEQUENCE, content));
    group
}

/// An evidence item: a study, and per series its referenced instances.
fn evidence(study: &str, series: Vec<(&str, Vec<InMemDicomObject>)>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        text(tags::STUDY_INSTANCE_UID, VR::UI, study),
        sequence(
            tags::REFERENCED_SERIES_SEQUENCE,
            series
                .into_iter()
                .map(|(uid, instances)| {
                    InMemDicomObject::from_element_iter([
                        text(tags::SERIES_INSTANCE_UID, VR::UI, uid),
                        sequence(tags::REFERENCED_SOP_SEQUENCE, instances),
                    ])
                })
                .collect(),
        ),
    ])
}

/// The report, as a DICOM Part 10 file, of `results` for the instance `source` (the
/// parsed classified file), made at `now` (DICOM DA and TM); `captures` holds each
/// result's saliency Secondary Capture, where one was made.
///
/// `identity` (the caller's request id, frame and tasks) makes the report's Series and SOP
/// Instance UIDs a function of it and of the source's UIDs: the same request repeated
/// (a retry after a lost answer, a gateway restarted mid-call) gives the same report
/// identity, which a PACS stores once. Without it they are new each time.
pub fn build(
    source: &InMemDicomObject,
    results: &[TaskOutcome],
    captures: &[Option<Capture>],
    now: (String, String),
    identity: Option<&str>,
) -> Result<Vec<u8>, InstanceError> {
    let src = Source::read(source, MADE)?;
    let uids = Identity::new("", &src, identity);
    let mut sr = dicom_instance::new_instance(
        source,
        &Made {
            sop_class: COMPREHENSIVE_SR,
            identity: &uids,
            modality: "SR",
            series_number: "9001",
            series_description: "fptserve AI results",
            now: &now,
        },
    );
    let capture_of = |i: usize| captures.get(i).and_then(Option::as_ref);
    let mut elements = vec![
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
            vec![evidence(
                &src.study,
                vec![(src.series.as_str(), vec![src.referenced_sop()])],
            )],
        ),
        // the document root
        text(tags::VALUE_TYPE, VR::CS, "CONTAINER"),
        sequence(
            tags::CONCEPT_NAME_CODE_SEQUENCE,
            vec![code("126000", "DCM", "Imaging Measurement Report")],
        ),
        text(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"),
        // the private scheme of the class and saliency codes, declared (SOP Common)
        sequence(
            tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, PRIVATE_SCHEME),
                text(
                    tags::CODING_SCHEME_NAME,
                    VR::ST,
                    "fptserve codes: class index of the task's adapter, saliency map",
                ),
                text(
                    tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
                    VR::ST,
                    "fptserve",
                ),
            ])],
        ),
        sequence(
            tags::CONTENT_SEQUENCE,
            results
                .iter()
                .enumerate()
                .map(|(i, r)| group(r, &src, capture_of(i)))
                .collect(),
        ),
    ];
    // the saliency captures the groups reference, each in its own series
    let made: Vec<(&str, Vec<InMemDicomObject>)> = captures
        .iter()
        .flatten()
        .map(|c| {
            (
                c.identity.series.as_str(),
                vec![referenced_sop(&c.sop_class, &c.identity.sop_instance)],
            )
        })
        .collect();
    if !made.is_empty() {
        elements.push(sequence(
            tags::PERTINENT_OTHER_EVIDENCE_SEQUENCE,
            vec![evidence(&src.study, made)],
        ));
    }
    for element in elements {
        sr.put(element);
    }
    dicom_instance::write(sr, MADE)
}
