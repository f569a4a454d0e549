//! The gRPC surface: the `fptserve.v1.Classifier` service and the Open Inference Protocol
//! (`inference.GRPCInferenceService`) on the inference listener, sharing what
//! [`calls`] does around the engine; the `fptserve.v1.Admin` service on its own listener;
//! and the one place where errors become gRPC statuses.

pub mod admin;
pub mod calls;
pub mod classifier;
pub mod inference;
pub mod status;
