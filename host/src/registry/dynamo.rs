//! The registry in the deployment's DynamoDB table, beside bucket state and
//! leases (told apart by partition key):
//!
//! - documents: `pk = registry`, `sk = doc#<key>`, with `value` and `rev`;
//! - the registry's revision: `pk = registry`, `sk = revision`;
//! - the change log: `pk = registry-changes`, `sk` = the revision, zero
//!   padded, naming the key it wrote (expiring after a week);
//! - components: `pk = component#<sha256>`, in chunks of at most
//!   [`CHUNK_BYTES`] (`sk = chunk#0000` …, an item holds at most 400 KB),
//!   then `sk = whole` written last with the chunk count and size, so a
//!   reader never sees half a component.
//!
//! A write is one `TransactWriteItems`: the revision raised on condition it
//! is still the one read, the document put or deleted on condition of its
//! own revision, and the change logged.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem, Update};
use sha2::Digest;

use super::store::{Doc, Expect, RegistryStore, Result, StoreError};
use crate::aws::{EXPIRES, PK, SK, Table, error_text, n, s};

/// Component bytes per item: DynamoDB items hold at most 400 KB.
pub const CHUNK_BYTES: usize = 350 * 1024;
const DOCS_PK: &str = "registry";
const CHANGES_PK: &str = "registry-changes";
const REVISION_SK: &str = "revision";
/// How long the change log keeps an entry; a host that follows the registry
/// reads it every half second.
const CHANGE_TTL_SECS: i64 = 7 * 24 * 3600;

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(format!("DynamoDB: {}", error_text(e)))
}

fn invalid(e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(format!("DynamoDB request: {e}"))
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Result<u64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| StoreError::Invalid(format!("registry item without a numeric `{name}`")))
}

fn bytes(item: &HashMap<String, AttributeValue>, name: &str) -> Result<Vec<u8>> {
    item.get(name)
        .and_then(|v| v.as_b().ok())
        .map(|b| b.as_ref().to_vec())
        .ok_or_else(|| StoreError::Invalid(format!("registry item without binary `{name}`")))
}

#[derive(Clone)]
pub struct DynamoRegistry {
    table: Table,
}

impl DynamoRegistry {
    pub fn new(table: Table) -> Self {
        DynamoRegistry { table }
    }

    async fn query(
        &self,
        pk: &str,
        condition: &str,
        values: &[(&str, AttributeValue)],
    ) -> Result<Vec<HashMap<String, AttributeValue>>> {
        let mut request = self
            .table
            .client
            .query()
            .table_name(&self.table.name)
            .key_condition_expression(format!("#pk = :pk AND {condition}"))
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#sk", SK)
            .expression_attribute_values(":pk", s(pk))
            .consistent_read(true);
        for (name, value) in values {
            request = request.expression_attribute_values(*name, value.clone());
        }
        let mut pages = request.into_paginator().items().send();
        let mut items = Vec::new();
        while let Some(item) = pages.next().await {
            items.push(item.map_err(unavailable)?);
        }
        Ok(items)
    }
}

fn doc_sk(key: &str) -> String {
    format!("doc#{key}")
}

