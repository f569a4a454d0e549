//! `fptserve decode FILE`: decode one frame the way the daemon does and write its samples
//! as a NumPy `.npy` file, so independent tools (pydicom in tests/python) can check them.

use serde_json::json;

use crate::config::DecodeArgs;
use crate::decode::dicom::{ColourFrame, Samples};
use crate::decode::{DecodeError, DicomPolicy, Limits, Pixels};
use crate::grpc::status::{code_name, decode_code};

/// Encodes a C-order NumPy array (format 1.0).
pub fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn run_inner(args: &DecodeArgs) -> Result<serde_json::Value, DecodeError> {
    let bytes = std::fs::read(&args.file)
        .map_err(|e| DecodeError::Invalid(format!("cannot read {}: {e}", args.file.display())))?;
    let limits = Limits::default();
    let decoded = if crate::decode::is_dicom(&bytes) {
        crate::decode::dicom::decode(&bytes, args.frame, &limits, args.min_size)?
    } else {
        crate::decode::image::decode(&bytes, args.frame, &limits)?
    };
    let (rows, columns) = (
        decoded.info.decoded_height as usize,
        decoded.info.decoded_width as usize,
    );
    let mut info = json!({
        "ok": true,
        "rows": rows,
        "columns": columns,
        "full_rows": decoded.info.height,
        "full_columns": decoded.info.width,
        "frames": decoded.info.frames,
        "frame": decoded.info.frame,
        "photometric_interpretation": decoded.info.color,
        "transfer_syntax_uid": decoded.dicom.as_ref().map(|d| d.transfer_syntax_uid.clone()),
    });
    let (descr, shape, data, photometric): (&str, Vec<usize>, Vec<u8>, String) =
        match args.output.as_str() {
            "stored" => {
                let Pixels::Dicom(frame) = &decoded.pixels else {
                    return Err(DecodeError::Invalid(
                        "--output stored applies to DICOM only".into(),
                    ));
                };
                let (values, samples, bits, signed): (&[i32], usize, u16, bool) =
                    match &frame.samples {
                        Samples::Grey(g) => (&g.stored, 1, g.bits_stored, g.signed),
                        Samples::Colour(ColourFrame::Rgb {
                            samples,
                            bits_stored,
                        }) => (samples, 3, *bits_stored, false),
                        Samples::Colour(ColourFrame::Palette { indices, .. }) => {
                            (indices, 1, frame.bits_stored, false)
                        }
                    };
                info["samples_per_pixel"] = json!(samples);
                info["bits_stored"] = json!(bits);
                info["bits_allocated"] = json!(frame.bits_allocated);
                info["signed"] = json!(signed);
                let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (
                    "<i4",
                    vec![rows, columns, samples],
                    data,
                    frame.photometric.clone(),
                )
            }
            "display" => {
                let policy = DicomPolicy::parse(
                    &args.voi,
                    args.window_center,
                    args.window_width,
                    args.voi_function.as_deref(),
                )?;
                let rgb = decoded.render(&policy);
                (
                    "|u1",
                    vec![rows, columns, 3],
                    rgb.rgb_bytes().into_owned(),
                    "RGB".into(),
                )
            }
            other => {
                return Err(DecodeError::Invalid(format!(
                    "--output {other:?}: use stored or display"
                )));
            }
        };
    info["output_photometric"] = json!(photometric);
    if let Some(path) = &args.npy {
        std::fs::write(path, npy(descr, &shape, &data))
            .map_err(|e| DecodeError::Invalid(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(info)
}

/// Runs the command: prints one JSON object; exit status 1 when decoding failed.
pub fn run(args: DecodeArgs) -> anyhow::Result<std::process::ExitCode> {
    match run_inner(&args) {
        Ok(info) => {
            println!("{info}");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Err(e) => {
            println!(
                "{}",
                json!({"ok": false, "code": code_name(decode_code(&e)), "message": e.to_string()})
            );
            Ok(std::process::ExitCode::from(1))
        }
    }
}
