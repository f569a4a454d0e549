//! Error -> gRPC status, in one place. Messages say what was wrong with the request so a
//! gateway operator can act on them; none carries image content or patient data.

use tonic::{Code, Status};

use crate::decode::DecodeError;
use crate::engine::{Abandoned, ClassifyError};
use crate::model::ModelError;
use crate::registry::ResolveError;

impl From<ClassifyError> for Status {
    fn from(e: ClassifyError) -> Self {
        let code = match &e {
            ClassifyError::NoTasks
            | ClassifyError::TooManyTasks(_)
            | ClassifyError::NoInput
            | ClassifyError::PixelPolicy(_) => Code::InvalidArgument,
            ClassifyError::Resolve(r) => match r {
                ResolveError::UnknownTask(_) | ResolveError::UnknownVersion { .. } => {
                    Code::NotFound
                }
                ResolveError::Malformed(_) => Code::InvalidArgument,
            },
            ClassifyError::Decode(d) => match d {
                DecodeError::Invalid(_) | DecodeError::FrameOutOfRange { .. } => {
                    Code::InvalidArgument
                }
                DecodeError::Unsupported(_) => Code::Unimplemented,
                DecodeError::TooLarge(_) => Code::ResourceExhausted,
            },
            ClassifyError::Reload { .. } => Code::Unavailable,
            ClassifyError::QueueFull { .. } => Code::ResourceExhausted,
            ClassifyError::Abandoned(a) => match a {
                Abandoned::Deadline => Code::DeadlineExceeded,
                Abandoned::Cancelled => Code::Cancelled,
            },
            ClassifyError::Model(m) => match m {
                ModelError::Inference { .. } => Code::Internal,
                _ => Code::FailedPrecondition,
            },
        };
        Status::new(code, e.to_string())
    }
}
