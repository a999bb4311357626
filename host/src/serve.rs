//! `tocsin serve`: wires the embedded backends, the processor and the HTTP
//! API together, and runs until told to stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::catalogue::StaticCatalogue;
use crate::clock::Clock;
use crate::config::{AlertsBackend, Config};
use crate::processor::{self, Processor};
use crate::runtime::{Metering, Runtime, RuntimeConfig};
use crate::server::{self, AppState};
use crate::sink::AlertSink;
use crate::sink::file::FileSink;
use crate::sink::kinesis::{KinesisSink, SdkWriter};
use crate::store::embedded::EmbeddedStore;

/// Requests waiting for the processor before senders wait too.
const QUEUE_DEPTH: usize = 1024;

/// Create the data directory and compile every configured rule (once per
/// component file, cached on disk).
pub async fn load_catalogue(config: &Config) -> anyhow::Result<Arc<StaticCatalogue>> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let runtime = Runtime::new(RuntimeConfig {
        limits: config.limits.clone(),
        max_instances: config.max_instances,
        cache_dir: Some(config.data_dir.join("components")),
        metering: Metering::Enforced,
        ..RuntimeConfig::default()
    })?;
    let assignments = config.assignments();
    let catalogue = tokio::task::spawn_blocking(move || {
        let catalogue = StaticCatalogue::load(&runtime, &assignments);
        (runtime, catalogue)
    })
    .await?
    .1?;
    tracing::info!(
        tenants = catalogue.tenants(),
        rules = catalogue.rule_count(),
        "rules loaded"
    );
    Ok(Arc::new(catalogue))
}

/// The configured alert sink.
pub async fn open_sink(config: &Config) -> anyhow::Result<Arc<dyn AlertSink>> {
    Ok(match &config.alerts {
        AlertsBackend::File => Arc::new(FileSink::open(&config.data_dir.join("alerts.ndjson"))?),
        AlertsBackend::Kinesis(stream) => {
            let aws = crate::aws::sdk_config().await;
            Arc::new(KinesisSink::new(
                SdkWriter(aws_sdk_kinesis::Client::new(&aws)),
                stream,
            ))
        }
    })
}

/// A running service.
pub struct Server {
    addr: SocketAddr,
    processor: Arc<Processor>,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Open the data directory, load the rules, publish what a previous run
    /// left in the outbox, and start listening.
    pub async fn start(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Server> {
        config.validate().map_err(anyhow::Error::msg)?;
        let catalogue = load_catalogue(&config).await?;
        let store = Arc::new(EmbeddedStore::open(&config.data_dir.join("state.redb"))?);
        let sink = open_sink(&config).await?;
        let processor = Arc::new(Processor::new(
            catalogue,
            store.clone(),
            sink,
            clock.clone(),
        ));
        {
            let processor = processor.clone();
            tokio::task::spawn_blocking(move || processor.recover()).await??;
        }

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let (queue, submissions) = mpsc::channel(QUEUE_DEPTH);
        let state = Arc::new(AppState {
            processor: processor.clone(),
            queue,
            log: store,
            clock,
            tenant_field: config.tenant_field.clone(),
            ready: AtomicBool::new(true),
            shutdown: stopped.clone(),
            instance: format!("r{:x}", rand::random::<u64>()),
            requests: AtomicU64::new(0),
        });
        let app = server::router(state, config.max_body_bytes);
        let worker = tokio::spawn(processor::run(
            processor.clone(),
            submissions,
            config.max_batch_events,
        ));
        let mut until_stopped = stopped;
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = until_stopped.wait_for(|stop| *stop).await;
                })
                .await?;
            // The router (and its queue sender) is gone: the worker finishes
            // what is queued and returns.
            worker.await?;
            Ok(())
        });
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "serving");
        Ok(Server {
            addr,
            processor,
            stop,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn processor(&self) -> &Arc<Processor> {
        &self.processor
    }

    /// Stop accepting, finish in-flight batches, and return.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await?
    }

    /// Run until `signal` completes, then stop gracefully.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        signal.await;
        tracing::info!("stopping: finishing in-flight batches");
        self.stop().await
    }
}
