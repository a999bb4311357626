//! Shard leases, kept in the deployment's DynamoDB table: one item per shard
//! of the events stream with its owner, an epoch (raised whenever the lease
//! changes hands: commits are fenced by it), a heartbeat counter (raised by
//! every renewal), the checkpoint and the parent shards.
//!
//! A lease is expired when its counter has not moved for the lease duration
//! as seen by the observer's own clock, so hosts need not agree on time.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use crate::aws::{PK, SK, Table, Usage, error_text as err, n, s};
use crate::store::dynamo::SHARD_END;

/// The partition key of a stream's leases.
pub fn lease_pk(stream: &str) -> String {
    format!("lease#{stream}")
}

/// One shard's lease as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub shard: String,
    pub owner: Option<String>,
    pub epoch: u64,
    pub counter: u64,
    /// `None`: nothing read yet (start at the shard's beginning).
    pub checkpoint: Option<String>,
    pub parents: Vec<String>,
}

impl Lease {
    pub fn finished(&self) -> bool {
        self.checkpoint.as_deref() == Some(SHARD_END)
    }
}

/// The lease items of one stream.
#[derive(Clone)]
pub struct Leases {
    table: Table,
    stream: String,
}

impl Leases {
    pub fn new(table: Table, stream: &str) -> Self {
        Leases {
            table,
            stream: stream.to_owned(),
        }
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    fn key(&self, shard: &str) -> HashMap<String, AttributeValue> {
        HashMap::from([
            (PK.to_owned(), s(lease_pk(&self.stream))),
            (SK.to_owned(), s(shard)),
        ])
    }

    /// Every lease of the stream, strongly consistent.
    pub async fn list(&self) -> Result<Vec<Lease>, String> {
        Usage::count(&self.table.usage.lease_requests);
        let items = self.table.query_partition(&lease_pk(&self.stream)).await?;
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

    /// Create a free lease for a newly seen shard; `false` if it exists.
    pub async fn create(&self, shard: &str, parents: &[String]) -> Result<bool, String> {
        Usage::count(&self.table.usage.lease_requests);
        let mut item = self.key(shard);
        item.insert("epoch".to_owned(), n(0));
        item.insert("counter".to_owned(), n(0));
        item.insert(
            "parents".to_owned(),
            AttributeValue::L(parents.iter().map(s).collect()),
        );
        let put = self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .send()
            .await;
        match put {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Take `lease` as read (free, expired, or stolen): succeeds only if
    /// nobody renewed or took it since. Returns the new epoch.
    pub async fn take(&self, lease: &Lease, me: &str) -> Result<Option<u64>, String> {
        Usage::count(&self.table.usage.lease_requests);
        let epoch = lease.epoch + 1;
        let update = self
            .table
            .client
            .update_item()
            .table_name(&self.table.name)
            .set_key(Some(self.key(&lease.shard)))
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

    /// Prove this host is alive; `false` if the lease is no longer ours.
    pub async fn renew(&self, shard: &str, me: &str, epoch: u64) -> Result<bool, String> {
        self.fenced_update(shard, me, epoch, "SET #counter = #counter + :one", None)
            .await
    }

    /// Give the lease up so another host takes it at once. Raises the epoch:
    /// nothing this host still has in flight can commit afterwards.
    pub async fn release(&self, shard: &str, me: &str, epoch: u64) -> Result<bool, String> {
        self.fenced_update(
            shard,
            me,
            epoch,
            "REMOVE #owner SET #epoch = :new, #counter = #counter + :one",
            Some(epoch + 1),
        )
        .await
    }

    /// Apply `update` (which may use `#owner`, `#epoch`, `#counter`, `:one`
    /// and, given `new_epoch`, `:new`) if `me` holds the lease at `epoch`;
    /// `false` if it does not.
    async fn fenced_update(
        &self,
        shard: &str,
        me: &str,
        epoch: u64,
        update: &str,
        new_epoch: Option<u64>,
    ) -> Result<bool, String> {
        Usage::count(&self.table.usage.lease_requests);
        let mut request = self
            .table
            .client
            .update_item()
            .table_name(&self.table.name)
            .set_key(Some(self.key(shard)))
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
        conditional(request.send().await.map(|_| ())).map(|r| r.is_some())
    }
}

/// `Ok(None)` when the call failed its condition.
fn conditional<T, E, R>(
    result: Result<T, aws_sdk_dynamodb::error::SdkError<E, R>>,
) -> Result<Option<T>, String>
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
        Err(e) => Err(err(e)),
    }
}

/// What the balancer decides in one round: leases to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub take: Vec<Lease>,
}

/// Decide which leases to take, given every lease, which owners are alive
/// (their leases' counters moved recently) and who `me` is. Leases whose
/// shard is finished, or whose parents are not, are not for the taking.
///
/// Free and expired leases are taken up to this host's fair share; when none
/// is left and some host holds at least two more than this one, one of its
/// leases is stolen, so that in the end max − min leases per host ≤ 1.
pub fn plan(leases: &[Lease], expired: &dyn Fn(&Lease) -> bool, me: &str) -> Plan {
    let finished: HashMap<&str, bool> = leases
        .iter()
        .map(|l| (l.shard.as_str(), l.finished()))
        .collect();
    let ready = |l: &&Lease| {
        !l.finished()
            && l.parents
                .iter()
                .all(|p| finished.get(p.as_str()).copied().unwrap_or(true))
    };
    let workable: Vec<&Lease> = leases.iter().filter(ready).collect();
    fn live_owner<'a>(l: &'a Lease, expired: &dyn Fn(&Lease) -> bool) -> Option<&'a str> {
        l.owner.as_deref().filter(|_| !expired(l))
    }
    let mut held: HashMap<&str, Vec<&Lease>> = HashMap::new();
    held.entry(me).or_default();
    for lease in &workable {
        if let Some(owner) = live_owner(lease, expired) {
            held.entry(owner).or_default().push(lease);
        }
    }
    let hosts = held.len();
    let target = workable.len().div_ceil(hosts);
    let mine = held[me].len();
    let mut take: Vec<Lease> = workable
        .iter()
        .filter(|l| live_owner(l, expired).is_none())
        .take(target.saturating_sub(mine))
        .map(|l| (*l).clone())
        .collect();
    if take.is_empty() {
        let richest = held
            .iter()
            .filter(|(owner, _)| **owner != me)
            .max_by_key(|(owner, leases)| (leases.len(), *owner));
        if let Some((_, leases)) = richest
            && leases.len() >= mine + 2
        {
            take.push((*leases.last().expect("at least two")).clone());
        }
    }
    Plan { take }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(shard: &str, owner: Option<&str>) -> Lease {
        Lease {
            shard: shard.to_owned(),
            owner: owner.map(str::to_owned),
            epoch: 1,
            counter: 1,
            checkpoint: None,
            parents: Vec::new(),
        }
    }

