//! The gRPC surface: the `fptserve.v1.Classifier` service, the `fptserve.v1.Admin` service
//! (its own listener), and the one place where errors become gRPC statuses.

pub mod admin;
pub mod classifier;
pub mod status;
