//! Error -> gRPC status, in one place: one `From` per layer's error, so every path that
//! meets an error (Classify, ModelInfer, the admin API, the repository extension, the
//! `fptserve decode` command's JSON) answers it with the same code. Messages say what was
//! wrong so that an operator can act on them; none carries image content or patient data.

use tonic::{Code, Status};

use crate::decode::DecodeError;
use crate::dicom_instance::InstanceError;
use crate::engine::{Abandoned, ClassifyError};
use crate::lifecycle::LoadError;
use crate::model::ModelError;
use crate::registry::{ChangeError, ResolveError};

/// A request body that is not a valid protobuf message of the method's type: the caller's
/// error. (tonic's own codec answers INTERNAL.)
pub fn malformed(e: &prost::DecodeError) -> Status {
    Status::invalid_argument(format!("malformed request message: {e}"))
}

/// The code a decode error maps to.
pub fn decode_code(e: &DecodeError) -> Code {
    match e {
        DecodeError::Invalid(_) | DecodeError::FrameOutOfRange { .. } => Code::InvalidArgument,
        DecodeError::Unsupported(_) => Code::Unimplemented,
        DecodeError::TooLarge(_) => Code::ResourceExhausted,
    }
}

/// The code a model error maps to: each kind of bad model gets its own.
fn model_code(e: &ModelError) -> Code {
    match e {
        ModelError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Code::NotFound
        }
        ModelError::Digest { .. } => Code::DataLoss,
        ModelError::Incompatible { .. } => Code::FailedPrecondition,
        ModelError::Signature(_) => Code::PermissionDenied,
        ModelError::Inference { .. } => Code::Internal,
        ModelError::Manifest(_)
        | ModelError::Io { .. }
        | ModelError::Session { .. }
        | ModelError::Interface { .. }
        | ModelError::Misplaced { .. } => Code::InvalidArgument,
    }
}

fn load_code(e: &LoadError) -> Code {
    match e {
        LoadError::Model(m) => model_code(m),
        LoadError::Change(c) => change_code(c),
    }
}

fn change_code(e: &ChangeError) -> Code {
    match e {
        ChangeError::NotLoaded { .. } => Code::NotFound,
        ChangeError::AlreadyLoaded { .. } => Code::AlreadyExists,
    }
}

fn resolve_code(e: &ResolveError) -> Code {
    match e {
        ResolveError::UnknownTask(_) | ResolveError::UnknownVersion { .. } => Code::NotFound,
        ResolveError::Malformed(_) => Code::InvalidArgument,
    }
}

fn classify_code(e: &ClassifyError) -> Code {
    match e {
        ClassifyError::NoTasks
        | ClassifyError::TooManyTasks(_)
        | ClassifyError::NoInput
        | ClassifyError::PixelPolicy(_)
        | ClassifyError::Explain(_) => Code::InvalidArgument,
        ClassifyError::Resolve(r) => resolve_code(r),
        ClassifyError::Decode(d) => decode_code(d),
        ClassifyError::Reload { source, .. } => load_code(source),
        ClassifyError::QueueFull { .. } => Code::ResourceExhausted,
        ClassifyError::Abandoned(a) => match a {
            Abandoned::Deadline => Code::DeadlineExceeded,
            Abandoned::Cancelled => Code::Cancelled,
        },
        ClassifyError::Model(m) => model_code(m),
    }
}

/// The canonical name of a code, as the gRPC specification spells it ("INVALID_ARGUMENT").
pub fn code_name(code: Code) -> String {
    // tonic's Debug names are the canonical names in CamelCase
    let camel = format!("{code:?}");
    let mut name = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

macro_rules! status_from {
    ($($error:ty => $code:expr),* $(,)?) => {$(
        impl From<$error> for Status {
            fn from(e: $error) -> Self {
                let code: fn(&$error) -> Code = $code;
                Status::new(code(&e), e.to_string())
            }
        }
    )*};
}

status_from! {
    DecodeError => decode_code,
    ModelError => model_code,
    ChangeError => change_code,
    ResolveError => resolve_code,
    ClassifyError => classify_code,
    LoadError => load_code,
    InstanceError => |e| match e {
        InstanceError::MissingSource { .. } => Code::InvalidArgument,
        // a bug, not bad input
        InstanceError::Write { .. } => Code::Internal,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_the_specification_names() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::Unimplemented), "UNIMPLEMENTED");
        assert_eq!(code_name(Code::DataLoss), "DATA_LOSS");
    }
}
