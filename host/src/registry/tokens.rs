//! Tenant tokens: issued by the operator for one tenant (`token/{id}`),
//! listed by id, revoked on every host within [`FOLLOW_EVERY`]; and who a
//! bearer token belongs to. The tokens themselves are [`crate::auth`]'s.

use serde::{Deserialize, Serialize};

use super::store::Expect;
use super::update::Update;
use super::{Missing, Registry, RegistryError, decode, encode};
use crate::auth::{self, Caller, TokenRecord};
use crate::timestamp::now_rfc3339;

/// A tenant token as listed: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenView {
    pub id: String,
    pub tenant: String,
    pub created_at: String,
    pub created_by: String,
    pub revoked_at: Option<String>,
}

impl From<&TokenRecord> for TokenView {
    fn from(t: &TokenRecord) -> Self {
        TokenView {
            id: t.id.clone(),
            tenant: t.tenant.clone(),
            created_at: t.created_at.clone(),
            created_by: t.created_by.clone(),
            revoked_at: t.revoked_at.clone(),
        }
    }
}

fn token_key(id: &str) -> String {
    format!("token/{id}")
}

impl Registry {
    /// Who a bearer token belongs to; `None`: nobody (unknown or revoked).
    pub(crate) fn authenticate(&self, token: &str) -> Option<Caller> {
        if let Some(operator) = &self.operator_token
            && auth::same_secret(token, operator)
        {
            return Some(Caller::Operator);
        }
        let id = auth::token_id(token)?;
        let view = self.view.read().expect("view lock");
        let record = view.tokens.get(id)?;
        (record.revoked_at.is_none() && auth::same_secret(&auth::digest(token), &record.sha256))
            .then(|| Caller::Tenant {
                tenant: record.tenant.clone(),
                token: record.id.clone(),
            })
    }

    /// A new token for `tenant`: its record, and the token, shown only now.
    pub(crate) async fn create_token(
        &self,
        tenant: &str,
        by: &Caller,
    ) -> Result<(TokenView, String), RegistryError> {
        let (id, token) = auth::new_token();
        let record = TokenRecord {
            id: id.clone(),
            tenant: tenant.to_owned(),
            sha256: auth::digest(&token),
            created_at: now_rfc3339(),
            created_by: by.name(),
            revoked_at: None,
        };
        self.store
            .write(&token_key(&id), Some(&encode(&record)), Expect::Absent)
            .await?;
        self.refresh().await?;
        Ok((TokenView::from(&record), token))
    }

    pub(crate) fn tokens(&self, tenant: &str) -> Vec<TokenView> {
        let view = self.view.read().expect("view lock");
        let mut tokens: Vec<TokenView> = view
            .tokens
            .values()
            .filter(|t| t.tenant == tenant)
            .map(TokenView::from)
            .collect();
        tokens.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        tokens
    }

    /// Revoke a token of `tenant`: it stops working on every host within
    /// [`FOLLOW_EVERY`], and stays listed as revoked.
    pub(crate) async fn revoke_token(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<TokenView, RegistryError> {
        let record = self
            .update(&token_key(id), |stored| {
                let Some(mut record) = stored
                    .map(|d| decode::<TokenRecord>(&d.value))
                    .transpose()?
                    .filter(|r| r.tenant == tenant)
                else {
                    return Err(RegistryError::NotFound(Missing::Token {
                        tenant: tenant.to_owned(),
                        id: id.to_owned(),
                    }));
                };
                if record.revoked_at.is_some() {
                    return Ok(Update::Keep((record, false)));
                }
                record.revoked_at = Some(now_rfc3339());
                Ok(Update::Put(encode(&record), (record, true)))
            })
            .await?;
        let (record, revoked) = record;
        if revoked {
            self.refresh().await?;
        }
        Ok(TokenView::from(&record))
    }
}
