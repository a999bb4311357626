//! Quarantine as the registry sees it: an operator's resume is written as
//! a document (`resume/{tenant}/{rule}`) every host follows, and lifts the
//! rule's quarantine in this host's engine at once; a rule's view shows its
//! quarantine here. The engine is held weakly: it holds the registry's
//! catalogue, not the other way round.

use std::sync::{Arc, Weak};

use super::update::Update;
use super::{Registry, RegistryError, encode, validate_tenant};
use crate::engine::Engine;
use crate::engine::contain::Quarantine;
use crate::timestamp::now_rfc3339;

impl Registry {
    /// Lift quarantines in `engine` when a resume is written (here or on
    /// another host) and when a rule's served version changes.
    pub(crate) fn on_resume(&self, engine: Arc<Engine>) {
        let _ = self.engine.set(Arc::downgrade(&engine));
    }

    pub(super) fn lift_quarantine(&self, tenant: &str, rule: &str) -> bool {
        self.engine
            .get()
            .and_then(Weak::upgrade)
            .is_some_and(|engine| engine.resume(tenant, rule))
    }

    /// Lift `tenant`'s `rule` quarantine on every host: on this one at once,
    /// on the others when they next follow the registry. Whether this host
    /// had it quarantined.
    pub(crate) async fn resume(
        &self,
        tenant: &str,
        rule: &str,
        by: &str,
    ) -> Result<bool, RegistryError> {
        validate_tenant(tenant)?;
        let key = format!("resume/{tenant}/{rule}");
        let record = serde_json::json!({ "by": by, "at": now_rfc3339() });
        let value = encode(&record);
        self.update(&key, |_| Ok(Update::Put(value.clone(), ())))
            .await?;
        Ok(self.lift_quarantine(tenant, rule))
    }

    pub(super) fn quarantine_of(&self, tenant: &str, rule: &str) -> Option<Quarantine> {
        let engine = self.engine.get()?.upgrade()?;
        engine.quarantine(tenant, rule)
    }
}
