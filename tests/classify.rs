//! The Classify API end to end: real server, real ONNX Runtime, the committed demo models,
//! answers compared with the PyTorch reference numbers the exporter wrote.

mod common;

use common::{TestServer, fixture, input_of, reference, request};
use fptserve::decode::Limits;
use fptserve::proto::v1::classify_request::Input;
use fptserve::proto::v1::{ClassifyRequest, ListTasksRequest};
use fptserve::server::GrpcSettings;
use tonic::Code;

#[tokio::test]
async fn every_reference_case_matches_pytorch() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let reference = reference();
    assert!(reference.cases.len() >= 12, "reference has too few cases");
    let mut worst = 0f64;
    for case in &reference.cases {
        let pinned = format!("{}@{}", case.task, case.version);
        let response = client
            .classify(request(input_of(case), &[&pinned]))
            .await
            .unwrap_or_else(|s| panic!("{} {pinned}: {s}", case.input))
            .into_inner();
        let result = &response.results[0];
        assert_eq!(result.task, case.task);
        assert_eq!(result.adapter_version, case.version);
        let names: Vec<&str> = result.scores.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, case.classes, "{} {pinned}: class order", case.input);
        for (score, (&p, &l)) in result
            .scores
            .iter()
            .zip(case.probabilities.iter().zip(&case.logits))
        {
            let dp = (f64::from(score.probability) - p).abs();
            worst = worst.max(dp);
            assert!(
                dp <= reference.tolerance,
                "{} {pinned} {}: probability {} vs PyTorch {p}",
                case.input,
                score.name,
                score.probability
            );
            assert!(
                (f64::from(score.logit) - l).abs() <= 1e-3,
                "{} {pinned} {}: logit {} vs PyTorch {l}",
                case.input,
                score.name,
                score.logit
            );
        }
        assert_eq!(result.label, case.label, "{} {pinned}", case.input);
        if case.kind == "dicom" {
            let ids = response.dicom.as_ref().expect("DICOM identifiers");
            assert_eq!(
                Some(&ids.study_instance_uid),
                case.study_instance_uid.as_ref()
            );
            assert_eq!(
                Some(&ids.series_instance_uid),
                case.series_instance_uid.as_ref()
            );
            assert_eq!(Some(&ids.sop_instance_uid), case.sop_instance_uid.as_ref());
        } else {
            assert!(response.dicom.is_none());
        }
    }
    eprintln!("largest probability difference vs PyTorch: {worst:.2e}");
}

#[tokio::test]
async fn tasks_with_the_same_preprocessing_share_one_backbone_run() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let response = client
        .classify(request(
            Input::Image(fixture("images/rgb8.png")),
            &["dr-grade", "skin-lesion", "chest-xray", "dr-grade@1"],
        ))
        .await
        .unwrap()
        .into_inner();
    // dr-grade and skin-lesion share mean/std; chest-xray has its own.
    assert_eq!(response.backbone_runs, 2);
    assert_eq!(response.backbone_cache_hits, 0);
    assert!(response.backbone_features_reused);
    let runs: Vec<u32> = response.results.iter().map(|r| r.backbone_run).collect();
    assert_eq!(runs[0], runs[1]);
    assert_eq!(runs[0], runs[3]);
    assert_ne!(runs[0], runs[2]);
    let tasks: Vec<&str> = response.results.iter().map(|r| r.task.as_str()).collect();
    assert_eq!(tasks, ["dr-grade", "skin-lesion", "chest-xray", "dr-grade"]);

    // Same answers as one task per call (whose features now come from the cache).
    for result in &response.results {
        let pinned = format!("{}@{}", result.task, result.adapter_version);
        let single = client
            .classify(request(
                Input::Image(fixture("images/rgb8.png")),
                &[&pinned],
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((single.backbone_runs, single.backbone_cache_hits), (0, 1));
        assert_eq!(single.results[0].backbone_batch_size, 0);
        assert!(!single.backbone_features_reused);
        let a: Vec<f32> = result.scores.iter().map(|s| s.probability).collect();
        let b: Vec<f32> = single.results[0]
            .scores
            .iter()
            .map(|s| s.probability)
            .collect();
        assert_eq!(a, b, "{pinned}");
    }
}

#[tokio::test]
async fn unpinned_task_gets_the_newest_version_and_list_tasks_shows_all() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let response = client
        .classify(request(
            Input::Image(fixture("images/grey8.png")),
            &["dr-grade"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results[0].adapter_version, "2");
    assert!(!response.request_id.is_empty());
    let timings = response.timings.unwrap();
    assert!(timings.total_ms >= timings.backbone_ms + timings.adapters_ms);
    let input = response.input.unwrap();
    assert_eq!((input.format.as_str(), input.frames), ("png", 1));

    let tasks = client
        .list_tasks(ListTasksRequest {})
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["chest-xray", "dr-grade", "skin-lesion"]);
    let dr = &tasks[1];
    assert_eq!(dr.default_version, "2");
    let versions: Vec<&str> = dr.versions.iter().map(|v| v.version.as_str()).collect();
    assert_eq!(versions, ["1", "2"]);
    assert_eq!(dr.versions[0].classes.len(), 5);
    assert_eq!(tasks[2].versions[0].classes.len(), 2);
}

#[tokio::test]
async fn caller_request_id_is_echoed() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut req = request(Input::Image(fixture("images/grey8.png")), &["skin-lesion"]);
    req.request_id = "gateway-42".into();
    let response = client.classify(req).await.unwrap().into_inner();
    assert_eq!(response.request_id, "gateway-42");
}

