//! Where committed alerts go, behind [`AlertSink`]. The engine publishes
//! only alerts already committed to the store's outbox, so a crash between
//! commit and publish republishes the same alerts (same ids), never new ones.

pub mod dead_letters;
pub mod file;
#[cfg(feature = "aws")]
pub mod kinesis;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use crate::alert::AlertRecord;
use crate::config::{AlertsBackend, DeadLettersBackend};
use dead_letters::{DeadLetterFile, DeadLetterSink};

/// A failure to deliver alerts; they stay in the outbox either way.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// The destination failed or could not be reached; trying again may work.
    #[error("alert sink unavailable: {0}")]
    Unavailable(String),
    /// The destination can never take what it was given (or what it holds
    /// cannot be read): trying again fails the same way.
    #[error("alert sink: {0}")]
    Invalid(String),
}

impl SinkError {
    /// Whether publishing the same alerts again may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }
}

/// A destination for alerts.
#[async_trait::async_trait]
pub trait AlertSink: Send + Sync {
    /// Deliver `alerts` (in commit order, each with its `seq`) durably. Must
    /// tolerate receiving again alerts it already delivered before a crash.
    async fn publish(&self, alerts: &[AlertRecord]) -> Result<(), SinkError>;
}

/// The alert sink `backend` names (a file in `data_dir`, or a stream).
pub async fn open_alerts(
    backend: &AlertsBackend,
    data_dir: &Path,
) -> Result<Arc<dyn AlertSink>, SinkError> {
    Ok(match backend {
        AlertsBackend::File => Arc::new(file::FileSink::open(&data_dir.join("alerts.ndjson"))?),
        #[cfg(feature = "aws")]
        AlertsBackend::Kinesis(stream) => {
            let aws = crate::aws::sdk_config().await;
            Arc::new(kinesis::KinesisSink::new(
                kinesis::SdkWriter(aws_sdk_kinesis::Client::new(&aws)),
                stream,
            ))
        }
        #[cfg(not(feature = "aws"))]
        AlertsBackend::Kinesis(_) => return Err(without_aws("alerts")),
    })
}

/// The dead-letter sink `backend` names (a file in `data_dir`, or a
/// stream).
pub async fn open_dead_letters(
    backend: &DeadLettersBackend,
    data_dir: &Path,
) -> Result<Arc<dyn DeadLetterSink>, SinkError> {
    Ok(match backend {
        DeadLettersBackend::File => {
            Arc::new(DeadLetterFile::open(&data_dir.join("dead-letters.ndjson"))?)
        }
        #[cfg(feature = "aws")]
        DeadLettersBackend::Kinesis(stream) => {
            let aws = crate::aws::sdk_config().await;
            Arc::new(kinesis::KinesisDeadLetters::new(
                kinesis::SdkWriter(aws_sdk_kinesis::Client::new(&aws)),
                stream,
            ))
        }
        #[cfg(not(feature = "aws"))]
        DeadLettersBackend::Kinesis(_) => return Err(without_aws("dead_letters")),
    })
}

#[cfg(not(feature = "aws"))]
fn without_aws(setting: &str) -> SinkError {
    SinkError::Invalid(format!(
        "{setting} `kinesis:…` needs the `aws` feature, which this tocsin was built without"
    ))
}