#[async_trait::async_trait]
impl RegistryStore for DynamoRegistry {
    async fn get(&self, key: &str) -> Result<Option<Doc>> {
        let item = self
            .table
            .client
            .get_item()
            .table_name(&self.table.name)
            .key(PK, s(DOCS_PK))
            .key(SK, s(doc_sk(key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        item.item()
            .map(|item| {
                Ok(Doc {
                    value: bytes(item, "value")?,
                    revision: number(item, "rev")?,
                })
            })
            .transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Doc)>> {
        let items = self
            .query(
                DOCS_PK,
                "begins_with(#sk, :prefix)",
                &[(":prefix", s(doc_sk(prefix)))],
            )
            .await?;
        items
            .iter()
            .map(|item| {
                let sk = item.get(SK).and_then(|v| v.as_s().ok()).cloned();
                let key = sk
                    .and_then(|sk| sk.strip_prefix("doc#").map(str::to_owned))
                    .ok_or_else(|| StoreError::Invalid("registry item without a key".into()))?;
                Ok((
                    key,
                    Doc {
                        value: bytes(item, "value")?,
                        revision: number(item, "rev")?,
                    },
                ))
            })
            .collect()
    }

    async fn write(&self, key: &str, value: Option<&[u8]>, expect: Expect) -> Result<u64> {
        let current = self.revision().await?;
        let next = current + 1;
        let bump = Update::builder()
            .table_name(&self.table.name)
            .key(PK, s(DOCS_PK))
            .key(SK, s(REVISION_SK))
            .update_expression("SET rev = :next")
            .condition_expression("attribute_not_exists(rev) OR rev = :current")
            .expression_attribute_values(":next", n(next))
            .expression_attribute_values(":current", n(current))
            .build()
            .map_err(invalid)?;
        let (condition, at) = match expect {
            Expect::Absent => ("attribute_not_exists(rev)", None),
            Expect::At(at) => ("rev = :at", Some(n(at))),
        };
        let doc = match value {
            Some(value) => {
                let mut put = Put::builder()
                    .table_name(&self.table.name)
                    .item(PK, s(DOCS_PK))
                    .item(SK, s(doc_sk(key)))
                    .item("value", AttributeValue::B(Blob::new(value)))
                    .item("rev", n(next))
                    .condition_expression(condition);
                if let Some(at) = at {
                    put = put.expression_attribute_values(":at", at);
                }
                TransactWriteItem::builder()
                    .put(put.build().map_err(invalid)?)
                    .build()
            }
            None => {
                let mut delete = Delete::builder()
                    .table_name(&self.table.name)
                    .key(PK, s(DOCS_PK))
                    .key(SK, s(doc_sk(key)))
                    .condition_expression(condition);
                if let Some(at) = at {
                    delete = delete.expression_attribute_values(":at", at);
                }
                TransactWriteItem::builder()
                    .delete(delete.build().map_err(invalid)?)
                    .build()
            }
        };
        let expires = time::OffsetDateTime::now_utc().unix_timestamp() + CHANGE_TTL_SECS;
        let change = Put::builder()
            .table_name(&self.table.name)
            .item(PK, s(CHANGES_PK))
            .item(SK, s(format!("{next:020}")))
            .item("key", s(key))
            .item(EXPIRES, n(expires))
            .build()
            .map_err(invalid)?;
        let written = self
            .table
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(bump).build())
            .transact_items(doc)
            .transact_items(TransactWriteItem::builder().put(change).build())
            .send()
            .await;
        match written {
            Ok(_) => Ok(next),
            Err(error) => match error.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(_))
                | Some(TransactWriteItemsError::TransactionInProgressException(_)) => {
                    Err(StoreError::Conflict)
                }
                _ => Err(unavailable(error)),
            },
        }
    }

    async fn revision(&self) -> Result<u64> {
        let item = self
            .table
            .client
            .get_item()
            .table_name(&self.table.name)
            .key(PK, s(DOCS_PK))
            .key(SK, s(REVISION_SK))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        match item.item() {
            Some(item) => number(item, "rev"),
            None => Ok(0),
        }
    }

    async fn changes(&self, since: u64) -> Result<(u64, Vec<String>)> {
        let items = self
            .query(
                CHANGES_PK,
                "#sk > :since",
                &[(":since", s(format!("{since:020}")))],
            )
            .await?;
        let mut revision = since;
        let mut keys = Vec::new();
        for item in &items {
            let rev = item
                .get(SK)
                .and_then(|v| v.as_s().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| StoreError::Invalid("change log item without a revision".into()))?;
            revision = revision.max(rev);
            if let Some(key) = item.get("key").and_then(|v| v.as_s().ok()) {
                keys.push(key.clone());
            }
        }
        Ok((revision, keys))
    }

    async fn put_component(&self, hash: &str, bytes: &[u8]) -> Result<()> {
        let pk = format!("component#{hash}");
        let exists = self
            .table
            .client
            .get_item()
            .table_name(&self.table.name)
            .key(PK, s(&pk))
            .key(SK, s("whole"))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        if exists.item().is_some() {
            return Ok(());
        }
        let chunks: Vec<&[u8]> = bytes.chunks(CHUNK_BYTES).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            self.table
                .client
                .put_item()
                .table_name(&self.table.name)
                .item(PK, s(&pk))
                .item(SK, s(format!("chunk#{i:04}")))
                .item("data", AttributeValue::B(Blob::new(*chunk)))
                .send()
                .await
                .map_err(unavailable)?;
        }
        self.table
            .client
            .put_item()
            .table_name(&self.table.name)
            .item(PK, s(&pk))
            .item(SK, s("whole"))
            .item("chunks", n(chunks.len()))
            .item("size", n(bytes.len()))
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn component(&self, hash: &str) -> Result<Option<Vec<u8>>> {
        let items = self
            .table
            .query_partition(&format!("component#{hash}"))
            .await
            .map_err(|e| StoreError::Unavailable(format!("DynamoDB: {e}")))?;
        let Some(whole) = items
            .iter()
            .find(|i| i.get(SK).and_then(|v| v.as_s().ok()).map(String::as_str) == Some("whole"))
        else {
            return Ok(None);
        };
        let (chunks, size) = (number(whole, "chunks")?, number(whole, "size")?);
        let mut component = Vec::with_capacity(size as usize);
        // Sort keys order the chunks; `whole` sorts after them.
        for item in items.iter().take(chunks as usize) {
            component.extend_from_slice(&bytes(item, "data")?);
        }
        if component.len() as u64 != size || hex::encode(sha2::Sha256::digest(&component)) != hash {
            return Err(StoreError::Invalid(format!(
                "component {hash} is stored incomplete or altered"
            )));
        }
        Ok(Some(component))
    }
}
