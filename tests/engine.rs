//! The serving engine under concurrency, in process: backbone batches shared across calls
//! and tasks, the feature cache, and work dropped for calls whose deadline passed. The
//! engine's counters (`Engine::stats`) show what the backbone actually ran.
//!
//! Cancellation is tested with grpcio (tests/python/test_engine.py): tonic's client does
//! not reset the HTTP/2 stream when a call is dropped, grpcio's does.

mod common;

use std::time::{Duration, Instant};

use common::{Case, TestServer, input_of, reference, request};
use fptserve::engine::{BatchSettings, EngineSettings, StatsSnapshot};
use fptserve::proto::v1::ClassifyResponse;
use tonic::Code;

fn settings(max_batch: usize, max_delay_ms: u64, cache_bytes: usize) -> EngineSettings {
    settings_on(false, max_batch, max_delay_ms, cache_bytes)
}

/// [`settings`] on the bound path (`io_binding`) or the host path.
fn settings_on(
    io_binding: bool,
    max_batch: usize,
    max_delay_ms: u64,
    cache_bytes: usize,
) -> EngineSettings {
    EngineSettings {
        batch: BatchSettings {
            max_batch,
            max_delay: Duration::from_millis(max_delay_ms),
            max_queue: 64,
            io_binding,
        },
        feature_cache_bytes: cache_bytes,
        decode_threads: 8,
    }
}

fn probabilities(response: &ClassifyResponse) -> Vec<f32> {
    response.results[0]
        .scores
        .iter()
        .map(|s| s.probability)
        .collect()
}

fn logits(response: &ClassifyResponse) -> Vec<f32> {
    response.results[0].scores.iter().map(|s| s.logit).collect()
}

fn case<'a>(cases: &'a [Case], input: &str, task: &str, version: &str) -> &'a Case {
    cases
        .iter()
        .find(|c| c.input == input && c.task == task && c.version == version)
        .unwrap_or_else(|| panic!("no reference case {input} {task}@{version}"))
}

/// Calls `cases` all at once, one task each.
async fn classify_concurrently(server: &TestServer, cases: &[&Case]) -> Vec<ClassifyResponse> {
    let client = server.client().await;
    let handles: Vec<_> = cases
        .iter()
        .map(|c| {
            let task = format!("{}@{}", c.task, c.version);
            let input = input_of(c);
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .classify(request(input, &[&task]))
                    .await
                    .unwrap_or_else(|e| panic!("{task}: {e}"))
                    .into_inner()
            })
        })
        .collect();
    let mut responses = Vec::new();
    for handle in handles {
        responses.push(handle.await.unwrap());
    }
    responses
}

