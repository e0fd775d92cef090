//! [`AgentReader`]: the agent's output, split into lines: protocol lines go to the batch's
//! events, the rest (and stderr) to [`BatchLog`]; it also tracks which cell runs until when.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::backend::{BatchCtx, Stage, Stages};
use crate::protocol::{AgentEvent, LineBuf};

/// Past a cell's own timeout, how long the agent gets to report it before the harness kills
/// the container (the agent enforces cell timeouts itself; this catches a hung agent).
pub(super) const CELL_GRACE: Duration = Duration::from_secs(10);
pub(super) const STDERR_TAIL: usize = 20;

/// Splits the agent's stdout into lines, forwards protocol lines, logs the rest, and tracks
/// which cells are running and until when.
pub(super) struct AgentReader<'a, 's> {
    ctx: &'a BatchCtx,
    stages: &'a Stages<'s>,
    timeouts: HashMap<String, Duration>,
    running: HashMap<String, Instant>,
    out: LineBuf,
    err: LineBuf,
    stderr_tail: VecDeque<String>,
    done: bool,
}

impl<'a, 's> AgentReader<'a, 's> {
    pub(super) fn new(
        ctx: &'a BatchCtx,
        stages: &'a Stages<'s>,
        timeouts: HashMap<String, Duration>,
    ) -> Self {
        AgentReader {
            ctx,
            stages,
            timeouts,
            running: HashMap::new(),
            out: LineBuf::default(),
            err: LineBuf::default(),
            stderr_tail: VecDeque::new(),
            done: false,
        }
    }

    pub(super) async fn stdout(&mut self, chunk: &[u8], log: &mut BatchLog) {
        for line in self.out.push(chunk) {
            self.line(&line, log).await;
        }
    }

    pub(super) async fn stderr(&mut self, chunk: &[u8], log: &mut BatchLog) {
        for line in self.err.push(chunk) {
            self.stderr_line(line, log).await;
        }
    }

    async fn stderr_line(&mut self, line: String, log: &mut BatchLog) {
        log.line(&format!("stderr: {line}")).await;
        if self.stderr_tail.len() == STDERR_TAIL {
            self.stderr_tail.pop_front();
        }
        self.stderr_tail.push_back(line);
    }

    pub(super) async fn flush(&mut self, log: &mut BatchLog) {
        if let Some(rest) = self.out.finish() {
            self.line(&rest, log).await;
        }
        if let Some(rest) = self.err.finish() {
            self.stderr_line(rest, log).await;
        }
    }

    pub(super) async fn line(&mut self, line: &str, log: &mut BatchLog) {
        let event = match AgentEvent::parse_line(line) {
            None => {
                log.line(&format!("stdout: {line}")).await;
                return;
            }
            Some(Err(e)) => {
                log.line(&format!("stdout (bad protocol line: {e}): {line}"))
                    .await;
                return;
            }
            Some(Ok(ev)) => ev,
        };
        match &event {
            AgentEvent::Hello { .. } => {
                self.stages.finish(Stage::Start);
                self.stages.start(Stage::Run);
            }
            AgentEvent::CellStarted { id } => {
                let limit = self
                    .timeouts
                    .get(id)
                    .copied()
                    .unwrap_or(Duration::from_secs(60));
                self.running
                    .insert(id.clone(), Instant::now() + limit + CELL_GRACE);
            }
            AgentEvent::CellFinished(rec) => {
                self.running.remove(&rec.id);
            }
            AgentEvent::Log { message } => log.line(&format!("agent: {message}")).await,
            AgentEvent::BatchDone { .. } => self.done = true,
        }
        self.ctx.agent_event(event);
    }

    /// Whether the agent said its batch is done.
    pub(super) fn done(&self) -> bool {
        self.done
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.running.values().min().copied()
    }

    pub(super) fn overdue(&self) -> Option<(String, Duration)> {
        let (id, _) = self.running.iter().min_by_key(|(_, d)| **d)?;
        Some((
            id.clone(),
            self.timeouts.get(id).copied().unwrap_or_default(),
        ))
    }

    pub(super) fn stderr_tail(&self) -> String {
        self.stderr_tail
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `<log_dir>/agent.log`: the agent's non-protocol output, its stderr, and nsmatrix's notes.
/// Logging never fails a batch: a log that cannot be written is dropped.
pub(super) struct BatchLog {
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
}

impl BatchLog {
    pub(super) async fn open(ctx: &BatchCtx) -> Self {
        let _ = tokio::fs::create_dir_all(&ctx.log_dir).await;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(ctx.log_dir.join("agent.log"))
            .await
            .ok()
            .map(tokio::io::BufWriter::new);
        BatchLog { file }
    }

    pub(super) async fn line(&mut self, line: &str) {
        if let Some(f) = &mut self.file
            && (f.write_all(line.as_bytes()).await.is_err() || f.write_all(b"\n").await.is_err())
        {
            self.file = None;
        }
    }

    pub(super) async fn flush(&mut self) {
        if let Some(f) = &mut self.file {
            let _ = f.flush().await;
        }
    }
}
