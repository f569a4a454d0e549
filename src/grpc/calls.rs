//! What both inference APIs (`fptserve.v1.Classifier` and the Open Inference Protocol)
//! do around the engine: readiness, health, admission, request ids, deadlines and
//! cancellation. One place, so the two APIs cannot drift apart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::engine::call::parse_grpc_timeout;
use crate::engine::{self, CancelOnDrop, ClassifyError, Engine, Outcome};

/// Services reported by grpc.health.v1 on the inference listener ("" is the server).
pub const HEALTH_SERVICES: [&str; 3] = [
    "",
    "fptserve.v1.Classifier",
    "inference.GRPCInferenceService",
];

/// The inference listener's shared state: not ready until [`Serving::set_ready`], then
/// serving until [`Serving::start_draining`].
pub struct Serving {
    /// The engine over the models, once they are loaded and warm.
    engine: OnceLock<Arc<Engine>>,
    draining: AtomicBool,
    health: HealthReporter,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    /// The admin bearer token: the repository extension of the Open Inference Protocol
    /// is served only when one is set, and only to calls that carry it.
    pub admin_token: Option<Arc<str>>,
}

impl Serving {
    /// Not ready yet: every health service NOT_SERVING, inference calls UNAVAILABLE.
    /// Returns the health service to serve beside it.
    pub async fn new(
        max_in_flight: usize,
        admin_token: Option<Arc<str>>,
    ) -> (Arc<Self>, HealthServer<HealthService>) {
        let health = HealthReporter::new();
        let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
        for service in HEALTH_SERVICES {
            health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        let serving = Serving {
            engine: OnceLock::new(),
            draining: AtomicBool::new(false),
            health,
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            max_in_flight: max_in_flight.max(1),
            admin_token,
        };
        (Arc::new(serving), health_service)
    }

    /// The models are loaded and warm: health turns SERVING and calls are taken.
    pub async fn set_ready(&self, engine: Arc<Engine>) {
        if self.engine.set(engine).is_err() {
            return;
        }
        crate::metrics::ready(true);
        for service in HEALTH_SERVICES {
            self.health
                .set_service_status(service, ServingStatus::Serving)
                .await;
        }
    }

    /// Shutdown started: health turns NOT_SERVING (calls already admitted finish).
    pub async fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        crate::metrics::ready(false);
        for service in HEALTH_SERVICES {
            self.health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    }

    /// Whether inference calls are taken: loaded and not draining.
    pub fn ready(&self) -> bool {
        self.engine.get().is_some() && !self.draining.load(Ordering::Relaxed)
    }

    /// The engine, or UNAVAILABLE while the models are still loading.
    pub fn engine(&self) -> Result<&Arc<Engine>, Status> {
        self.engine.get().ok_or_else(|| {
            Status::unavailable("models are still loading; retry when health reports SERVING")
        })
    }

    /// Admission for `images` classifications at once, or RESOURCE_EXHAUSTED at once.
    pub fn admit(&self, images: usize) -> Result<Vec<OwnedSemaphorePermit>, Status> {
        if images > self.max_in_flight {
            return Err(Status::resource_exhausted(format!(
                "{images} images in one call; this server takes at most {} at once \
                 (max_in_flight): split the call",
                self.max_in_flight
            )));
        }
        let mut all = self
            .in_flight
            .clone()
            .try_acquire_many_owned(images as u32)
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "server busy: {} classifications in flight; retry with backoff",
                    self.max_in_flight
                ))
            })?;
        let mut permits: Vec<OwnedSemaphorePermit> = (1..images)
            .map(|_| all.split(1).expect("one permit per image was acquired"))
            .collect();
        permits.push(all);
        Ok(permits)
    }
}

/// Answered this long before the client's deadline: tonic enforces the same deadline
/// itself (answering CANCELLED when it expires), so ours must come first to be
/// DEADLINE_EXCEEDED, and an answer in the last milliseconds would arrive too late anyway.
/// It must cover the time from our timer firing to the answer being written, scheduling
/// delays of a loaded machine included: with 5 ms, tonic's timer won in a test run beside
/// other tests on 2 cores.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// When a call's headers arrived: put on every request by the inference listener
/// ([`crate::server`]) before its body is read, which is when tonic starts its own
/// timer on the `grpc-timeout` header. Counting from the handler's start instead let a
/// large body, slow to arrive, use up the margin: tonic's timer then fired first and the
/// client got CANCELLED (seen in the soak: 1 in 546,241 calls; a PACS gateway does not
/// retry CANCELLED).
#[derive(Clone, Copy, Debug)]
pub struct Arrived(pub Instant);

/// When the call must be answered, from its `grpc-timeout` header, counted from its
/// arrival ([`Arrived`]; now when a request did not come through the listener).
pub fn deadline<T>(request: &Request<T>) -> Option<Instant> {
    let timeout = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(timeout)?;
    let arrived = request
        .extensions()
        .get::<Arrived>()
        .map_or_else(Instant::now, |a| a.0);
    Some(arrived + timeout.saturating_sub(DEADLINE_MARGIN))
}

/// The caller's correlation id, made safe for logs (printable ASCII, at most 128
/// characters), or a new one when none was given.
pub fn request_id(given: &str) -> String {
    let cleaned: String = given
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(128)
        .collect();
    if !cleaned.is_empty() {
        return cleaned;
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{:x}-{:x}", nanos, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Counts a finished call: once by method and code, and once per task it named (by
/// task name when the task is known, "unknown" otherwise, so that callers cannot grow
/// the label set).
pub fn count(serving: &Serving, method: &'static str, tasks: &[String], code: tonic::Code) {
    crate::metrics::request(method, code);
    let snapshot = serving.engine().ok().map(|e| e.registry().snapshot());
    for task in tasks {
        let name = task.split_once('@').map_or(task.as_str(), |(name, _)| name);
        let known = snapshot
            .as_ref()
            .is_some_and(|s| s.tasks().contains_key(name));
        crate::metrics::task_request(if known { name } else { "unknown" }, code);
    }
}

/// Runs one classification holding admission `slot`: DEADLINE_EXCEEDED at `deadline`,
/// and cancelled (its queued work dropped) if the caller goes away first.
pub async fn classify(
    engine: &Arc<Engine>,
    request: engine::Request,
    deadline: Option<Instant>,
    slot: OwnedSemaphorePermit,
) -> Result<Outcome, ClassifyError> {
    // The call holds its admission slot until its last queued work is gone; if the
    // client goes away, tonic drops this future and the guard cancels it.
    let call = engine.call(deadline, Some(slot));
    let guard = CancelOnDrop::new(&call);
    let work = engine.classify(request, call.clone());
    let outcome = match deadline {
        Some(deadline) => tokio::select! {
            outcome = work => outcome,
            _ = tokio::time::sleep_until(deadline.into()) => {
                Err(ClassifyError::Abandoned(engine::Abandoned::Deadline))
            }
        },
        None => work.await,
    };
    drop(call);
    let outcome = outcome?;
    guard.finish();
    Ok(outcome)
}
