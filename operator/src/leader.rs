//! Leader election with a `coordination.k8s.io/v1` Lease, so two replicas never both act.
//!
//! The holder renews the Lease every third of its duration; another replica takes it over
//! only once `renewTime + leaseDurationSeconds` has passed. Every write is guarded by the
//! Lease's `resourceVersion`, so of two replicas racing for it exactly one wins. A leader that
//! cannot renew before its Lease runs out stops (the process exits and restarts as a
//! follower) rather than risk acting beside a new leader.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, api::PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// A Lease this replica competes for.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        LeaseLock {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn secs(&self) -> i32 {
        i32::try_from(self.duration.as_secs())
            .unwrap_or(i32::MAX)
            .max(1)
    }

    /// Takes the Lease if it is free, expired or ours (renewing it); Ok(true) when this
    /// replica holds it afterwards.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool> {
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::api(format!("reading Lease {}", self.name), e))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.secs()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(Error::api(format!("creating Lease {}", self.name), e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(secs)) => {
                renewed
                    .0
                    .saturating_add(SignedDuration::from_secs(i64::from(secs)))
                    .unwrap_or(Timestamp::MAX)
                    <= now
            }
            _ => true,
        };
        if !(ours || holder.is_empty() || expired) {
            return Ok(false);
        }
        let mut next = spec.clone();
        if !ours {
            next.acquire_time = Some(MicroTime(now));
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        next.holder_identity = Some(self.identity.clone());
        next.renew_time = Some(MicroTime(now));
        next.lease_duration_seconds = Some(self.secs());
        lease.spec = Some(next);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !ours {
                    info!(lease = %self.name, previous = %holder, "acquired the leader lease");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(Error::api(format!("updating Lease {}", self.name), e)),
        }
    }

    /// Gives the Lease up (on shutdown) so a follower takes over at once.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::api(format!("reading Lease {}", self.name), e))?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(Error::api(format!("releasing Lease {}", self.name), e)),
        }
    }
}

/// Competes for the Lease until `shutdown` fires, publishing whether this replica leads.
/// Returns an error when leadership is lost (the caller stops acting).
pub async fn run(
    lock: LeaseLock,
    leading: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let period = (lock.duration / 3).max(Duration::from_millis(200));
    let mut last_renewed: Option<Timestamp> = None;
    loop {
        let now = Timestamp::now();
        match lock.try_acquire_or_renew(now).await {
            Ok(true) => {
                last_renewed = Some(now);
                leading.send_replace(true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    return Err(Error::LeadershipLost(lock.name.clone()));
                }
            }
            Err(e) => {
                warn!(error = %e, "leader lease round failed");
                if *leading.borrow()
                    && last_renewed.is_none_or(|t| {
                        t.saturating_add(
                            SignedDuration::try_from(lock.duration).unwrap_or(SignedDuration::MAX),
                        )
                        .unwrap_or(Timestamp::MAX)
                            <= Timestamp::now()
                    })
                {
                    return Err(Error::LeadershipLost(lock.name.clone()));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => {
                if *leading.borrow() {
                    let _ = lock.release().await;
                }
                leading.send_replace(false);
                return Ok(());
            }
        }
    }
}
