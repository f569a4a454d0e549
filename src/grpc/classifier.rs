//! `fptserve.v1.Classifier`: admission, request ids, and moving the blocking request
//! path off the async executor.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::calls::{self, Serving};
use crate::decode::DicomPolicy;
use crate::dicom_instance;
use crate::engine::{self, ClassifyError, Outcome, Payload};
use crate::explain::{self, Explanation};
use crate::metrics;
use crate::proto::v1 as pb;
use crate::proto::v1::classifier_server::Classifier;
use crate::secondary_capture;
use crate::structured_report;

/// The Classifier service.
pub struct ClassifierService {
    serving: Arc<Serving>,
}

impl ClassifierService {
    /// Serves through `serving`'s engine and admission.
    pub fn new(serving: Arc<Serving>) -> Self {
        ClassifierService { serving }
    }
}

fn to_proto(outcome: Outcome, request_id: String) -> pb::ClassifyResponse {
    pb::ClassifyResponse {
        results: outcome
            .results
            .into_iter()
            .map(|r| pb::TaskResult {
                task: r.task,
                adapter_version: r.adapter_version,
                scores: r
                    .scores
                    .into_iter()
                    .map(|s| pb::ClassScore {
                        name: s.name,
                        probability: s.probability,
                        logit: s.logit,
                    })
                    .collect(),
                label: r.label,
                backbone: r.backbone,
                backbone_run: r.backbone_run,
                backbone_batch_size: r.backbone_batch_size,
                saliency: r.explanation.map(saliency),
            })
            .collect(),
        dicom: outcome.dicom.map(|d| pb::DicomIdentifiers {
            study_instance_uid: d.study_instance_uid,
            series_instance_uid: d.series_instance_uid,
            sop_instance_uid: d.sop_instance_uid,
            sop_class_uid: d.sop_class_uid,
            transfer_syntax_uid: d.transfer_syntax_uid,
        }),
        timings: Some(pb::StageTimings {
            decode_ms: outcome.timings.decode_ms,
            preprocess_ms: outcome.timings.preprocess_ms,
            queue_ms: outcome.timings.queue_ms,
            backbone_ms: outcome.timings.backbone_ms,
            adapters_ms: outcome.timings.adapters_ms,
            explain_ms: outcome.timings.explain_ms,
            total_ms: outcome.timings.total_ms,
        }),
        backbone_features_reused: outcome.backbone_features_reused,
        backbone_runs: outcome.backbone_runs,
        backbone_cache_hits: outcome.backbone_cache_hits,
        request_id,
        structured_report: Vec::new(),
        input: Some(pb::InputInfo {
            width: outcome.input.width,
            height: outcome.input.height,
            decoded_width: outcome.input.decoded_width,
            decoded_height: outcome.input.decoded_height,
            frames: outcome.input.frames,
            frame: outcome.input.frame,
            format: outcome.input.format,
            color: outcome.input.color,
        }),
    }
}

fn saliency(explanation: Explanation) -> pb::Saliency {
    match explanation {
        Explanation::Map(map) => pb::Saliency {
            rows: map.rows as u32,
            columns: map.columns as u32,
            values: map.values,
            class_name: map.class_name,
            class_index: map.class_index as u32,
            ..Default::default()
        },
        Explanation::Unavailable(reason) => pb::Saliency {
            unavailable: reason,
            ..Default::default()
        },
    }
}

/// The engine's explanation request from the call's.
fn explain_request(explain: pb::Explain) -> engine::Explain {
    engine::Explain {
        tasks: explain.tasks,
        class_name: Some(explain.class_name).filter(|c| !c.is_empty()),
        overlay: explain.overlay || explain.secondary_capture,
    }
}

/// What a call asked to be made of its results besides the answer itself.
struct Extras {
    /// The classified DICOM instance's header, when a report or capture is asked for.
    source: Option<dicom_object::InMemDicomObject>,
    structured_report: bool,
    captures: bool,
    pngs: bool,
    /// The caller's request id (with frame and tasks), for repeatable DICOM UIDs.
    identity: Option<String>,
}

/// The files made of a call's results.
#[derive(Default)]
struct Outputs {
    /// The Structured Report (empty unless asked for).
    report: Vec<u8>,
    /// Per result, its saliency Secondary Capture.
    captures: Vec<Option<Vec<u8>>>,
    /// Per result, its overlay as a PNG.
    pngs: Vec<Option<Vec<u8>>>,
}

