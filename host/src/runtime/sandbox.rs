//! What one rule instance's store holds: deny-by-default WASI, the bounded
//! rule log (which stdout and stderr also feed), and the memory limiter.
//! Host imports live here.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::Limits;
use super::bindings::{self, Level};
use super::error::{Cause, Output, Stop};

/// One line of a rule's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    /// Written to stdout or stderr.
    Output,
}

/// The rule log of the current call, shared with the captured stdio streams.
#[derive(Debug, Default)]
pub(crate) struct RuleLog {
    lines: Vec<LogLine>,
    bytes: usize,
    limit: usize,
}

impl RuleLog {
    fn append(&mut self, level: LogLevel, message: &str) -> Result<(), Stop> {
        self.bytes += message.len();
        if self.bytes > self.limit {
            return Err(Stop(Cause::OutputTooLarge {
                what: Output::LogBytes,
                limit: self.limit,
            }));
        }
        match self.lines.last_mut() {
            // stdout arrives in arbitrary chunks: join them into lines.
            Some(last)
                if level == LogLevel::Output
                    && last.level == LogLevel::Output
                    && !last.message.ends_with('\n') =>
            {
                last.message.push_str(message)
            }
            _ => self.lines.push(LogLine {
                level,
                message: message.to_owned(),
            }),
        }
        Ok(())
    }
}

/// The store data of one rule instance.
pub(crate) struct Sandbox {
    wasi: WasiCtx,
    table: ResourceTable,
    log: Arc<Mutex<RuleLog>>,
    limits: Limits,
}

impl Sandbox {
    pub(crate) fn new(limits: &Limits) -> Self {
        let log = Arc::new(Mutex::new(RuleLog {
            limit: limits.max_log_bytes,
            ..RuleLog::default()
        }));
        // Nothing from the host leaks in: no preopened directories, no
        // environment, no arguments, no network, empty stdin.
        let wasi = WasiCtx::builder()
            .stdout(CapturedOutput(log.clone()))
            .stderr(CapturedOutput(log.clone()))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Sandbox {
            wasi,
            table: ResourceTable::new(),
            log,
            limits: limits.clone(),
        }
    }

    /// Forget the previous call's output.
    pub(crate) fn begin_call(&mut self) {
        let mut log = self.log.lock().expect("rule log lock");
        log.lines.clear();
        log.bytes = 0;
    }

    pub(crate) fn take_log(&mut self) -> Vec<LogLine> {
        std::mem::take(&mut self.log.lock().expect("rule log lock").lines)
    }
}

impl WasiView for Sandbox {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::tocsin::rule::types::Host for Sandbox {}

impl bindings::tocsin::rule::host::Host for Sandbox {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        let mut log = self.log.lock().expect("rule log lock");
        log.append(level, &message).map_err(wasmtime::Error::new)
    }
}

impl ResourceLimiter for Sandbox {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limits.memory_bytes {
            return Err(wasmtime::Error::new(Stop(Cause::OutOfMemory {
                limit_bytes: self.limits.memory_bytes,
            })));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|max| desired <= max))
    }
}

/// A guest's stdout or stderr: appended to the rule log, under its bound.
#[derive(Clone)]
struct CapturedOutput(Arc<Mutex<RuleLog>>);

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl CapturedOutput {
    fn write_bytes(&self, bytes: &[u8]) -> Result<(), Stop> {
        let text = String::from_utf8_lossy(bytes);
        self.0
            .lock()
            .expect("rule log lock")
            .append(LogLevel::Output, &text)
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.write_bytes(&bytes)
            .map_err(|stop| StreamError::Trap(wasmtime::Error::new(stop)))
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Writes are accepted whole; the log bound traps past its limit.
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = self
            .write_bytes(buf)
            .map(|()| buf.len())
            .map_err(std::io::Error::other);
        std::task::Poll::Ready(result)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
