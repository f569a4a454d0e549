//! `inference.GRPCInferenceService`: the Open Inference Protocol (KServe v2), so that
//! KServe, Triton's clients and other tools built for the protocol call fptserve as is.
//!
//! A model is a task, a model version one of its adapter versions. ModelInfer takes one
//! BYTES tensor "image" of N files (DICOM Part 10, PNG, JPEG or TIFF) and answers
//! "probabilities" (FP32 [N, C]) and "label" (BYTES [N]); the N images run as N
//! classifications at once, so they share backbone batches like N separate calls. The
//! model repository extension lives in [`super::model_repository`].

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::calls::{self, Serving};
use super::model_repository;
use crate::engine::{self, Outcome, Payload};
use crate::proto::inference as pb;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceService;

/// The input tensor's name.
pub const INPUT: &str = "image";
/// The probabilities output's name.
pub const PROBABILITIES: &str = "probabilities";
/// The label output's name.
pub const LABEL: &str = "label";

/// The Open Inference Protocol service.
pub struct InferenceService {
    serving: Arc<Serving>,
}

impl InferenceService {
    /// Serves through `serving`'s engine and admission.
    pub fn new(serving: Arc<Serving>) -> Self {
        InferenceService { serving }
    }
}

/// Splits a raw BYTES tensor: each element a 4-byte little-endian length, then its bytes.
fn split_raw_bytes(mut raw: &[u8]) -> Result<Vec<Vec<u8>>, Status> {
    let mut elements = Vec::new();
    while !raw.is_empty() {
        let (len, rest) = raw
            .split_first_chunk::<4>()
            .ok_or_else(|| Status::invalid_argument("raw BYTES tensor: truncated length prefix"))?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(Status::invalid_argument(format!(
                "raw BYTES tensor: element {} says {len} bytes, {} left",
                elements.len(),
                rest.len()
            )));
        }
        elements.push(rest[..len].to_vec());
        raw = &rest[len..];
    }
    Ok(elements)
}

/// Joins BYTES elements into the raw layout.
fn join_raw_bytes<'a>(elements: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut raw = Vec::new();
    for e in elements {
        raw.extend_from_slice(&(e.len() as u32).to_le_bytes());
        raw.extend_from_slice(e);
    }
    raw
}

/// The request's images, checked against the model's single input.
fn images(request: &mut pb::ModelInferRequest) -> Result<Vec<Vec<u8>>, Status> {
    let [input] = request.inputs.as_mut_slice() else {
        return Err(Status::invalid_argument(format!(
            "{} inputs given; the model takes one: \"{INPUT}\" (BYTES [N])",
            request.inputs.len()
        )));
    };
    if input.name != INPUT {
        return Err(Status::invalid_argument(format!(
            "input {:?}: the model's input is \"{INPUT}\" (BYTES [N])",
            input.name
        )));
    }
    if input.datatype != "BYTES" {
        return Err(Status::invalid_argument(format!(
            "input \"{INPUT}\" has datatype {:?}; it must be BYTES (DICOM or image files)",
            input.datatype
        )));
    }
    let n = match input.shape.as_slice() {
        [n] | [n, 1] if *n >= 1 => *n as usize,
        shape => {
            return Err(Status::invalid_argument(format!(
                "input \"{INPUT}\" has shape {shape:?}; it must be [N] (or [N, 1]) with N >= 1"
            )));
        }
    };
    let elements = match request.raw_input_contents.as_slice() {
        [] => std::mem::take(
            &mut input
                .contents
                .get_or_insert_with(Default::default)
                .bytes_contents,
        ),
        [raw] => split_raw_bytes(raw)?,
        more => {
            return Err(Status::invalid_argument(format!(
                "{} raw_input_contents for one input",
                more.len()
            )));
        }
    };
    if elements.len() != n {
        return Err(Status::invalid_argument(format!(
            "input \"{INPUT}\" has shape [{n}] but holds {} elements",
            elements.len()
        )));
    }
    Ok(elements)
}

/// The outputs to return, in order: the requested ones, or both.
fn requested_outputs(request: &pb::ModelInferRequest) -> Result<Vec<&'static str>, Status> {
    if request.outputs.is_empty() {
        return Ok(vec![PROBABILITIES, LABEL]);
    }
    request
        .outputs
        .iter()
        .map(|o| match o.name.as_str() {
            PROBABILITIES => Ok(PROBABILITIES),
            LABEL => Ok(LABEL),
            other => Err(Status::invalid_argument(format!(
                "output {other:?}: the model's outputs are \"{PROBABILITIES}\" and \"{LABEL}\""
            ))),
        })
        .collect()
}

/// The response for N outcomes of one model.
fn response(
    request_id: String,
    model: String,
    outcomes: &[Outcome],
    outputs: &[&str],
) -> pb::ModelInferResponse {
    let n = outcomes.len() as i64;
    let results: Vec<&engine::TaskOutcome> = outcomes.iter().map(|o| &o.results[0]).collect();
    let classes = results[0].scores.len() as i64;
    let mut response = pb::ModelInferResponse {
        model_name: model,
        model_version: results[0].adapter_version.clone(),
        id: request_id,
        ..Default::default()
    };
    for &name in outputs {
        let (datatype, shape, raw) = if name == PROBABILITIES {
            let raw: Vec<u8> = results
                .iter()
                .flat_map(|r| r.scores.iter().flat_map(|s| s.probability.to_le_bytes()))
                .collect();
            ("FP32", vec![n, classes], raw)
        } else {
            let raw = join_raw_bytes(results.iter().map(|r| r.label.as_bytes()));
            ("BYTES", vec![n], raw)
        };
        response
            .outputs
            .push(pb::model_infer_response::InferOutputTensor {
                name: name.to_string(),
                datatype: datatype.to_string(),
                shape,
                ..Default::default()
            });
        response.raw_output_contents.push(raw);
    }
    response
}