    fn never(_: &Lease) -> bool {
        false
    }

    #[test]
    fn a_lone_host_takes_every_free_lease() {
        let leases: Vec<Lease> = (0..4).map(|i| lease(&format!("s{i}"), None)).collect();
        assert_eq!(plan(&leases, &never, "a").take.len(), 4);
    }

    #[test]
    fn a_new_host_steals_one_at_a_time_until_balanced() {
        let mut leases: Vec<Lease> = (0..4).map(|i| lease(&format!("s{i}"), Some("a"))).collect();
        for round in 0..4 {
            let taken = plan(&leases, &never, "b").take;
            if round < 2 {
                assert_eq!(taken.len(), 1, "round {round}");
                let shard = &taken[0].shard;
                leases.iter_mut().find(|l| &l.shard == shard).unwrap().owner = Some("b".into());
            } else {
                assert!(taken.is_empty(), "balanced after two steals");
            }
        }
        let third = plan(&leases, &never, "c").take;
        assert_eq!(third.len(), 1);
    }

    #[test]
    fn expired_leases_are_shared_out() {
        let leases = vec![
            lease("s0", Some("dead")),
            lease("s1", Some("dead")),
            lease("s2", Some("b")),
            lease("s3", Some("a")),
        ];
        let expired = |l: &Lease| l.owner.as_deref() == Some("dead");
        let taken = plan(&leases, &expired, "a").take;
        assert_eq!(
            taken.len(),
            1,
            "a's share of 4 leases over 2 live hosts is 2"
        );
    }

    #[test]
    fn children_wait_for_their_parents() {
        let mut parent = lease("s0", Some("a"));
        let mut child = lease("s1", None);
        child.parents = vec!["s0".into()];
        assert!(
            plan(&[parent.clone(), child.clone()], &never, "b")
                .take
                .is_empty()
        );
        parent.checkpoint = Some(SHARD_END.into());
        let taken = plan(&[parent, child], &never, "b").take;
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].shard, "s1");
    }
}
