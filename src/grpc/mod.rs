//! The gRPC surface: the `fptserve.v1.Classifier` service and the Open Inference Protocol
//! (`inference.GRPCInferenceService`) on the inference listener, sharing what
//! [`calls`] does around the engine, with the protocol's [`model_repository`] extension;
//! the `fptserve.v1.Admin` service on its own listener; and [`status`], the one place
//! where errors become gRPC statuses.

pub mod admin;
pub mod calls;
pub mod classifier;
pub mod codec;
pub mod inference;
pub mod model_repository;
pub mod status;
