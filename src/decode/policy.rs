//! The DICOM pixel policy: which VOI turns a grey frame's modality values into display
//! values (the pipeline itself is in [`super::voi`]). A task's manifest names one, a
//! request may name another where the task allows it, and `fptserve decode` takes one on
//! its command line; all three spell it the same way and parse through
//! [`DicomPolicy::parse`].

use serde::{Deserialize, Serialize};

use super::DecodeError;
use super::voi::{VoiFunction, Window};

/// How a grey DICOM frame becomes display pixels. In a manifest it is spelled out as
/// `{"voi": "window", "window_center": 40, "window_width": 400, "voi_function": "linear"}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "Spelled", into = "Spelled")]
pub enum DicomPolicy {
    /// The file's first VOI LUT; else its first window; else 8-bit-or-less unsigned data
    /// with no modality transform as stored; else min-max over the frame.
    #[default]
    Auto,
    /// The frame's modality range stretched onto 0..=255.
    MinMax,
    /// An explicit window, whatever the file carries.
    Window(Window),
}

impl DicomPolicy {
    /// Parses the spelled-out form: `voi` is auto, window or minmax; a window needs a
    /// finite centre and a width > 0, and takes a function (linear by default,
    /// linear_exact or sigmoid). Other policies ignore the window fields.
    pub fn parse(
        voi: &str,
        window_center: Option<f64>,
        window_width: Option<f64>,
        voi_function: Option<&str>,
    ) -> Result<Self, DecodeError> {
        match voi {
            "auto" => Ok(DicomPolicy::Auto),
            "minmax" => Ok(DicomPolicy::MinMax),
            "window" => {
                let function = match voi_function {
                    None => VoiFunction::Linear,
                    Some(f) => VoiFunction::parse(f).ok_or_else(|| {
                        DecodeError::Invalid(format!(
                            "VOI function {f:?}: use linear, linear_exact or sigmoid"
                        ))
                    })?,
                };
                match (window_center, window_width) {
                    (Some(center), Some(width))
                        if center.is_finite() && width.is_finite() && width > 0.0 =>
                    {
                        Ok(DicomPolicy::Window(Window {
                            center,
                            width,
                            function,
                        }))
                    }
                    _ => Err(DecodeError::Invalid(
                        "a window pixel policy needs a finite window_center and a window_width > 0"
                            .into(),
                    )),
                }
            }
            other => Err(DecodeError::Invalid(format!(
                "dicom.voi {other:?} is not supported (auto, window or minmax)"
            ))),
        }
    }

    /// The `voi` name it parses from.
    pub fn voi(&self) -> &'static str {
        match self {
            DicomPolicy::Auto => "auto",
            DicomPolicy::MinMax => "minmax",
            DicomPolicy::Window(_) => "window",
        }
    }
}

/// The spelled-out form, as manifests and requests carry it.
#[derive(Deserialize, Serialize)]
struct Spelled {
    voi: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window_center: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window_width: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    voi_function: Option<String>,
}

impl TryFrom<Spelled> for DicomPolicy {
    type Error = DecodeError;

    fn try_from(s: Spelled) -> Result<Self, DecodeError> {
        DicomPolicy::parse(
            &s.voi,
            s.window_center,
            s.window_width,
            s.voi_function.as_deref(),
        )
    }
}

impl From<DicomPolicy> for Spelled {
    fn from(policy: DicomPolicy) -> Self {
        let window = match policy {
            DicomPolicy::Window(w) => Some(w),
            _ => None,
        };
        Spelled {
            voi: policy.voi().into(),
            window_center: window.map(|w| w.center),
            window_width: window.map(|w| w.width),
            voi_function: window.map(|w| w.function.name().into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_policy_and_refuses_what_it_cannot_apply() {
        assert_eq!(
            DicomPolicy::parse("auto", None, None, None).unwrap(),
            DicomPolicy::Auto
        );
        assert_eq!(
            DicomPolicy::parse("minmax", None, None, None).unwrap(),
            DicomPolicy::MinMax
        );
        assert_eq!(
            DicomPolicy::parse("window", Some(40.0), Some(400.0), Some("sigmoid")).unwrap(),
            DicomPolicy::Window(Window {
                center: 40.0,
                width: 400.0,
                function: VoiFunction::Sigmoid,
            })
        );
        let refused = |voi, c, w, f| DicomPolicy::parse(voi, c, w, f).unwrap_err().to_string();
        assert!(refused("window", Some(40.0), None, None).contains("window_width > 0"));
        assert!(refused("window", Some(40.0), Some(0.0), None).contains("window_width > 0"));
        assert!(refused("window", Some(f64::NAN), Some(1.0), None).contains("finite"));
        assert!(refused("window", Some(1.0), Some(1.0), Some("cubic")).contains("cubic"));
        assert!(refused("voi-lut", None, None, None).contains("not supported"));
    }

    #[test]
    fn spelled_form_round_trips() {
        for policy in [
            DicomPolicy::Auto,
            DicomPolicy::MinMax,
            DicomPolicy::Window(Window {
                center: -600.0,
                width: 1500.0,
                function: VoiFunction::LinearExact,
            }),
        ] {
            let json = serde_json::to_string(&policy).unwrap();
            assert_eq!(serde_json::from_str::<DicomPolicy>(&json).unwrap(), policy);
        }
        let bad = serde_json::from_str::<DicomPolicy>(r#"{"voi": "window"}"#).unwrap_err();
        assert!(bad.to_string().contains("window_width > 0"), "{bad}");
    }
}