fn tensor(
    name: &str,
    datatype: &str,
    shape: Vec<i64>,
) -> pb::model_metadata_response::TensorMetadata {
    pb::model_metadata_response::TensorMetadata {
        name: name.to_string(),
        datatype: datatype.to_string(),
        shape,
    }
}

/// A model name must be a task name: a version goes in the version field.
pub(super) fn task_reference(name: &str, version: &str) -> Result<String, Status> {
    if name.is_empty() || name.contains('@') {
        return Err(Status::invalid_argument(format!(
            "model name {name:?}: give a task name, and its adapter version in the version field"
        )));
    }
    Ok(if version.is_empty() {
        name.to_string()
    } else {
        format!("{name}@{version}")
    })
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _request: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.serving.ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let reference = task_reference(&r.name, &r.version)?;
        let ready = self.serving.ready()
            && self
                .serving
                .engine()?
                .registry()
                .snapshot()
                .resolve(&reference)
                .is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        let extensions = if self.serving.admin_token.is_some() {
            vec![model_repository::EXTENSION.to_string()]
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "fptserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions,
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let reference = task_reference(&r.name, &r.version)?;
        let snapshot = self.serving.engine()?.registry().snapshot();
        let adapter = snapshot.resolve(&reference).map_err(Status::from)?;
        let task = &snapshot.tasks()[adapter.task()];
        Ok(Response::new(pb::ModelMetadataResponse {
            name: r.name,
            versions: task
                .versions()
                .iter()
                .map(|a| a.version().to_string())
                .collect(),
            platform: "fptserve".into(),
            inputs: vec![tensor(INPUT, "BYTES", vec![-1])],
            outputs: vec![
                tensor(
                    PROBABILITIES,
                    "FP32",
                    vec![-1, adapter.classes().len() as i64],
                ),
                tensor(LABEL, "BYTES", vec![-1]),
            ],
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let deadline = calls::deadline(&request);
        let mut request = request.into_inner();
        let request_id = calls::request_id(&request.id);
        let span = tracing::info_span!("infer", request_id = %request_id);
        let model = request.model_name.clone();
        let result = async {
            let reference = task_reference(&request.model_name, &request.model_version)?;
            let outputs = requested_outputs(&request)?;
            let images = images(&mut request)?;
            let engine = self.serving.engine()?.clone();
            let slots = self.serving.admit(images.len())?;
            // N classifications at once; dropping this future (the caller went away)
            // aborts them, which cancels their queued work
            let mut running = tokio::task::JoinSet::new();
            for (index, (bytes, slot)) in images.into_iter().zip(slots).enumerate() {
                let engine = engine.clone();
                let request = engine::Request {
                    payload: Payload::sniff(bytes),
                    tasks: vec![reference.clone()],
                    frame: 0,
                    pixel_policy: None,
                    explain: None,
                };
                running.spawn(
                    async move {
                        let outcome = calls::classify(&engine, request, deadline, slot).await;
                        (index, outcome)
                    }
                    .in_current_span(),
                );
            }
            let mut outcomes: Vec<Option<Outcome>> = (0..running.len()).map(|_| None).collect();
            while let Some(joined) = running.join_next().await {
                let (index, outcome) =
                    joined.map_err(|e| Status::internal(format!("classification task: {e}")))?;
                let outcome = outcome.map_err(|e| {
                    let status = Status::from(e);
                    Status::new(
                        status.code(),
                        format!("image {index}: {}", status.message()),
                    )
                })?;
                outcomes[index] = Some(outcome);
            }
            let outcomes: Vec<Outcome> = outcomes.into_iter().flatten().collect();
            tracing::info!(
                images = outcomes.len(),
                backbone_runs = outcomes.iter().map(|o| o.backbone_runs).sum::<u32>(),
                "inferred"
            );
            Ok::<_, Status>(response(request_id, model.clone(), &outcomes, &outputs))
        }
        .instrument(span.clone())
        .await;
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        calls::count(
            &self.serving,
            "ModelInfer",
            std::slice::from_ref(&model),
            code,
        );
        if let Err(status) = &result {
            span.in_scope(
                || tracing::warn!(code = ?status.code(), error = status.message(), "infer failed"),
            );
        }
        result.map(Response::new)
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        model_repository::index(&self.serving, request).await
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        model_repository::load(&self.serving, request).await
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        model_repository::unload(&self.serving, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_round_trip_and_truncation_is_refused() {
        let elements: [&[u8]; 3] = [b"DICM", b"", b"\x89PNG"];
        let raw = join_raw_bytes(elements.iter().copied());
        assert_eq!(raw.len(), 3 * 4 + 8);
        let back = split_raw_bytes(&raw).unwrap();
        assert_eq!(
            back,
            elements.iter().map(|e| e.to_vec()).collect::<Vec<_>>()
        );
        for cut in [1, 3, 5, raw.len() - 1] {
            assert!(split_raw_bytes(&raw[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn dicom_is_told_from_images_by_its_magic() {
        let mut part10 = vec![0u8; 132];
        part10[128..].copy_from_slice(b"DICM");
        assert!(matches!(Payload::sniff(part10), Payload::Dicom(_)));
        assert!(matches!(
            Payload::sniff(b"DICM\x02\x00".to_vec()),
            Payload::Dicom(_)
        ));
        assert!(matches!(
            Payload::sniff(b"\x89PNG\r\n\x1a\n".to_vec()),
            Payload::Image(_)
        ));
        assert!(matches!(Payload::sniff(Vec::new()), Payload::Image(_)));
    }
}
