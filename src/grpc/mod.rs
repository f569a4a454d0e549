//! The gRPC surface: the `fptserve.v1.Classifier` service, and the one place where
//! errors become gRPC statuses.

pub mod classifier;
pub mod status;
