//! A task's saliency overlay as DICOM: a Secondary Capture Image instance in the classified
//! instance's patient and study (a new series, the source referenced as its source image),
//! so that any PACS viewer shows where the model looked next to the image itself. The
//! Structured Report of the same call references it ([`crate::structured_report`]).
//!
//! Pixels: the overlay ([`crate::explain::overlay`]) at the size of the classified frame,
//! 8-bit RGB, uncompressed. Image Type `DERIVED\SECONDARY`, Conversion Type `WSD`, Burned In
//! Annotation `NO`; the Derivation Description names the task, adapter version and class.

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::dicom_instance::{self, Identity, InstanceError, Made, Source, sequence, text};
use crate::engine::TaskOutcome;
use crate::explain::SaliencyMap;
use crate::structured_report::Capture;

/// Secondary Capture Image Storage.
pub const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";
const MADE: &str = "saliency secondary capture";

/// The Secondary Capture of `overlay` (`result`'s `map` drawn over the classified frame) for
/// the instance `source` (the parsed classified file), made at `now`; `request` makes its
/// UIDs repeatable as for the report (with the task's place in the call, so each task's
/// capture has its own).
pub fn build(
    source: &InMemDicomObject,
    result: &TaskOutcome,
    map: &SaliencyMap,
    overlay: &image::RgbImage,
    task_index: usize,
    now: &(String, String),
    request: Option<&str>,
) -> Result<(Vec<u8>, Capture), InstanceError> {
    let src = Source::read(source, MADE)?;
    let kind = format!("secondary capture\0{task_index}\0{}", result.task);
    let identity = Identity::new(&kind, &src, request);
    let description = format!("fptserve saliency: {} ({})", result.task, map.class_name);
    let mut sc = dicom_instance::new_instance(
        source,
        &Made {
            sop_class: SECONDARY_CAPTURE,
            identity: &identity,
            modality: "OT",
            series_number: "9002",
            series_description: &truncate(&description, 64),
            now,
        },
    );
    let (width, height) = overlay.dimensions();
    let dimension = |v: u32| {
        u16::try_from(v).map_err(|_| InstanceError::Write {
            made: MADE,
            message: format!("a {v}-pixel side does not fit DICOM's Rows/Columns"),
        })
    };
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    // General Series, Type 2C (for paired body parts): the source's, else present and empty
    let laterality = source
        .element_opt(tags::LATERALITY)
        .ok()
        .flatten()
        .cloned()
        .unwrap_or_else(|| DataElement::new(tags::LATERALITY, VR::CS, PrimitiveValue::Empty));
    sc.put(laterality);
    for element in [
        // SC Equipment
        text(tags::CONVERSION_TYPE, VR::CS, "WSD"),
        // General Image
        text(tags::IMAGE_TYPE, VR::CS, "DERIVED\\SECONDARY"),
        DataElement::new(tags::PATIENT_ORIENTATION, VR::CS, PrimitiveValue::Empty),
        text(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"),
        text(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        text(
            tags::DERIVATION_DESCRIPTION,
            VR::ST,
            derivation(result, map),
        ),
        sequence(tags::SOURCE_IMAGE_SEQUENCE, vec![src.referenced_sop()]),
        // Image Pixel
        us(tags::SAMPLES_PER_PIXEL, 3),
        text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB"),
        us(tags::PLANAR_CONFIGURATION, 0),
        us(tags::ROWS, dimension(height)?),
        us(tags::COLUMNS, dimension(width)?),
        us(tags::BITS_ALLOCATED, 8),
        us(tags::BITS_STORED, 8),
        us(tags::HIGH_BIT, 7),
        us(tags::PIXEL_REPRESENTATION, 0),
        DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::U8(overlay.as_raw().clone().into()),
        ),
    ] {
        sc.put(element);
    }
    let bytes = dicom_instance::write(sc, MADE)?;
    Ok((
        bytes,
        Capture {
            sop_class: SECONDARY_CAPTURE.to_string(),
            identity,
        },
    ))
}

/// What the image shows, in words (Derivation Description, at most 1024 characters).
fn derivation(result: &TaskOutcome, map: &SaliencyMap) -> String {
    truncate(
        &format!(
            "fptserve saliency map of task {} (adapter version {}) for class {:?} over a \
             {}x{} patch grid, drawn over the classified frame; not for diagnosis on its own",
            result.task, result.adapter_version, map.class_name, map.rows, map.columns
        ),
        1024,
    )
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}
