//! Leader election with a `coordination.k8s.io/v1` Lease, so two replicas never both act.
//!
//! The scheme is client-go's:
//! - Each replica competes under its own identity: `$POD_NAME`, or else the host name and a
//!   suffix unique to the process ([`default_identity`]). Two replicas sharing one identity
//!   would both believe they hold the Lease.
//! - Expiry never compares another node's clock with ours. A replica remembers when it last
//!   *observed* the Lease record change (holder, renewTime, resourceVersion…), on its own
//!   monotonic clock, and takes the Lease over only once the record has stayed unchanged for
//!   the holder's `leaseDurationSeconds` on that clock — whatever the holder's `renewTime`
//!   says, so a holder whose clock runs ahead or behind cannot make the takeover early or
//!   block it forever. A Lease with no holder (released) is free at once.
//! - The leader renews every retry period. If no renewal has succeeded within the renew
//!   deadline (shorter than the lease duration), it stops leading
//!   ([`Error::LeadershipLost`]: the process exits and comes back as a follower). A follower
//!   waits at least the lease duration after the last renewal it saw, which happened after
//!   the leader started that renewal, so the two never act at the same time (as long as both
//!   clocks run at about the same rate; their readings do not matter).
//! - Every write replaces the Lease guarded by its `resourceVersion`, so of two replicas
//!   racing for it exactly one wins; writes carry the field manager [`MANAGER`].
//! - On shutdown the leader releases the Lease so that a follower takes over at once.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, api::PostParams};
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    http::Health,
    reconcile::MANAGER,
};

/// This process's identity when none is configured: `$POD_NAME` if set, else the host name,
/// `_`, and a suffix unique to this process ([`unique_identity`]). The same for the whole life
/// of the process.
pub fn default_identity() -> String {
    static IDENTITY: OnceLock<String> = OnceLock::new();
    IDENTITY
        .get_or_init(|| match std::env::var("POD_NAME") {
            Ok(pod) if !pod.trim().is_empty() => pod.trim().to_string(),
            _ => {
                let started = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                unique_identity(&host_name(), std::process::id(), started)
            }
        })
        .clone()
}

/// `<host>_<pid>-<start time in nanoseconds, hex>`: two processes differ in pid on one host,
/// and a pid reused later differs in start time.
pub fn unique_identity(host: &str, pid: u32, started_nanos: u128) -> String {
    format!("{host}_{pid}-{started_nanos:x}")
}

/// The kernel's host name (the pod name in a pod), or `$HOSTNAME`, or `fathom-operator`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| MANAGER.to_string())
}

