//! What every backend reports while it runs a batch, and the context it runs it in.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::protocol::AgentEvent;

/// The stages of a batch, each reported when it starts and ends, so the progress display, the
/// logs and the timings all come from the same events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Build or fetch what the environment needs (image, kernel, initramfs).
    Provision,
    /// Start the container or boot the guest, until the agent says hello.
    Start,
    /// Cells running.
    Run,
    /// Stop and remove everything the batch created.
    Teardown,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Provision => "provision",
            Stage::Start => "start",
            Stage::Run => "run",
            Stage::Teardown => "teardown",
        }
    }
}

#[derive(Debug, Clone)]
pub enum BackendEvent {
    StageStarted {
        batch: String,
        stage: Stage,
    },
    StageFinished {
        batch: String,
        stage: Stage,
        elapsed: Duration,
    },
    Agent {
        batch: String,
        event: AgentEvent,
    },
}

/// Everything a backend needs to run one batch besides the batch itself.
#[derive(Debug, Clone)]
pub struct BatchCtx {
    pub run_id: String,
    pub batch_id: String,
    /// Where this batch's logs go (console, container log, agent stderr).
    pub log_dir: PathBuf,
    pub timeout: Duration,
    /// Cancelled on Ctrl-C / SIGTERM / fail-fast: stop, clean up, return.
    pub cancel: CancellationToken,
    pub events: UnboundedSender<BackendEvent>,
}

impl BatchCtx {
    pub fn send(&self, event: BackendEvent) {
        // The dispatcher outlives every batch; a closed channel means the run is over anyway.
        let _ = self.events.send(event);
    }

    pub fn agent_event(&self, event: AgentEvent) {
        self.send(BackendEvent::Agent {
            batch: self.batch_id.clone(),
            event,
        });
    }
}

/// Why a backend cannot run here, and what the user can do about it. Cells of an unavailable
/// backend are SKIPped with both, never silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub reason: String,
    pub fix: String,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (fix: {})", self.reason, self.fix)
    }
}

/// A batch that could not produce (all) its answers: every cell it did not report becomes
/// ERROR with this stage and message (a console tail included where there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    pub stage: Stage,
    pub message: String,
}

impl BatchError {
    pub fn new(stage: Stage, message: impl Into<String>) -> Self {
        BatchError {
            stage,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.stage.as_str(), self.message)
    }
}

/// Sends stage start/finish events and knows which stage is current.
pub(crate) struct Stages<'a> {
    ctx: &'a BatchCtx,
    current: Mutex<Option<(Stage, Instant)>>,
}

impl<'a> Stages<'a> {
    pub(crate) fn new(ctx: &'a BatchCtx) -> Self {
        Stages {
            ctx,
            current: Mutex::new(None),
        }
    }

    pub(crate) fn start(&self, stage: Stage) {
        *self.current.lock().expect("stage lock") = Some((stage, Instant::now()));
        self.ctx.send(BackendEvent::StageStarted {
            batch: self.ctx.batch_id.clone(),
            stage,
        });
    }

    pub(crate) fn finish(&self, stage: Stage) {
        let mut cur = self.current.lock().expect("stage lock");
        if let Some((s, t)) = *cur
            && s == stage
        {
            *cur = None;
            self.ctx.send(BackendEvent::StageFinished {
                batch: self.ctx.batch_id.clone(),
                stage,
                elapsed: t.elapsed(),
            });
        }
    }

    pub(crate) fn finish_current(&self) {
        let cur = *self.current.lock().expect("stage lock");
        if let Some((s, _)) = cur {
            self.finish(s);
        }
    }

    pub(crate) fn current(&self) -> Stage {
        self.current
            .lock()
            .expect("stage lock")
            .map_or(Stage::Run, |(s, _)| s)
    }
}