/// Waits until the engine's counters satisfy `done` (the batcher answers asynchronously).
async fn wait_for(server: &TestServer, done: impl Fn(&StatsSnapshot) -> bool) -> StatsSnapshot {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = server.engine.stats();
        if done(&stats) || Instant::now() > until {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Six calls for one batch: four tasks (two with their own normalisation), five images; two
/// calls on one adapter version (one side-network run for both); rgb8 for dr-grade@2 and
/// for skin-lesion@1 is one backbone input (same normalisation), computed once.
fn mixed_batch(cases: &[Case]) -> [&Case; 6] {
    [
        case(cases, "images/rgb8.png", "dr-grade", "2"),
        case(cases, "images/rgb8.png", "skin-lesion", "1"),
        case(cases, "images/grey8.png", "dr-grade", "2"),
        case(cases, "images/grey16.png", "chest-xray", "1"),
        case(cases, "images/rgba8.png", "dr-grade", "1"),
        case(cases, "dicom/rgb8_rle.dcm", "chest-xray", "1"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_for_different_tasks_share_backbone_batches() {
    let reference = reference();
    let cases = &reference.cases;
    let chosen = mixed_batch(cases);
    // Cache off, so every image reaches the backbone; a wide window so all six queue
    // before the batch closes.
    let batched = TestServer::start_demo_engine(settings(8, 1500, 0)).await;
    let responses = classify_concurrently(&batched, &chosen).await;
    let stats = batched.engine.stats();
    assert_eq!(stats.backbone_batches, 1, "{stats:?}");
    assert_eq!(stats.backbone_images, 5, "{stats:?}");
    for response in &responses {
        assert_eq!(response.results[0].backbone_batch_size, 5);
        assert_eq!(response.backbone_runs, 1);
    }

    // The same calls one at a time, unbatched: both equal PyTorch, and each other. A batch of
    // five is another matrix shape for the same float32 arithmetic, so kernels may sum in
    // another order: the two agree within float32 rounding, the same bound that holds them to
    // PyTorch (reference.tolerance, derived in fptserve_models.demo). A batch that mixed up
    // rows would be off by far more.
    let single = TestServer::start_demo_engine(settings(1, 0, 0)).await;
    let mut client = single.client().await;
    for (case, batched) in chosen.iter().zip(&responses) {
        let task = format!("{}@{}", case.task, case.version);
        let alone = client
            .classify(request(input_of(case), &[&task]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(alone.results[0].backbone_batch_size, 1);
        for (a, b) in logits(batched).iter().zip(logits(&alone)) {
            assert!(
                f64::from((a - b).abs()) <= reference.tolerance,
                "{task} on {}: logit {a} vs {b}",
                case.input
            );
        }
        for (a, b) in probabilities(batched).iter().zip(probabilities(&alone)) {
            assert!(
                f64::from((a - b).abs()) <= reference.tolerance,
                "{task} on {}: {a} vs {b}",
                case.input
            );
        }
        for (p, r) in probabilities(batched).iter().zip(&case.probabilities) {
            assert!(
                (f64::from(*p) - r).abs() <= reference.tolerance,
                "{task} on {}: {p} vs PyTorch {r}",
                case.input
            );
        }
    }
    assert_eq!(single.engine.stats().backbone_images, 6);
}

/// The bound path (K/V left in ONNX Runtime's output, each side network run on the whole
/// batch; here bound to host memory, as the CPU execution provider computes there) answers
/// as the host path does, for one batch mixing tasks and normalisations, with the feature
/// cache off and on. Both paths run the same float32 kernels on the same K/V; a side network
/// run on the whole batch is another matrix shape than one on the rows that asked, so its
/// sums may round differently: 1e-6 on probabilities (a few float32 ulps of the largest;
/// a row mixed up with another image's would be off by far more).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bound_path_answers_as_the_host_path_for_mixed_batches_with_and_without_the_cache() {
    let reference = reference();
    let cases = &reference.cases;
    // the mixed batch's six calls, and a seventh asking what the first asks (one backbone
    // row, two jobs on one adapter version)
    let mixed = mixed_batch(cases);
    let chosen: Vec<&Case> = mixed.iter().copied().chain([mixed[0]]).collect();
    let host = TestServer::start_demo_engine(settings_on(false, 8, 1500, 0)).await;
    let expected = classify_concurrently(&host, &chosen).await;
    let stats = host.engine.stats();
    assert_eq!((stats.backbone_images, stats.bound_batches), (5, 0));
    assert_eq!(
        stats.kv_host_copies, 5,
        "the host path copies every image's K/V"
    );

    let same = |got: &[ClassifyResponse], what: &str| {
        for ((case, got), want) in chosen.iter().zip(got).zip(&expected) {
            let task = format!("{}@{}", case.task, case.version);
            assert_eq!(
                probabilities(got).len(),
                case.classes.len(),
                "{what}: {task} on {}",
                case.input
            );
            for (a, b) in probabilities(got).iter().zip(probabilities(want)) {
                assert!(
                    (a - b).abs() <= 1e-6,
                    "{what}: {task} on {}: {a} vs host path {b}",
                    case.input
                );
            }
        }
    };
    // cache off: one bound batch of five images, no K/V copied to host buffers
    let bound = TestServer::start_demo_engine(settings_on(true, 8, 1500, 0)).await;
    let got = classify_concurrently(&bound, &chosen).await;
    let stats = bound.engine.stats();
    assert_eq!(
        (
            stats.backbone_batches,
            stats.backbone_images,
            stats.bound_batches
        ),
        (1, 5, 1),
        "{stats:?}"
    );
    assert_eq!(
        stats.bound_float16_batches, 0,
        "the demo backbone is float32"
    );
    assert_eq!(stats.kv_host_copies, 0, "{stats:?}");
    for response in &got {
        assert_eq!(response.results[0].backbone_batch_size, 5);
    }
    same(&got, "bound, cache off");

    // cache on: the batch's K/V are copied to the host for the cache, once per image, and a
    // second round is answered from there (host side networks) with the same numbers
    let cached = TestServer::start_demo_engine(settings_on(true, 8, 1500, 64 << 20)).await;
    let got = classify_concurrently(&cached, &chosen).await;
    same(&got, "bound, cache on, computed");
    let stats = cached.engine.stats();
    assert_eq!(
        (stats.bound_batches, stats.kv_host_copies),
        (1, 5),
        "{stats:?}"
    );
    let again = classify_concurrently(&cached, &chosen).await;
    for response in &again {
        assert_eq!(response.backbone_cache_hits, 1);
    }
    same(&again, "bound, cache on, from the cache");
    let stats = cached.engine.stats();
    assert_eq!((stats.bound_batches, stats.cache_hits), (1, 7), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_feature_cache_skips_the_backbone_only_for_the_same_backbone_input() {
    let reference = reference();
    let cases = &reference.cases;
    let server = TestServer::start_demo_engine(settings(8, 0, 64 << 20)).await;
    let client = server.client().await;
    let call = |case: &Case| cached_call(client.clone(), case.clone());
    // first sight of rgb8 under the dr-grade/skin-lesion normalisation: computed
    assert_eq!(
        call(case(cases, "images/rgb8.png", "dr-grade", "2")).await,
        (1, 0)
    );
    // same image, another task with the same preprocessing: from the cache
    assert_eq!(
        call(case(cases, "images/rgb8.png", "skin-lesion", "1")).await,
        (0, 1)
    );
    // a different image: computed
    assert_eq!(
        call(case(cases, "images/grey8.png", "skin-lesion", "1")).await,
        (1, 0)
    );
    // the same image under another preprocessing key (chest-xray's mean/std): computed
    assert_eq!(
        call(case(cases, "images/rgb8.png", "chest-xray", "1")).await,
        (1, 0)
    );
    // and a retry of the first call: from the cache
    assert_eq!(
        call(case(cases, "images/rgb8.png", "dr-grade", "2")).await,
        (0, 1)
    );
    let stats = server.engine.stats();
    assert_eq!((stats.cache_hits, stats.cache_misses), (2, 3), "{stats:?}");
    assert_eq!(stats.backbone_images, 3);
}

/// One call for `case`'s task; checks its answer against PyTorch and returns
/// (backbone_runs, backbone_cache_hits).
async fn cached_call(
    mut client: fptserve::proto::v1::classifier_client::ClassifierClient<tonic::transport::Channel>,
    case: Case,
) -> (u32, u32) {
    let task = format!("{}@{}", case.task, case.version);
    let response = client
        .classify(request(input_of(&case), &[&task]))
        .await
        .unwrap()
        .into_inner();
    for (p, r) in probabilities(&response).iter().zip(&case.probabilities) {
        assert!(
            (f64::from(*p) - r).abs() <= 1e-4,
            "{task}: {p} vs PyTorch {r}"
        );
    }
    (response.backbone_runs, response.backbone_cache_hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_whose_deadline_passes_in_the_queue_gets_deadline_exceeded_and_no_backbone_run() {
    let reference = reference();
    let case = &reference.cases[0];
    // The batch waits 2 s for company; the call allows 300 ms.
    let server = TestServer::start_demo_engine(settings(8, 2000, 0)).await;
    let mut client = server.client().await;
    let mut call = request(input_of(case), &["dr-grade"]);
    let started = Instant::now();
    let mut req = tonic::Request::new(call.clone());
    req.set_timeout(Duration::from_millis(300));
    let status = client.classify(req).await.expect_err("deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at the deadline, not after the batch"
    );
    let stats = wait_for(&server, |s| s.dropped_deadline == 1 && s.queued == 0).await;
    assert_eq!(stats.dropped_deadline, 1, "{stats:?}");
    assert_eq!(stats.backbone_images, 0, "{stats:?}");
    assert_eq!(stats.in_flight, 0, "{stats:?}");

    // a call with time enough is answered
    call.tasks = vec!["skin-lesion".into()];
    let mut req = tonic::Request::new(call);
    req.set_timeout(Duration::from_secs(30));
    let response = client.classify(req).await.unwrap().into_inner();
    assert_eq!(response.results[0].backbone_batch_size, 1);
    assert_eq!(server.engine.stats().backbone_images, 1);
}
