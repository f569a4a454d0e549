//! The gRPC servers with their services, started on listeners the caller bound (so tests
//! run the real servers on port 0); [`crate::daemon`] wires them to the models.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthService;

use crate::grpc::admin::{AdminService, BearerToken};
use crate::grpc::calls::Serving;
use crate::grpc::classifier::ClassifierService;
use crate::grpc::inference::InferenceService;
use crate::proto;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::proto::v1::admin_server::AdminServer;
use crate::proto::v1::classifier_server::ClassifierServer;
use crate::tls::Tls;

/// HTTP/2 flow-control window per call: a 2048x2048 16-bit DICOM (8 MiB) arrives in one window.
const STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 flow-control window per connection, shared by its calls.
const CONNECTION_WINDOW: u32 = 32 << 20;

/// Settings of the gRPC surface.
#[derive(Clone, Debug)]
pub struct GrpcSettings {
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// Classifications running at once before RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// How long calls in flight get to finish once shutdown starts.
    pub drain_timeout: std::time::Duration,
    /// TLS on the gRPC listeners (inference and admin), if configured.
    pub tls: Option<Arc<Tls>>,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        GrpcSettings {
            max_message_bytes: 256 << 20,
            max_in_flight: 16,
            drain_timeout: std::time::Duration::from_secs(30),
            tls: None,
        }
    }
}

/// tonic refuses a message over the size limit with OUT_OF_RANGE (before allocating it);
/// the gRPC specification asks for RESOURCE_EXHAUSTED, which is also what clients retry
/// on differently. None of our handlers answers OUT_OF_RANGE, so the rewrite is exact.
fn oversized_is_resource_exhausted<B>(
    mut response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let headers = response.headers_mut();
    if headers.get("grpc-status").is_some_and(|v| v == "11") {
        headers.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("8"),
        );
    }
    response
}

/// Serves a tonic router on a listener, over TLS when set, until shutdown: a boxed
/// future either way. (A macro: a function would have to spell out every bound of
/// tonic's generic router.)
macro_rules! listen {
    ($router:expr, $listener:expr, $tls:expr, $shutdown:expr) => {{
        let server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
            match $tls {
                // Without TCP_NODELAY, Nagle's algorithm holds small responses back for a
                // delayed ACK (tens of ms per call).
                None => Box::pin($router.serve_with_incoming_shutdown(
                    TcpIncoming::from($listener).with_nodelay(Some(true)),
                    $shutdown,
                )),
                Some(tls) => Box::pin(
                    $router.serve_with_incoming_shutdown(tls.incoming($listener), $shutdown),
                ),
            };
        server
    }};
}

/// Server reflection over our protocols, listing `services` (those a listener serves)
/// and the reflection services themselves.
fn reflection(services: &[&str]) -> tonic_reflection::server::Builder<'static> {
    // both reflection versions describe both, whichever a client asks
    let mut builder = tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    for name in services.iter().chain(&[
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]) {
        builder = builder.with_service_name(*name);
    }
    builder
}

/// Serves the inference APIs on `listener` until `shutdown` resolves, then drains:
/// health turns NOT_SERVING, new connections and calls are refused, and calls in flight
/// get up to the drain timeout to finish. Until `serving` is made ready, health says
/// NOT_SERVING and inference calls answer UNAVAILABLE.
pub async fn serve(
    serving: Arc<Serving>,
    health: HealthServer<HealthService>,
    settings: GrpcSettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let classifier = ClassifierServer::new(ClassifierService::new(serving.clone()))
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes);
    let inference = GrpcInferenceServiceServer::new(InferenceService::new(serving.clone()))
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes);

    let reflection = || {
        reflection(&[
            "fptserve.v1.Classifier",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
        ])
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("embedded descriptor set is valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("embedded descriptor set is valid");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .layer(tower::util::MapResponseLayer::new(
            oversized_is_resource_exhausted::<tonic::body::Body>,
        ))
        .layer(tower::util::MapRequestLayer::new(
            |mut request: tonic::codegen::http::Request<tonic::body::Body>| {
                request
                    .extensions_mut()
                    .insert(crate::grpc::calls::Arrived(std::time::Instant::now()));
                request
            },
        ))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(classifier)
        .add_service(inference);
    let server = listen!(router, listener, settings.tls.as_ref(), async {
        let _ = stopped.await;
    });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        () = shutdown => {}
    }
    serving.start_draining().await;
    let in_flight = serving.engine().map_or(0, |e| e.stats().in_flight);
    tracing::info!(
        in_flight,
        drain_timeout_s = settings.drain_timeout.as_secs_f64(),
        "draining: health NOT_SERVING, refusing new calls, finishing calls in flight"
    );
    let _ = stop.send(());
    match tokio::time::timeout(settings.drain_timeout, &mut server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                still_in_flight = serving.engine().map_or(0, |e| e.stats().in_flight),
                "drain timeout passed; abandoning the calls still in flight"
            );
            Ok(())
        }
    }
}

/// Serves the admin API (and reflection, for grpcurl) on its own listener until `shutdown`.
pub async fn run_admin(
    service: AdminService,
    token: BearerToken,
    max_message_bytes: usize,
    tls: Option<Arc<Tls>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let admin = AdminServer::new(service)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let reflection = || reflection(&["fptserve.v1.Admin"]);
    let router = tonic::transport::Server::builder()
        .add_service(tonic::service::interceptor::InterceptedService::new(
            admin, token,
        ))
        .add_service(
            reflection()
                .build_v1()
                .expect("embedded descriptor set is valid"),
        )
        .add_service(
            reflection()
                .build_v1alpha()
                .expect("embedded descriptor set is valid"),
        );
    listen!(router, listener, tls.as_ref(), shutdown).await
}
