//! Each tenant's quotas as the registry keeps them (`quota/{tenant}`, set
//! by the operator over the config's defaults), and the events-per-second
//! budget taken from them. What a quota is, is [`crate::quota`]'s.

use super::update::Update;
use super::{Registry, RegistryError, encode};
use crate::quota::{QuotaExceeded, Quotas};

fn quota_key(tenant: &str) -> String {
    format!("quota/{tenant}")
}

impl Registry {
    /// The quotas of a tenant the operator set none for.
    pub(crate) fn default_quotas(&self) -> &Quotas {
        &self.defaults
    }

    /// `tenant`'s quotas: the operator's for it, or the defaults.
    pub(crate) fn quotas(&self, tenant: &str) -> Quotas {
        self.view
            .read()
            .expect("view lock")
            .quotas
            .get(tenant)
            .map_or_else(|| self.defaults.clone(), |(q, _)| q.clone())
    }

    pub(crate) async fn set_quotas(
        &self,
        tenant: &str,
        quotas: Quotas,
    ) -> Result<Quotas, RegistryError> {
        quotas.validate().map_err(RegistryError::Invalid)?;
        let value = encode(&quotas);
        self.update(&quota_key(tenant), |_| Ok(Update::Put(value.clone(), ())))
            .await?;
        self.refresh().await?;
        Ok(quotas)
    }

    /// Take `events` from `tenant`'s events-per-second quota.
    pub(crate) fn admit_events(&self, tenant: &str, events: usize) -> Result<(), QuotaExceeded> {
        let per_second = self.quotas(tenant).events_per_second;
        self.rates.admit(tenant, events, per_second)
    }
}