impl Extras {
    /// Blocking: draws overlays, encodes them and writes DICOM.
    fn build(self, outcome: &Outcome) -> Result<Outputs, Status> {
        let mut out = Outputs::default();
        let now = dicom_instance::now();
        let identity = self.identity.as_deref();
        let mut referenced = Vec::new();
        for (i, result) in outcome.results.iter().enumerate() {
            // each task's overlay drawn once, for its PNG and its capture
            let overlay = match (&result.picture, &result.explanation) {
                (Some(picture), Some(Explanation::Map(map))) => {
                    Some((explain::overlay(picture, map), map))
                }
                _ => None,
            };
            let png = match (&overlay, self.pngs) {
                (Some((overlay, _)), true) => {
                    Some(explain::png(overlay).map_err(Status::internal)?)
                }
                _ => None,
            };
            out.pngs.push(png);
            let capture = match (&self.source, &overlay, self.captures) {
                (Some(source), Some((overlay, map)), true) => Some(secondary_capture::build(
                    source, result, map, overlay, i, &now, identity,
                )?),
                _ => None,
            };
            let (bytes, capture) = capture.unzip();
            out.captures.push(bytes);
            referenced.push(capture);
        }
        let Some(source) = &self.source else {
            return Ok(out);
        };
        if self.structured_report {
            out.report =
                structured_report::build(source, &outcome.results, &referenced, now, identity)?;
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl Classifier for ClassifierService {
    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let deadline = calls::deadline(&request);
        let request = request.into_inner();
        let request_id = calls::request_id(&request.request_id);
        let tasks = request.tasks.clone();
        let span = tracing::info_span!("classify", request_id = %request_id);
        let result = async {
            let engine = self.serving.engine()?;
            let slot = self.serving.admit(1)?.pop().expect("one permit");
            // the report needs the source's header: parsed first, so a file that cannot
            // have one fails before any model runs
            let explain = request.explain.clone().unwrap_or_default();
            let source = match (
                &request.input,
                request.structured_report || explain.secondary_capture,
            ) {
                (Some(pb::classify_request::Input::Dicom(b)), true) => {
                    Some(crate::decode::dicom::parse_header(b).map_err(ClassifyError::from)?)
                }
                (_, true) => {
                    return Err(Status::invalid_argument(
                        "structured_report and explain.secondary_capture need a DICOM input \
                         (they join its patient and study)",
                    ));
                }
                (_, false) => None,
            };
            let payload = match request.input {
                Some(pb::classify_request::Input::Dicom(b)) => Payload::Dicom(b),
                Some(pb::classify_request::Input::Image(b)) => Payload::Image(b),
                None => return Err(ClassifyError::NoInput.into()),
            };
            let pixel_policy = match request.pixel_policy {
                Some(p) => Some(
                    DicomPolicy::parse(
                        &p.voi,
                        p.window_center,
                        p.window_width,
                        Some(p.voi_function.as_str()).filter(|f| !f.is_empty()),
                    )
                    .map_err(|e| ClassifyError::PixelPolicy(format!("pixel_policy: {e}")))?,
                ),
                None => None,
            };
            // a caller's request id makes the report's identity repeatable (see build)
            let identity = (!request.request_id.is_empty()).then(|| {
                format!(
                    "{}\0{}\0{}",
                    request.request_id,
                    request.frame,
                    request.tasks.join("\0")
                )
            });
            let engine_request = engine::Request {
                payload,
                tasks: request.tasks,
                frame: request.frame,
                pixel_policy,
                explain: request.explain.map(explain_request),
            };
            let outcome = calls::classify(engine, engine_request, deadline, slot).await?;
            // DICOM instances and PNGs: seconds for large frames, off the executor
            let extras = Extras {
                source,
                structured_report: request.structured_report,
                captures: explain.secondary_capture,
                pngs: explain.overlay,
                identity,
            };
            let (outcome, instances) = tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let instances = extras.build(&outcome)?;
                let mut outcome = outcome;
                outcome.timings.total_ms += started.elapsed().as_secs_f64() * 1e3;
                Ok::<_, Status>((outcome, instances))
            })
            .await
            .map_err(|e| Status::internal(format!("building the call's outputs failed: {e}")))??;
            tracing::info!(
                tasks = outcome.results.len(),
                backbone_runs = outcome.backbone_runs,
                total_ms = outcome.timings.total_ms,
                "classified"
            );
            Ok::<_, Status>((outcome, instances))
        }
        .instrument(span.clone())
        .await;
        match result {
            Ok((outcome, instances)) => {
                calls::count(&self.serving, "Classify", &tasks, tonic::Code::Ok);
                let mut response = to_proto(outcome, request_id);
                response.structured_report = instances.report;
                let pngs = instances.pngs.into_iter().chain(std::iter::repeat(None));
                let captures = instances
                    .captures
                    .into_iter()
                    .chain(std::iter::repeat(None));
                for ((result, png), capture) in response.results.iter_mut().zip(pngs).zip(captures)
                {
                    if let Some(saliency) = &mut result.saliency {
                        saliency.overlay_png = png.unwrap_or_default();
                        saliency.secondary_capture = capture.unwrap_or_default();
                    }
                }
                Ok(Response::new(response))
            }
            Err(status) => {
                span.in_scope(|| tracing::warn!(code = ?status.code(), error = status.message(), "classify failed"));
                calls::count(&self.serving, "Classify", &tasks, status.code());
                Err(status)
            }
        }
    }

    async fn list_tasks(
        &self,
        _request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let snapshot = self.serving.engine()?.registry().snapshot();
        let tasks = snapshot
            .tasks()
            .iter()
            .map(|(name, task)| pb::TaskInfo {
                name: name.clone(),
                default_version: task.default_version().version().to_string(),
                versions: task
                    .versions()
                    .iter()
                    .map(|a| {
                        let m = a.manifest();
                        let p = &m.preprocessing;
                        pb::AdapterInfo {
                            version: m.version.clone(),
                            classes: m.classes.clone(),
                            backbone: a.backbone().identity().name,
                            sha256: m.sha256.clone(),
                            preprocessing: Some(pb::Preprocessing {
                                backbone_size: p.backbone_size.to_vec(),
                                side_size: p.side_size.to_vec(),
                                mean: p.mean.to_vec(),
                                std: p.std.to_vec(),
                                resize: p.resize.clone(),
                            }),
                        }
                    })
                    .collect(),
            })
            .collect();
        metrics::request("ListTasks", tonic::Code::Ok);
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }
}