/// How long a Lease lasts and how often it is renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// How long followers wait after they last saw the Lease change before taking it over
    /// (written as `leaseDurationSeconds`, rounded up to whole seconds).
    pub lease_duration: Duration,
    /// How long a leader goes on leading without a successful renewal; shorter than
    /// `lease_duration`.
    pub renew_deadline: Duration,
    /// The pause between two attempts to acquire or renew; shorter than `renew_deadline`.
    pub retry_period: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl Timings {
    /// Checks retry period < renew deadline < lease duration; the error names the values and
    /// their flags.
    pub fn validate(&self) -> Result<(), String> {
        if self.retry_period.is_zero() {
            return Err("the leader retry period (--retry-period-seconds) must not be 0".into());
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "the leader renew deadline ({:?}, --renew-deadline-seconds) must be shorter than \
                 the lease duration ({:?}, --lease-seconds), or a follower could take over while \
                 the leader still acts",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(format!(
                "the leader retry period ({:?}, --retry-period-seconds) must be shorter than the \
                 renew deadline ({:?}, --renew-deadline-seconds)",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }

    /// `leaseDurationSeconds`: the lease duration rounded up to whole seconds, at least 1.
    fn lease_seconds(&self) -> i32 {
        let secs = self
            .lease_duration
            .as_secs()
            .saturating_add(u64::from(self.lease_duration.subsec_nanos() > 0));
        i32::try_from(secs).unwrap_or(i32::MAX).max(1)
    }
}

/// The Lease record as last seen, and when (local monotonic clock) it was first seen so.
#[derive(Debug)]
struct Observation {
    resource_version: Option<String>,
    spec: Option<LeaseSpec>,
    at: Instant,
}

/// A Lease this replica competes for.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    observed: Arc<Mutex<Option<Observation>>>,
    health: Option<Arc<Health>>,
}

impl LeaseLock {
    /// Competes for Lease `name` through `api` as `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timings: Timings) -> Self {
        LeaseLock {
            api,
            name: name.into(),
            identity: identity.into(),
            timings,
            observed: Arc::new(Mutex::new(None)),
            health: None,
        }
    }

    /// Reports to `health` whether the API server answers the lease rounds (`/readyz`).
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// This replica's identity in the Lease.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The Lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long the Lease lasts and how often it is renewed.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    fn params() -> PostParams {
        PostParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        }
    }

    /// Notes the record as seen now; returns when (local monotonic clock) this replica first
    /// saw it as it is.
    fn observe(&self, lease: &Lease) -> Instant {
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let resource_version = lease.metadata.resource_version.clone();
        match observed.as_ref() {
            Some(o) if o.resource_version == resource_version && o.spec == lease.spec => o.at,
            _ => {
                let at = Instant::now();
                *observed = Some(Observation {
                    resource_version,
                    spec: lease.spec.clone(),
                    at,
                });
                at
            }
        }
    }

    /// Takes the Lease if it is free, expired or ours (renewing it); Ok(true) when this
    /// replica holds it afterwards. `now` is the wall time written into the record
    /// (`acquireTime`, `renewTime`), for people reading it; expiry is judged only by the local
    /// monotonic clock (see the module documentation).
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
                    lease_duration_seconds: Some(self.timings.lease_seconds()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&Self::params(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    info!(lease = %self.name, identity = %self.identity, "created and acquired the leader lease");
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(Error::api(format!("creating Lease {}", self.name), e)),
            };
        };
        let seen_at = self.observe(&lease);
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        let valid_for = spec
            .lease_duration_seconds
            .map_or(self.timings.lease_duration, |s| {
                Duration::from_secs(u64::try_from(s).unwrap_or(0))
            });
        let expired = Instant::now() >= seen_at + valid_for;
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
        next.lease_duration_seconds = Some(self.timings.lease_seconds());
        lease.spec = Some(next);
        match self.api.replace(&self.name, &Self::params(), &lease).await {
            Ok(updated) => {
                self.observe(&updated);
                if !ours {
                    info!(lease = %self.name, previous = %holder, identity = %self.identity, "acquired the leader lease");
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
        match self.api.replace(&self.name, &Self::params(), &lease).await {
            // Someone else changed it meanwhile: it is not ours to release any more.
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(Error::api(format!("releasing Lease {}", self.name), e)),
        }
    }
}

/// Competes for the Lease until `shutdown` fires, publishing whether this replica leads.
/// Returns [`Error::LeadershipLost`] when leadership is lost — another replica took the Lease,
/// or no renewal succeeded within the renew deadline — and the caller stops acting.
pub async fn run(
    lock: LeaseLock,
    leading: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let t = lock.timings;
    // When the last successful renewal started, on the local monotonic clock.
    let mut renewed: Option<Instant> = None;
    // When the API server last answered a round (acquired, renewed or held by another).
    let mut answered: Option<Instant> = None;
    loop {
        let leader = *leading.borrow();
        let deadline = renewed.filter(|_| leader).map(|at| at + t.renew_deadline);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            warn!(lease = %lock.name, renew_deadline = ?t.renew_deadline, "no renewal of the leader lease succeeded within the renew deadline: stepping down");
            leading.send_replace(false);
            return Err(Error::LeadershipLost(lock.name.clone()));
        }
        let started = Instant::now();
        // A hanging request must not keep a leader leading past its deadline.
        let limit = deadline.map_or(t.renew_deadline, |d| d.saturating_duration_since(started));
        let round = tokio::time::timeout(limit, lock.try_acquire_or_renew(Timestamp::now())).await;
        if matches!(round, Ok(Ok(_))) {
            answered = Some(started);
        }
        if let Some(health) = &lock.health {
            health.set_api_answers(answered.is_some_and(|at| at.elapsed() < t.renew_deadline));
        }
        match round {
            Ok(Ok(true)) => {
                renewed = Some(started);
                if !leader {
                    leading.send_replace(true);
                }
            }
            Ok(Ok(false)) if leader => {
                warn!(lease = %lock.name, "another replica holds the leader lease: stepping down");
                leading.send_replace(false);
                return Err(Error::LeadershipLost(lock.name.clone()));
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(lease = %lock.name, error = %e, "leader lease round failed"),
            Err(_) => {
                warn!(lease = %lock.name, timeout = ?limit, "leader lease round timed out");
            }
        }
        // A leader wakes up by its deadline at the latest, to step down in time.
        let pause = match renewed.filter(|_| *leading.borrow()) {
            Some(at) => t
                .retry_period
                .min((at + t.renew_deadline).saturating_duration_since(Instant::now())),
            None => t.retry_period,
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {
                let was_leading = *leading.borrow();
                if was_leading && let Err(e) = lock.release().await {
                    warn!(lease = %lock.name, error = %e, "could not release the leader lease on shutdown");
                }
                leading.send_replace(false);
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_differ_by_process_and_start_time() {
        let a = unique_identity("node-1", 42, 1_000);
        assert_eq!(a, "node-1_42-3e8");
        assert_ne!(a, unique_identity("node-1", 43, 1_000));
        assert_ne!(a, unique_identity("node-1", 42, 1_001));
        assert_ne!(a, unique_identity("node-2", 42, 1_000));
    }

    #[test]
    fn the_default_identity_is_stable_in_a_process_and_not_a_constant() {
        let id = default_identity();
        assert_eq!(id, default_identity());
        assert_ne!(id, MANAGER);
        match std::env::var("POD_NAME") {
            Ok(pod) if !pod.trim().is_empty() => assert_eq!(id, pod.trim()),
            _ => {
                let pid = format!("_{}-", std::process::id());
                assert!(id.starts_with(&host_name()), "{id}");
                assert!(id.contains(&pid), "{id} lacks {pid}");
            }
        }
    }

    #[test]
    fn timings_keep_retry_below_renew_below_lease() {
        assert_eq!(Timings::default().validate(), Ok(()));
        let s = Duration::from_secs;
        let bad = Timings {
            lease_duration: s(10),
            renew_deadline: s(10),
            retry_period: s(2),
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("--renew-deadline-seconds")
        );
        let bad = Timings {
            lease_duration: s(15),
            renew_deadline: s(10),
            retry_period: s(10),
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("--retry-period-seconds")
        );
        assert_eq!(Timings::default().lease_seconds(), 15);
        let fractional = Timings {
            lease_duration: Duration::from_millis(1500),
            ..Timings::default()
        };
        assert_eq!(fractional.lease_seconds(), 2);
    }
}
