//! ONNX Runtime set-up: the library is found without any environment variable, and a
//! CUDA request on a machine or library without CUDA falls back to the CPU and serves.

mod common;

use std::sync::Arc;

use fptserve::lifecycle::Lifecycle;
use fptserve::runtime::{Device, Runtime, Threads};

#[test]
fn cuda_request_without_cuda_falls_back_to_cpu_and_still_classifies() {
    let threads = Threads {
        intra_op: 1,
        inter_op: 1,
    };
    let runtime = Runtime::new(None, Device::Cuda(0), threads).expect("runtime starts");
    assert_eq!(runtime.requested_device(), Device::Cuda(0));
    // The PyPI `onnxruntime` wheel this project fetches is the CPU build.
    assert_eq!(runtime.device(), Device::Cpu);
    assert!(runtime.library().ends_with("libonnxruntime.so.1.32.0"));
    let loaded = Lifecycle::start(
        &common::demo_repository(),
        Arc::new(runtime),
        Default::default(),
    )
    .unwrap();
    assert!(loaded.failures.is_empty(), "{:?}", loaded.failures);
    assert_eq!(loaded.lifecycle.registry().snapshot().tasks().len(), 3);
}

#[test]
fn device_names_parse() {
    assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
    assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
    assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
    assert!(
        "gpu"
            .parse::<Device>()
            .unwrap_err()
            .contains("cpu, cuda or cuda:N")
    );
    assert!("cuda:-1".parse::<Device>().is_err());
}
