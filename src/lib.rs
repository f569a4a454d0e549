//! fptserve: a gRPC inference daemon for FPT+ medical image classifiers.
//!
//! The request path, one module per stage:
//! [`decode`] (DICOM / PNG / JPEG / TIFF -> display pixels) -> [`preprocess`] (PIL-exact
//! resize, normalisation) -> [`model::backbone`] (shared frozen ViT, K/V of the selected
//! tokens) -> [`model::adapter`] (per-task side network) -> [`engine`] (response).
//! [`registry`] holds the loaded models as an immutable snapshot, [`lifecycle`] is the one
//! way adapters come into it (load, verify, warm, publish), [`repository`] reads a model
//! repository from disk, [`watch`] keeps the loaded adapters in line with it, [`grpc`] is
//! the network surface (classification and admin), [`server`] runs its listeners and
//! [`daemon`] wires everything up for `fptserve serve` and the tests.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod decode;
pub mod dicom_instance;
pub mod engine;
pub mod explain;
pub mod grpc;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod registry;
pub mod repository;
pub mod runtime;
pub mod secondary_capture;
pub mod server;
pub mod signing;
pub mod structured_report;
pub mod telemetry;
pub mod tls;
pub mod watch;

/// Generated protocol types and gRPC stubs (compiled from proto/ by build.rs).
pub mod proto {
    /// `fptserve.v1`: the classification API.
    pub mod v1 {
        tonic::include_proto!("fptserve.v1");
    }
    /// `inference`: the Open Inference Protocol (KServe v2), see proto/inference/.
    pub mod inference {
        tonic::include_proto!("inference");
    }
    /// Encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("fptserve_descriptor");
}
