//! The Open Inference Protocol service and readiness, through the real server on port 0
//! with tonic clients: nothing is served before the models are ready, and ModelInfer's
//! numbers are Classify's (which tests/classify.rs holds to PyTorch's).

mod common;

use std::sync::Arc;

use common::{TestServer, demo_repository, fixture, request};
use fptserve::decode::Limits;
use fptserve::engine::{Engine, EngineSettings};
use fptserve::grpc::calls::Serving;
use fptserve::proto::inference as kserve;
use fptserve::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use fptserve::proto::v1::classify_request::Input;
use fptserve::server::{self, GrpcSettings};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects")
}

/// Each service's health status.
async fn health(channel: &Channel) -> Vec<i32> {
    let mut client = HealthClient::new(channel.clone());
    let mut statuses = Vec::new();
    for service in fptserve::grpc::calls::HEALTH_SERVICES {
        let reply = client
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .expect("health answers");
        statuses.push(reply.into_inner().status);
    }
    statuses
}

fn infer_request(model: &str, files: &[Vec<u8>]) -> kserve::ModelInferRequest {
    let mut raw = Vec::new();
    for f in files {
        raw.extend_from_slice(&(f.len() as u32).to_le_bytes());
        raw.extend_from_slice(f);
    }
    kserve::ModelInferRequest {
        model_name: model.into(),
        id: "infer-test".into(),
        inputs: vec![kserve::model_infer_request::InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![files.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

#[tokio::test]
async fn nothing_is_served_until_the_models_are_ready_and_then_everything_is() {
    let (serving, health_service) = Serving::new(4, None).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(
        serving.clone(),
        health_service,
        GrpcSettings::default(),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let channel = channel(addr).await;
    let mut kserve = GrpcInferenceServiceClient::new(channel.clone());
    let mut classifier =
        fptserve::proto::v1::classifier_client::ClassifierClient::new(channel.clone());
    let png = fixture("images/rgb8.png");

    // loading: live, not ready, NOT_SERVING everywhere, calls UNAVAILABLE
    let not_serving = ServingStatus::NotServing as i32;
    assert_eq!(health(&channel).await, vec![not_serving; 3]);
    let live = kserve
        .server_live(kserve::ServerLiveRequest {})
        .await
        .unwrap();
    assert!(live.into_inner().live);
    let ready = kserve
        .server_ready(kserve::ServerReadyRequest {})
        .await
        .unwrap();
    assert!(!ready.into_inner().ready);
    let refused = classifier
        .classify(request(Input::Image(png.clone()), &["dr-grade"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let refused = kserve
        .model_infer(infer_request("dr-grade", std::slice::from_ref(&png)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    // loaded and warm
    let started = common::load(&demo_repository());
    let engine = Arc::new(Engine::new(
        started.lifecycle,
        Limits::default(),
        EngineSettings::default(),
    ));
    serving.set_ready(engine).await;
    assert_eq!(
        health(&channel).await,
        vec![ServingStatus::Serving as i32; 3]
    );
    let ready = kserve
        .server_ready(kserve::ServerReadyRequest {})
        .await
        .unwrap();
    assert!(ready.into_inner().ready);
    classifier
        .classify(request(Input::Image(png), &["dr-grade"]))
        .await
        .expect("served once ready");

    // draining: NOT_SERVING again
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(!serving.ready());
}

#[tokio::test]
async fn model_infer_on_a_dicom_and_a_png_answers_what_classify_answers() {
    let server = TestServer::start().await;
    let mut kserve = GrpcInferenceServiceClient::new(channel(server.addr).await)
        .max_decoding_message_size(64 << 20);
    let mut classifier = server.client().await;
    let dicom = fixture("dicom/grey8_explicit_le.dcm");
    let png = fixture("images/rgb8.png");

    let reply = kserve
        .model_infer(infer_request("dr-grade", &[dicom.clone(), png.clone()]))
        .await
        .expect("ModelInfer answers")
        .into_inner();
    assert_eq!(reply.id, "infer-test");
    assert_eq!(reply.model_name, "dr-grade");
    let names: Vec<&str> = reply.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["probabilities", "label"]);
    assert_eq!(reply.outputs[0].datatype, "FP32");
    assert_eq!(reply.outputs[0].shape, [2, 5]);
    assert_eq!(reply.outputs[1].shape, [2]);
    let probabilities: Vec<f32> = reply.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let mut labels = Vec::new();
    let mut raw = reply.raw_output_contents[1].as_slice();
    while let Some((len, rest)) = raw.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len) as usize;
        labels.push(String::from_utf8(rest[..len].to_vec()).unwrap());
        raw = &rest[len..];
    }

    for (i, input) in [Input::Dicom(dicom), Input::Image(png)]
        .into_iter()
        .enumerate()
    {
        let classified = classifier
            .classify(request(input, &["dr-grade"]))
            .await
            .expect("Classify answers")
            .into_inner();
        let result = &classified.results[0];
        assert_eq!(reply.model_version, result.adapter_version);
        let expected: Vec<f32> = result.scores.iter().map(|s| s.probability).collect();
        assert_eq!(
            &probabilities[i * 5..(i + 1) * 5],
            expected.as_slice(),
            "image {i}"
        );
        assert_eq!(labels[i], result.label, "image {i}");
    }
}
