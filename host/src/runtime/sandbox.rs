//! What one rule instance's store holds: deny-by-default WASI whose clocks
//! and random are the call's own (see [`CallScope`]), the bounded rule log
//! (which stdout and stderr also feed), and the memory limiter. Host imports
//! live here.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand_wasi::rngs::StdRng;
use rand_wasi::{Rng as _, SeedableRng as _, TryRng};
use wasmtime::ResourceLimiter;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock, WasiClocksCtxView, WasiClocksView};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamError};
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

impl LogLevel {
    /// Its name as logs show it.
    pub fn name(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
            LogLevel::Output => "stdout",
        }
    }
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

/// What the guest's clocks and random read inside one call: the call's
/// `now`, and a generator seeded by the instance and the call's identity,
/// drawn from only when the guest asks (most calls never do).
struct CallScope {
    now_ms: AtomicI64,
    random: Mutex<CallRandom>,
}

struct CallRandom {
    /// Fixed per instance: from its tenant and rule.
    instance: [u8; 16],
    /// The call's identity, hashed.
    call: u64,
    rng: Option<StdRng>,
}

impl CallScope {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    fn with_rng<R>(&self, f: impl FnOnce(&mut StdRng) -> R) -> R {
        let mut random = self.random.lock().expect("call random lock");
        let CallRandom {
            instance,
            call,
            rng,
        } = &mut *random;
        let rng = rng.get_or_insert_with(|| {
            let mut seed = [0; 32];
            seed[..16].copy_from_slice(instance);
            seed[16..24].copy_from_slice(&call.to_le_bytes());
            StdRng::from_seed(seed)
        });
        f(rng)
    }
}

/// `wasi:clocks` inside a call: both clocks read the call's `now`.
#[derive(Clone)]
struct CallClock(Arc<CallScope>);

impl HostWallClock for CallClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }

    fn now(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.0.now_ms()).unwrap_or(0))
    }
}

impl HostMonotonicClock for CallClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }

    fn now(&self) -> u64 {
        u64::try_from(self.0.now_ms())
            .unwrap_or(0)
            .saturating_mul(1_000_000)
    }
}

/// `wasi:random/random` and `wasi:random/insecure` inside a call.
#[derive(Clone)]
struct CallRng(Arc<CallScope>);

impl TryRng for CallRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(self.0.with_rng(|rng| rng.next_u32()))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(self.0.with_rng(|rng| rng.next_u64()))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.with_rng(|rng| rng.fill_bytes(dst));
        Ok(())
    }
}

/// The store data of one rule instance.
pub(crate) struct Sandbox {
    wasi: WasiCtx,
    table: ResourceTable,
    log: Arc<Mutex<RuleLog>>,
    scope: Arc<CallScope>,
    limits: Limits,
}

impl Sandbox {
    /// `seed` is fixed per instance (tenant and rule): it seeds
    /// `wasi:random/insecure-seed`, which std reads once for `HashMap`, and,
    /// with each call's identity, the call's generator.
    pub(crate) fn new(limits: &Limits, seed: [u8; 16]) -> Self {
        let log = Arc::new(Mutex::new(RuleLog {
            limit: limits.max_log_bytes,
            ..RuleLog::default()
        }));
        let scope = Arc::new(CallScope {
            now_ms: AtomicI64::new(0),
            random: Mutex::new(CallRandom {
                instance: seed,
                call: 0,
                rng: None,
            }),
        });
        // Nothing from the host leaks in: no preopened directories, no
        // environment, no arguments, no network, empty stdin, no clock and
        // no entropy but the call's.
        let wasi = WasiCtx::builder()
            .stdout(CapturedOutput(log.clone()))
            .stderr(CapturedOutput(log.clone()))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(CallClock(scope.clone()))
            .monotonic_clock(CallClock(scope.clone()))
            .secure_random(CallRng(scope.clone()))
            .insecure_random(CallRng(scope.clone()))
            .insecure_random_seed(u128::from_le_bytes(seed))
            .build();
        Sandbox {
            wasi,
            table: ResourceTable::new(),
            log,
            scope,
            limits: limits.clone(),
        }
    }

    /// Start a call at `now_ms` whose identity hashes to `call`: forget the
    /// previous call's output, set the clocks, reseed the generator.
    pub(crate) fn begin_call(&mut self, now_ms: i64, call: u64) {
        let mut log = self.log.lock().expect("rule log lock");
        log.lines.clear();
        log.bytes = 0;
        self.scope.now_ms.store(now_ms, Ordering::Relaxed);
        let mut random = self.scope.random.lock().expect("call random lock");
        random.call = call;
        random.rng = None;
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

/// Link WASI into the rules' linker with `wasi:clocks/monotonic-clock`
/// replaced: a pollable for a time not yet reached would block the host
/// thread, where no deadline can stop it, so asking for one fails the call.
pub(crate) fn add_wasi_to_linker(linker: &mut Linker<Sandbox>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    monotonic_clock::add_to_linker::<Sandbox, NoWaiting>(linker, |sandbox| {
        NoWaitingClock(sandbox.clocks())
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

struct NoWaiting;

impl HasData for NoWaiting {
    type Data<'a> = NoWaitingClock<'a>;
}

struct NoWaitingClock<'a>(WasiClocksCtxView<'a>);

impl NoWaitingClock<'_> {
    fn blocked(what: String) -> wasmtime::Error {
        wasmtime::Error::new(Stop(Cause::Blocked { what }))
    }
}

impl monotonic_clock::Host for NoWaitingClock<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        monotonic_clock::Host::now(&mut self.0)
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        monotonic_clock::Host::resolution(&mut self.0)
    }

    fn subscribe_instant(
        &mut self,
        when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        let now = monotonic_clock::Host::now(&mut self.0)?;
        if when > now {
            let ahead = Duration::from_nanos(when - now);
            return Err(Self::blocked(format!("a wait until {ahead:?} from now")));
        }
        monotonic_clock::Host::subscribe_instant(&mut self.0, when)
    }

    fn subscribe_duration(
        &mut self,
        duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        if duration > 0 {
            let wait = Duration::from_nanos(duration);
            return Err(Self::blocked(format!("a wait of {wait:?}")));
        }
        monotonic_clock::Host::subscribe_duration(&mut self.0, duration)
    }
}

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