async fn expect_status(
    client: &mut fptserve::proto::v1::classifier_client::ClassifierClient<
        tonic::transport::Channel,
    >,
    req: ClassifyRequest,
    code: Code,
    needle: &str,
) {
    let status = client.classify(req).await.expect_err("the call must fail");
    assert_eq!(status.code(), code, "message: {}", status.message());
    assert!(
        status.message().contains(needle),
        "{:?} does not mention {needle:?}",
        status.message()
    );
}

#[tokio::test]
async fn bad_requests_get_clear_statuses_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let png = || Input::Image(fixture("images/grey8.png"));
    let dicom = fixture("dicom/grey8_explicit_le.dcm");

    expect_status(
        &mut c,
        request(png(), &["no-such-task"]),
        Code::NotFound,
        "no-such-task",
    )
    .await;
    expect_status(
        &mut c,
        request(png(), &["dr-grade@9"]),
        Code::NotFound,
        "has no version \"9\"",
    )
    .await;
    expect_status(
        &mut c,
        request(png(), &["dr-grade@"]),
        Code::InvalidArgument,
        "name@version",
    )
    .await;
    expect_status(
        &mut c,
        request(png(), &[]),
        Code::InvalidArgument,
        "no tasks",
    )
    .await;
    let mut no_input = request(png(), &["dr-grade"]);
    no_input.input = None;
    expect_status(&mut c, no_input, Code::InvalidArgument, "no input").await;
    let many: Vec<String> = (0..65).map(|_| "dr-grade".to_string()).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    expect_status(
        &mut c,
        request(png(), &many),
        Code::InvalidArgument,
        "at most 64",
    )
    .await;

    expect_status(
        &mut c,
        request(Input::Image(b"not an image".to_vec()), &["dr-grade"]),
        Code::InvalidArgument,
        "not PNG, JPEG or TIFF",
    )
    .await;
    let png_bytes = fixture("images/grey8.png");
    expect_status(
        &mut c,
        request(
            Input::Image(png_bytes[..png_bytes.len() / 2].to_vec()),
            &["dr-grade"],
        ),
        Code::InvalidArgument,
        "cannot decode png",
    )
    .await;
    expect_status(
        &mut c,
        request(Input::Dicom(png_bytes.clone()), &["dr-grade"]),
        Code::InvalidArgument,
        "not a DICOM",
    )
    .await;
    expect_status(
        &mut c,
        request(Input::Dicom(dicom[..400].to_vec()), &["dr-grade"]),
        Code::InvalidArgument,
        "",
    )
    .await;
    expect_status(
        &mut c,
        request(
            Input::Dicom(dicom[..dicom.len() - 1000].to_vec()),
            &["dr-grade"],
        ),
        Code::InvalidArgument,
        "",
    )
    .await;
    let mut frame = request(Input::Dicom(dicom.clone()), &["dr-grade"]);
    frame.frame = 3;
    expect_status(
        &mut c,
        frame,
        Code::InvalidArgument,
        "frame 3 requested, but the image has 1",
    )
    .await;
    let mut frame = request(png(), &["dr-grade"]);
    frame.frame = 1;
    expect_status(&mut c, frame, Code::InvalidArgument, "frame 1").await;

    // Every failure above left the server serving.
    let ok = c
        .classify(request(Input::Dicom(dicom), &["dr-grade"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.results.len(), 1);
}

#[tokio::test]
async fn oversized_input_is_resource_exhausted() {
    let settings = GrpcSettings {
        max_message_bytes: 256 << 10,
        ..GrpcSettings::default()
    };
    let limits = Limits {
        max_pixels: 100 * 100,
        ..Limits::default()
    };
    let server = TestServer::start_with(&common::demo_repository(), settings, limits).await;
    let mut c = server.client().await;
    // Over the message limit.
    expect_status(
        &mut c,
        request(Input::Image(vec![0u8; 300 << 10]), &["dr-grade"]),
        Code::ResourceExhausted,
        "too large",
    )
    .await;
    // Within the message limit, over the pixel limit: refused from the header.
    expect_status(
        &mut c,
        request(Input::Image(fixture("images/grey8.png")), &["dr-grade"]),
        Code::ResourceExhausted,
        "over the limit of 10000",
    )
    .await;
    expect_status(
        &mut c,
        request(
            Input::Dicom(fixture("dicom/grey8_explicit_le.dcm")),
            &["dr-grade"],
        ),
        Code::ResourceExhausted,
        "over the limit of 10000",
    )
    .await;
}

/// JPEG and TIFF are accepted too. Their decoders are not PIL's (JPEG IDCTs differ by
/// a grey level here and there), so this checks the formats are served, and that a
/// lossless TIFF of a fixture gives the PNG's exact answer.
#[tokio::test]
async fn jpeg_and_tiff_inputs_classify() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let png = image::load_from_memory(&fixture("images/rgb8.png")).unwrap();
    let encode = |format| {
        let mut out = std::io::Cursor::new(Vec::new());
        png.write_to(&mut out, format).unwrap();
        out.into_inner()
    };
    let ask = |bytes: Vec<u8>| request(Input::Image(bytes), &["dr-grade@1"]);
    let from_png = c
        .classify(ask(fixture("images/rgb8.png")))
        .await
        .unwrap()
        .into_inner();
    let from_tiff = c
        .classify(ask(encode(image::ImageFormat::Tiff)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(from_tiff.input.as_ref().unwrap().format, "tiff");
    let probs = |r: &fptserve::proto::v1::ClassifyResponse| -> Vec<f32> {
        r.results[0].scores.iter().map(|s| s.probability).collect()
    };
    assert_eq!(probs(&from_tiff), probs(&from_png));
    let from_jpeg = c
        .classify(ask(encode(image::ImageFormat::Jpeg)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(from_jpeg.input.as_ref().unwrap().format, "jpeg");
    assert_eq!(from_jpeg.results[0].scores.len(), 5);
}

/// A pydicom test file, found through the project's Python environment.
fn pydicom_file(name: &str) -> std::path::PathBuf {
    let out = std::process::Command::new(common::root().join(".venv/bin/python"))
        .args([
            "-c",
            &format!("import pydicom.data as d; print(d.get_testdata_file('{name}'))"),
        ])
        .output()
        .expect(".venv/bin/python runs (make test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A request may replace a task's DICOM pixel policy only where the manifest allows it.
#[tokio::test]
async fn request_pixel_policy_applies_only_where_the_manifest_allows_it() {
    use fptserve::proto::v1::PixelPolicy;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let status = std::process::Command::new("cp")
        .args(["-r"])
        .arg(common::demo_repository())
        .arg(&repo)
        .status()
        .unwrap();
    assert!(status.success());
    // Manifests are not covered by the ONNX digests: allowing the override is an edit.
    let manifest = repo.join("tasks/chest-xray/1/manifest.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    json["preprocessing"]["dicom"]["allow_request_override"] = serde_json::json!(true);
    std::fs::write(&manifest, serde_json::to_vec_pretty(&json).unwrap()).unwrap();

    let server = TestServer::start_with(&repo, GrpcSettings::default(), Limits::default()).await;
    let mut c = server.client().await;
    // CT_small.dcm: signed 16-bit CT with rescale and no window, so `auto` is min-max.
    let ct = std::fs::read(pydicom_file("CT_small.dcm")).unwrap();
    let ask = |policy: Option<PixelPolicy>, task: &str| ClassifyRequest {
        pixel_policy: policy,
        ..request(Input::Dicom(ct.clone()), &[task])
    };
    let probs = |r: fptserve::proto::v1::ClassifyResponse| -> Vec<f32> {
        r.results[0].scores.iter().map(|s| s.probability).collect()
    };
    let default = probs(
        c.classify(ask(None, "chest-xray"))
            .await
            .unwrap()
            .into_inner(),
    );
    // A soft-tissue window (40/400 HU): other pixels, another answer.
    let window = PixelPolicy {
        voi: "window".into(),
        window_center: Some(40.0),
        window_width: Some(400.0),
        voi_function: "linear".into(),
    };
    let explicit = probs(
        c.classify(ask(Some(window.clone()), "chest-xray"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_ne!(default, explicit);
    // What auto does for this file, asked for explicitly: the same answer.
    let minmax = PixelPolicy {
        voi: "minmax".into(),
        ..Default::default()
    };
    let other = probs(
        c.classify(ask(Some(minmax), "chest-xray"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(default, other);

    expect_status(
        &mut c,
        ask(Some(window), "dr-grade"),
        Code::InvalidArgument,
        "does not allow overriding",
    )
    .await;
    let broken = PixelPolicy {
        voi: "window".into(),
        ..Default::default()
    };
    expect_status(
        &mut c,
        ask(Some(broken), "chest-xray"),
        Code::InvalidArgument,
        "window_width > 0",
    )
    .await;
}
