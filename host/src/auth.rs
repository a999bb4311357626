//! Who is asking. The operator's token (from the config or
//! `TOCSIN_OPERATOR_TOKEN`) may do everything; a tenant token, issued by
//! the operator, acts for one tenant. Tenant tokens are stored as their
//! SHA-256 only, so a copy of the registry gives nobody access; each has a
//! public id (part of the token) by which it is listed and revoked.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a tenant token starts with: easy to spot in logs and secret scanners.
pub const TOKEN_PREFIX: &str = "tocsin_";
/// Shortest operator token accepted: 128 bits of hex.
pub const MIN_OPERATOR_TOKEN: usize = 32;

/// The caller of a request, once its token is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator's token, or any caller of a host without one (which
    /// serves only on loopback).
    Operator,
    /// A tenant token.
    Tenant { tenant: String, token: String },
}

impl Caller {
    /// Who did it, as version records and token records name them.
    pub fn name(&self) -> String {
        match self {
            Caller::Operator => "operator".to_owned(),
            Caller::Tenant { token, .. } => format!("token:{token}"),
        }
    }

    /// Whether the caller may act for `tenant`.
    pub fn may_act_for(&self, tenant: &str) -> bool {
        match self {
            Caller::Operator => true,
            Caller::Tenant { tenant: own, .. } => own == tenant,
        }
    }
}

/// A tenant token as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub tenant: String,
    /// SHA-256 of the whole token, hex.
    pub sha256: String,
    pub created_at: String,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// A new token: its public id and the secret text, shown once.
pub fn new_token() -> (String, String) {
    let mut bytes = [0u8; 6 + 24];
    rand::rng().fill_bytes(&mut bytes);
    let id = hex::encode(&bytes[..6]);
    let token = format!("{TOKEN_PREFIX}{id}_{}", hex::encode(&bytes[6..]));
    (id, token)
}

/// The public id inside a tenant token, if it looks like one.
pub fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 12 && !secret.is_empty()).then_some(id)
}

pub fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Compare two secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    // Comparing digests: the time depends only on the digests, which tell
    // an attacker nothing about the secret.
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_carries_its_id_and_only_its_digest_is_kept() {
        let (id, token) = new_token();
        assert_eq!(token_id(&token), Some(id.as_str()));
        assert!(token.len() > 60, "{token}");
        assert_ne!(digest(&token), token);
        assert_eq!(token_id("tocsin_short_x"), None);
        assert_eq!(token_id("Bearer abc"), None);
        assert!(same_secret(&token, &token.clone()));
        assert!(!same_secret(&token, &format!("{token}x")));
    }
}
