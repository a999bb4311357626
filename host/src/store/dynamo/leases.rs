//! Leases in the deployment's DynamoDB table (see [`crate::store::lease`]):
//! one item per partition, under the group's partition key, each change
//! conditional on the item as read.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use super::{DynamoStore, store_err};
use crate::aws::{PK, SK, Table, Usage, n, s};
use crate::store::lease::{Lease, LeaseTable};
use crate::store::{Result, StoreError};

/// The partition key of a stream's leases.
pub fn lease_pk(stream: &str) -> String {
    format!("lease#{stream}")
}

fn key(group: &str, name: &str) -> HashMap<String, AttributeValue> {
    HashMap::from([
        (PK.to_owned(), s(lease_pk(group))),
        (SK.to_owned(), s(name)),
    ])
}

#[async_trait::async_trait]
impl LeaseTable for DynamoStore {
    /// Strongly consistent.
    async fn list(&self, group: &str) -> Result<Vec<Lease>> {
        let table = self.table();
        Usage::count(&table.usage.lease_requests);
        let items = table
            .query_partition(&lease_pk(group))
            .await
            .map_err(StoreError::Unavailable)?;
        let mut leases = Vec::new();
        for item in items {
            let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
            let number = |name: &str| {
                item.get(name)
                    .and_then(|v| v.as_n().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            leases.push(Lease {
                shard: text(SK).unwrap_or_default(),
                owner: text("owner"),
                epoch: number("epoch"),
                counter: number("counter"),
                checkpoint: text("checkpoint"),
                parents: item
                    .get("parents")
                    .and_then(|v| v.as_l().ok())
                    .map(|l| l.iter().filter_map(|p| p.as_s().ok().cloned()).collect())
                    .unwrap_or_default(),
            });
        }
        Ok(leases)
    }

    async fn create(&self, group: &str, name: &str, parents: &[String]) -> Result<bool> {
        let table = self.table();
        Usage::count(&table.usage.lease_requests);
        let mut item = key(group, name);
        item.insert("epoch".to_owned(), n(0));
        item.insert("counter".to_owned(), n(0));
        item.insert(
            "parents".to_owned(),
            AttributeValue::L(parents.iter().map(s).collect()),
        );
        let put = table
            .client
            .put_item()
            .table_name(&table.name)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .send()
            .await;
        Ok(conditional(put)?.is_some())
    }

    async fn take(&self, group: &str, lease: &Lease, me: &str) -> Result<Option<u64>> {
        let table = self.table();
        Usage::count(&table.usage.lease_requests);
        let epoch = lease.epoch + 1;
        let update = table
            .client
            .update_item()
            .table_name(&table.name)
            .set_key(Some(key(group, &lease.shard)))
            .update_expression("SET #owner = :me, #epoch = :new, #counter = #counter + :one")
            .condition_expression("#epoch = :epoch AND #counter = :counter")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#epoch", "epoch")
            .expression_attribute_names("#counter", "counter")
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":new", n(epoch))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":epoch", n(lease.epoch))
            .expression_attribute_values(":counter", n(lease.counter))
            .send()
            .await;
        conditional(update.map(|_| epoch))
    }

    async fn renew(&self, group: &str, name: &str, me: &str, epoch: u64) -> Result<bool> {
        fenced_update(
            self.table(),
            group,
            name,
            me,
            epoch,
            "SET #counter = #counter + :one",
            None,
        )
        .await
    }

    async fn release(&self, group: &str, name: &str, me: &str, epoch: u64) -> Result<bool> {
        fenced_update(
            self.table(),
            group,
            name,
            me,
            epoch,
            "REMOVE #owner SET #epoch = :new, #counter = #counter + :one",
            Some(epoch + 1),
        )
        .await
    }
}

/// Apply `update` (which may use `#owner`, `#epoch`, `#counter`, `:one`
/// and, given `new_epoch`, `:new`) if `me` holds the lease at `epoch`;
/// `false` if it does not.
async fn fenced_update(
    table: &Table,
    group: &str,
    name: &str,
    me: &str,
    epoch: u64,
    update: &str,
    new_epoch: Option<u64>,
) -> Result<bool> {
    Usage::count(&table.usage.lease_requests);
    let mut request = table
        .client
        .update_item()
        .table_name(&table.name)
        .set_key(Some(key(group, name)))
        .update_expression(update)
        .condition_expression("#owner = :me AND #epoch = :epoch")
        .expression_attribute_names("#owner", "owner")
        .expression_attribute_names("#epoch", "epoch")
        .expression_attribute_names("#counter", "counter")
        .expression_attribute_values(":me", s(me))
        .expression_attribute_values(":one", n(1))
        .expression_attribute_values(":epoch", n(epoch));
    if let Some(new) = new_epoch {
        request = request.expression_attribute_values(":new", n(new));
    }
    Ok(conditional(request.send().await.map(|_| ()))?.is_some())
}

/// `Ok(None)` when the call failed its condition.
fn conditional<T, E, R>(
    result: std::result::Result<T, aws_sdk_dynamodb::error::SdkError<E, R>>,
) -> Result<Option<T>>
where
    E: std::error::Error + Send + Sync + 'static + aws_sdk_dynamodb::error::ProvideErrorMetadata,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e)
            if e.as_service_error()
                .and_then(|e| e.code())
                .is_some_and(|code| code == "ConditionalCheckFailedException") =>
        {
            Ok(None)
        }
        Err(e) => Err(store_err(e)),
    }
}
