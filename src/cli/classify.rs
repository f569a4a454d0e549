//! `fptserve classify FILE --task T`: one-shot classification without a server, through
//! the same engine the daemon uses.

use std::sync::Arc;

use anyhow::Context;

use crate::config::ClassifyArgs;
use crate::decode::Limits;
use crate::engine::{Engine, EngineSettings, Outcome, Payload, Request};

/// Runs the command and prints the result.
pub fn run(args: ClassifyArgs) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let config = args.models.resolve()?;
    let started = crate::daemon::load_models(&config, None, None)?;
    for failure in &started.failures {
        eprintln!("skipped {}: {}", failure.path.display(), failure.error);
    }
    let engine = Arc::new(Engine::new(
        started.lifecycle,
        Limits::default(),
        EngineSettings::default(),
    ));
    let request = Request {
        payload: Payload::sniff(bytes),
        tasks: args.tasks,
        frame: args.frame,
        pixel_policy: None,
        explain: None,
    };
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(engine.classify(request, engine.call(None, None)))?;
    let text = if args.json {
        serde_json::to_string_pretty(&outcome)? + "\n"
    } else {
        table(&outcome)
    };
    // write_all rather than print!: a closed pipe (`| head`) is an error, not a panic.
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// A human-readable rendering of an outcome.
pub fn table(outcome: &Outcome) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let i = &outcome.input;
    let _ = writeln!(
        out,
        "input: {} {}x{} {} (frame {} of {})",
        i.format, i.width, i.height, i.color, i.frame, i.frames
    );
    for r in &outcome.results {
        let _ = writeln!(
            out,
            "\n{}@{} -> {}   (backbone {}, pass {})",
            r.task, r.adapter_version, r.label, r.backbone, r.backbone_run
        );
        for s in &r.scores {
            let bar = "#".repeat((s.probability * 40.0).round() as usize);
            let _ = writeln!(
                out,
                "  {:<20} {:>8.4}  logit {:>8.4}  {bar}",
                s.name, s.probability, s.logit
            );
        }
    }
    let t = &outcome.timings;
    let _ = writeln!(
        out,
        "\nbackbone runs: {}  time: decode {:.1} ms, preprocess {:.1} ms, backbone {:.1} ms, adapters {:.1} ms, total {:.1} ms",
        outcome.backbone_runs,
        t.decode_ms,
        t.preprocess_ms,
        t.backbone_ms,
        t.adapters_ms,
        t.total_ms
    );
    out
}
