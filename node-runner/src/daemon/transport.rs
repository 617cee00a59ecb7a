//! Reports to the collector: one `Collector.Report` stream, kept open, reopened after any
//! failure.
//!
//! - Reconnects wait a jittered exponential backoff: ~1 s, ×1.6 each failure, ±20 %, at most
//!   30 s, and never less than a second after the previous attempt (RELIABILITY T4). A
//!   connection that got an acknowledgement resets it.
//! - HTTP/2 keepalive pings every 10 s with a 10 s timeout, so a half-open connection is
//!   noticed within 20 s (T5): hyper's keepalive is off unless asked for.
//! - Reports are cumulative, so the [`Outbox`] keeps the latest one per assignment and run:
//!   a queued report is replaced by a newer one of the same assignment, and after a reconnect
//!   the latest report of every assignment is sent again (the collector discards what it
//!   already has by `seq`). The queue is bounded; what falls off is counted.
//! - The stream carries the projected ServiceAccount token as `authorization: Bearer`, read
//!   again at each connect (the kubelet rotates it); TLS with the given CA, plaintext only
//!   with an explicit development flag.

use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fathom_proto::{
    MAX_EVENTS_PER_REPORT, MAX_MESSAGE_BYTES,
    v1::{NodeReport, ReportAck, collector_client::CollectorClient},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

/// Why the transport cannot even start; connection failures are retried, not returned.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("--collector {url:?}: {message}")]
    BadEndpoint { url: String, message: String },
    #[error(
        "--collector {0:?} is plaintext: use an https:// URL with --ca-file, or --insecure-plaintext for development"
    )]
    PlaintextRefused(String),
    #[error("--collector {0:?}: https needs --ca-file (the collector's CA bundle, PEM)")]
    MissingCa(String),
    #[error("reading {path}: {message}")]
    File { path: String, message: String },
}

impl TransportError {
    pub fn category(&self) -> &'static str {
        "InvalidArgument"
    }
}

/// The reconnect schedule.
#[derive(Clone, Debug)]
pub struct BackoffPolicy {
    /// The first delay.
    pub start: Duration,
    /// Growth per failed attempt.
    pub factor: f64,
    /// ± share of each delay drawn at random, so that runners do not retry in step.
    pub jitter: f64,
    /// The largest delay.
    pub cap: Duration,
    /// The smallest time between two attempts, whatever happened in between.
    pub floor: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            start: Duration::from_secs(1),
            factor: 1.6,
            jitter: 0.2,
            cap: Duration::from_secs(30),
            floor: Duration::from_secs(1),
        }
    }
}

/// SplitMix64: a small seeded generator, enough for jitter (not for secrets).
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The delays between reconnect attempts.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    base: Duration,
    rng: SplitMix64,
}

impl Backoff {
    /// A schedule drawing its jitter from `seed` (the same seed gives the same delays).
    pub fn new(policy: BackoffPolicy, seed: u64) -> Backoff {
        Backoff {
            base: policy.start,
            policy,
            rng: SplitMix64(seed),
        }
    }

    /// The next delay: the current base ± jitter, within [floor, cap]; the base then grows.
    pub fn next_delay(&mut self) -> Duration {
        let p = &self.policy;
        let spread = (self.rng.unit() * 2.0 - 1.0) * p.jitter;
        let delay = self.base.mul_f64(1.0 + spread).clamp(p.floor, p.cap);
        self.base = self.base.mul_f64(p.factor).min(p.cap);
        delay
    }

    /// Back to the first delay (after a connection that worked).
    pub fn reset(&mut self) {
        self.base = self.policy.start;
    }
}

/// The bounded queue of reports to send (the spool while the collector is unreachable or not
/// reading), and the latest report of each assignment for resend.
///
/// Reports are cumulative, so a queued report is replaced by a newer one of the same
/// assignment; their event batches (not cumulative) are joined while they fit in one report
/// ([`MAX_EVENTS_PER_REPORT`]), else the newer report queues behind. Bounds: at most
/// `capacity` reports and `spool_events` events queued; what falls off is counted, events per
/// assignment and run, and every report sent carries its assignment's count in
/// `counters.transport_dropped` (added to what the runner counted itself).
#[derive(Debug)]
pub struct Outbox {
    /// Latest report per (assignment uid, run), without its events (they are sent once); a
    /// run's final report stays until acknowledged.
    latest: BTreeMap<(String, u64), NodeReport>,
    queue: VecDeque<NodeReport>,
    capacity: usize,
    spool_events: usize,
    queued_events: usize,
    /// Reports that fell off the full queue.
    dropped: u64,
    /// Events dropped per (assignment uid, run): the spool was full, or they were in flight
    /// on a stream that broke before its acknowledgement.
    events_dropped: BTreeMap<(String, u64), u64>,
    events_dropped_total: u64,
    /// Sent, not yet acknowledged: (assignment uid, run, seq, events).
    in_flight: Vec<(String, u64, u64, usize)>,
    queued_events_high: usize,
}

/// Events a report carries.
fn events_in(r: &NodeReport) -> usize {
    r.event_batch.as_ref().map_or(0, |b| b.len())
}

impl Outbox {
    /// A queue of at most `capacity` reports and `spool_events` events.
    pub fn new(capacity: usize, spool_events: usize) -> Outbox {
        Outbox {
            latest: BTreeMap::new(),
            queue: VecDeque::new(),
            capacity: capacity.max(1),
            spool_events,
            queued_events: 0,
            dropped: 0,
            events_dropped: BTreeMap::new(),
            events_dropped_total: 0,
            in_flight: Vec::new(),
            queued_events_high: 0,
        }
    }

    /// Queues a report: it replaces the last queued one of the same assignment and run
    /// (reports are cumulative) when their events fit together, else goes to the back; when
    /// the queue is full the oldest is dropped and counted (its assignment's latest report is
    /// still resent after a reconnect, its events are counted as dropped).
    pub fn push(&mut self, mut report: NodeReport) {
        let key = (report.assignment_uid.clone(), report.run);
        // An older run's reports are superseded, except a final one not yet acknowledged.
        self.latest
            .retain(|(uid, run), r| uid != &key.0 || *run >= key.1 || r.r#final);
        let mut kept = report.clone();
        kept.event_batch = None;
        self.latest.insert(key.clone(), kept);
        let incoming = events_in(&report);
        if let Some(queued) = self
            .queue
            .iter_mut()
            .rev()
            .find(|q| q.assignment_uid == key.0 && q.run == key.1)
            && !queued.r#final
            && events_in(queued) + incoming <= MAX_EVENTS_PER_REPORT
        {
            let mut events = queued.event_batch.take().unwrap_or_default();
            if let Some(newer) = &report.event_batch {
                events.append(newer);
            }
            report.event_batch = (!events.is_empty()).then_some(events);
            *queued = report;
            self.queued_events += incoming;
        } else {
            if self.queue.len() >= self.capacity
                && let Some(old) = self.queue.pop_front()
            {
                self.dropped += 1;
                self.queued_events -= events_in(&old);
                self.count_dropped(&old.assignment_uid, old.run, events_in(&old));
            }
            self.queued_events += incoming;
            self.queue.push_back(report);
        }
        self.enforce_spool();
        self.queued_events_high = self.queued_events_high.max(self.queued_events);
    }

    /// Drops the oldest queued events until at most `spool_events` remain.
    fn enforce_spool(&mut self) {
        let mut i = 0;
        while self.queued_events > self.spool_events && i < self.queue.len() {
            let over = self.queued_events - self.spool_events;
            let r = &mut self.queue[i];
            let n = over.min(events_in(r));
            if let Some(batch) = r.event_batch.as_mut().filter(|_| n > 0) {
                batch.drop_front(n);
                let (uid, run) = (r.assignment_uid.clone(), r.run);
                self.queued_events -= n;
                self.count_dropped(&uid, run, n);
            }
            i += 1;
        }
    }

    fn count_dropped(&mut self, uid: &str, run: u64, n: usize) {
        if n == 0 {
            return;
        }
        *self
            .events_dropped
            .entry((uid.to_string(), run))
            .or_default() += n as u64;
        self.events_dropped_total += n as u64;
    }

    /// The next report to send, its `counters.transport_dropped` counting what this outbox
    /// dropped of its assignment and run so far.
    pub fn pop(&mut self) -> Option<NodeReport> {
        let mut r = self.queue.pop_front()?;
        self.queued_events -= events_in(&r);
        let dropped = self
            .events_dropped
            .get(&(r.assignment_uid.clone(), r.run))
            .copied()
            .unwrap_or(0);
        if dropped > 0 {
            let counters = r.counters.get_or_insert_with(Default::default);
            counters.transport_dropped += dropped;
        }
        if events_in(&r) > 0 {
            self.in_flight
                .push((r.assignment_uid.clone(), r.run, r.seq, events_in(&r)));
        }
        Some(r)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// After a reconnect: events sent on the broken stream and not acknowledged are counted as
    /// dropped (they may have arrived: an upper bound); the queue keeps what was not sent yet
    /// and gets the latest report of every other assignment (and every unacknowledged final
    /// one), without events, in order of seq.
    pub fn reconnected(&mut self) {
        for (uid, run, _, n) in std::mem::take(&mut self.in_flight) {
            self.count_dropped(&uid, run, n);
        }
        let queued: std::collections::BTreeSet<(String, u64, u64)> = self
            .queue
            .iter()
            .map(|r| (r.assignment_uid.clone(), r.run, r.seq))
            .collect();
        let mut all: Vec<NodeReport> = self.queue.drain(..).collect();
        all.extend(
            self.latest
                .values()
                .filter(|r| !queued.contains(&(r.assignment_uid.clone(), r.run, r.seq)))
                .cloned(),
        );
        all.sort_by_key(|r| r.seq);
        let overflow = all.len().saturating_sub(self.capacity);
        for old in all.drain(..overflow) {
            self.dropped += 1;
            self.queued_events -= events_in(&old);
            self.count_dropped(&old.assignment_uid, old.run, events_in(&old));
        }
        self.queue = all.into();
    }

    /// Forgets final reports the collector has acknowledged, and the events it has.
    pub fn acknowledged(&mut self, ack: &ReportAck) {
        self.latest.retain(|(uid, _), r| {
            !(uid == &ack.assignment_uid && r.r#final && r.seq <= ack.acknowledged_seq)
        });
        self.in_flight.retain(|(uid, _, seq, _)| {
            !(uid == &ack.assignment_uid && *seq <= ack.acknowledged_seq)
        });
    }

    /// Reports that fell off the full queue.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Events dropped in all (spool full, or unacknowledged on a broken stream).
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped_total
    }

    /// Events queued now, and the most ever queued.
    pub fn queued_events(&self) -> (usize, usize) {
        (self.queued_events, self.queued_events_high)
    }

    /// Assignments (and runs) whose latest report is kept for resending.
    pub fn kept(&self) -> usize {
        self.latest.len()
    }
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// The collector's URL, `https://…` (or `http://…` with `insecure_plaintext`).
    pub url: String,
    /// The projected ServiceAccount token, sent as `authorization: Bearer`.
    pub token_file: Option<PathBuf>,
    /// The CA bundle (PEM) that signed the collector's certificate.
    pub ca_file: Option<PathBuf>,
    /// Allow `http://` (development only).
    pub insecure_plaintext: bool,
    pub backoff: BackoffPolicy,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub connect_timeout: Duration,
    /// Reports queued at most.
    pub buffer: usize,
    /// Events queued at most (the spool of event batches while the collector is unreachable
    /// or not reading); more are dropped, oldest first, and counted.
    pub spool_events: usize,
    /// Where each attempt connects instead of resolving the URL's host (e.g. the collector
    /// Service's ready endpoints, in turn); TLS still checks the URL's host name.
    pub dial: Option<Dial>,
}

/// Picks the address of the next connection attempt; `None`: resolve the URL's host.
#[derive(Clone)]
pub struct Dial(pub Arc<dyn Fn() -> Option<std::net::SocketAddr> + Send + Sync>);

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dial(..)")
    }
}

impl TransportConfig {
    pub fn new(url: impl Into<String>) -> TransportConfig {
        TransportConfig {
            url: url.into(),
            token_file: None,
            ca_file: None,
            insecure_plaintext: false,
            backoff: BackoffPolicy::default(),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            buffer: 4096,
            spool_events: 100_000,
            dial: None,
        }
    }

    /// The endpoint with keepalive and TLS set; checks the URL and the files.
    pub fn endpoint(&self) -> Result<Endpoint, TransportError> {
        let bad = |message: String| TransportError::BadEndpoint {
            url: self.url.clone(),
            message,
        };
        let endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|e| bad(e.to_string()))?
            .http2_keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout)
            .keep_alive_while_idle(true)
            .connect_timeout(self.connect_timeout);
        if self.url.starts_with("http://") {
            if !self.insecure_plaintext {
                return Err(TransportError::PlaintextRefused(self.url.clone()));
            }
            return Ok(endpoint);
        }
        if !self.url.starts_with("https://") {
            return Err(bad("the URL must start with https:// (or http://)".into()));
        }
        let ca_file = self
            .ca_file
            .as_ref()
            .ok_or_else(|| TransportError::MissingCa(self.url.clone()))?;
        let pem = std::fs::read(ca_file).map_err(|e| TransportError::File {
            path: ca_file.display().to_string(),
            message: e.to_string(),
        })?;
        endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| bad(e.to_string()))
    }

    /// The bearer token, read now; `None` without a token file.
    fn token(&self) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>, TransportError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let file_err = |message: String| TransportError::File {
            path: path.display().to_string(),
            message,
        };
        let token = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map(Some)
            .map_err(|_| file_err("the token is not a valid header value".into()))
    }
}

/// Reports handed to the stream but not yet written to it: small, so that what waits while the
/// collector does not read stays in the bounded [`Outbox`].
const STREAM_QUEUE: usize = 4;

/// What the transport did, for `/metrics` and `/readyz`.
#[derive(Debug, Default)]
pub struct TransportStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub sent: AtomicU64,
    pub acknowledged: AtomicU64,
    pub rejected: AtomicU64,
    pub dropped: AtomicU64,
    /// Events dropped by the transport (spool full, or in flight on a broken stream).
    pub events_dropped: AtomicU64,
    /// Reports queued now.
    pub queued: AtomicU64,
    /// Events queued now, and the most ever queued.
    pub queued_events: AtomicU64,
    pub queued_events_high: AtomicU64,
}

impl TransportStats {
    fn observe(&self, outbox: &Outbox) {
        let (now, high) = outbox.queued_events();
        self.dropped.store(outbox.dropped(), Ordering::Relaxed);
        self.events_dropped
            .store(outbox.events_dropped(), Ordering::Relaxed);
        self.queued.store(outbox.len() as u64, Ordering::Relaxed);
        self.queued_events.store(now as u64, Ordering::Relaxed);
        self.queued_events_high
            .store(high as u64, Ordering::Relaxed);
    }
}

/// Sends what arrives on `reports` until `shutdown` turns true or `reports` closes (after the
/// queue is handed to the stream). Acknowledgements go to `acks` when given (dropped when it
/// is full). Returns an error only for a configuration that can never work.
pub async fn run(
    config: TransportConfig,
    mut reports: mpsc::Receiver<NodeReport>,
    acks: Option<mpsc::Sender<ReportAck>>,
    stats: Arc<TransportStats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), TransportError> {
    let endpoint = config.endpoint()?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id());
    let mut backoff = Backoff::new(config.backoff.clone(), seed);
    let mut outbox = Outbox::new(config.buffer, config.spool_events);
    let mut reports_open = true;
    let mut last_attempt: Option<Instant> = None;
    loop {
        if let Some(last) = last_attempt {
            let delay = backoff.next_delay().max(config.backoff.floor);
            let until = tokio::time::Instant::from_std(last + delay);
            // Keep taking reports while waiting, so the runner never blocks on us.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = shutdown.changed() => return Ok(()),
                    r = reports.recv(), if reports_open => match r {
                        Some(r) => outbox.push(r),
                        None => reports_open = false,
                    },
                }
                stats.observe(&outbox);
            }
        }
        if *shutdown.borrow() || (!reports_open && outbox.kept() == 0) {
            return Ok(());
        }
        last_attempt = Some(Instant::now());
        stats.connects.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            config: &config,
            endpoint: &endpoint,
            outbox: &mut outbox,
            reports: &mut reports,
            reports_open: &mut reports_open,
            acks: acks.as_ref(),
            stats: &stats,
            shutdown: &mut shutdown,
        };
        match session.run().await {
            Ended::Shutdown => return Ok(()),
            Ended::Failed {
                acknowledged,
                error,
            } => {
                stats.connected.store(false, Ordering::Relaxed);
                if acknowledged {
                    backoff.reset();
                } else {
                    stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(%error, acknowledged, "collector stream ended; reconnecting");
            }
        }
        stats.observe(&outbox);
    }
}

enum Ended {
    Shutdown,
    /// The stream failed; `acknowledged`: it worked for a while (got an acknowledgement).
    Failed {
        acknowledged: bool,
        error: String,
    },
}

/// The connector of one attempt: it opens one TCP connection and refuses any other, so that
/// tonic's channel, which reconnects on its own when its connection breaks, never opens a
/// second connection behind the backoff (T4: not more than one attempt a second). TLS, when
/// configured, is layered on it by the endpoint.
#[derive(Clone, Debug, Default)]
struct OneConnection(Arc<AtomicBool>, Option<Dial>);

impl tonic::codegen::Service<tonic::codegen::http::Uri> for OneConnection {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let first = !self.0.swap(true, Ordering::SeqCst);
        let dialed = self.1.as_ref().and_then(|d| (d.0)());
        Box::pin(async move {
            if !first {
                return Err(std::io::Error::other(
                    "one connection per attempt: the transport reconnects after its backoff",
                ));
            }
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other("the collector URL has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("http") => 80,
                _ => 443,
            });
            let stream = match dialed {
                Some(addr) => tokio::net::TcpStream::connect(addr).await?,
                None => tokio::net::TcpStream::connect((host.as_str(), port)).await?,
            };
            stream.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// One connection and stream.
struct Session<'a> {
    config: &'a TransportConfig,
    endpoint: &'a Endpoint,
    outbox: &'a mut Outbox,
    reports: &'a mut mpsc::Receiver<NodeReport>,
    reports_open: &'a mut bool,
    acks: Option<&'a mpsc::Sender<ReportAck>>,
    stats: &'a TransportStats,
    shutdown: &'a mut watch::Receiver<bool>,
}

impl Session<'_> {
    async fn run(self) -> Ended {
        let failed = |error: String| Ended::Failed {
            acknowledged: false,
            error,
        };
        let token = match self.config.token() {
            Ok(t) => t,
            Err(e) => return failed(e.to_string()),
        };
        // Reports keep arriving while connecting: the runner never blocks on us.
        let endpoint = self.endpoint;
        let connect = endpoint
            .connect_with_connector(OneConnection(Arc::default(), self.config.dial.clone()));
        tokio::pin!(connect);
        let channel: Channel = loop {
            tokio::select! {
                c = &mut connect => match c {
                    Ok(c) => break c,
                    Err(e) => return failed(format!("connecting: {e}")),
                },
                _ = self.shutdown.changed() => return Ended::Shutdown,
                r = self.reports.recv(), if *self.reports_open => match r {
                    Some(r) => self.outbox.push(r),
                    None => *self.reports_open = false,
                },
            }
        };
        let mut client = CollectorClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<NodeReport>(STREAM_QUEUE);
        self.outbox.reconnected();
        while let Ok(permit) = tx.try_reserve() {
            let Some(r) = self.outbox.pop() else { break };
            permit.send(r);
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", token);
        }
        let response = tokio::select! {
            r = client.report(request) => r,
            _ = self.shutdown.changed() => return Ended::Shutdown,
        };
        let mut inbound = match response {
            Ok(r) => r.into_inner(),
            Err(status) => return failed(format!("opening the stream: {status}")),
        };
        self.stats.connected.store(true, Ordering::Relaxed);
        let mut acknowledged = false;
        loop {
            tokio::select! {
                _ = self.shutdown.changed() => return Ended::Shutdown,
                msg = inbound.message() => match msg {
                    Ok(Some(ack)) => {
                        acknowledged = true;
                        self.outbox.acknowledged(&ack);
                        if ack.rejection.is_some() {
                            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(acks) = self.acks {
                            let _ = acks.try_send(ack);
                        }
                    }
                    Ok(None) => return Ended::Failed {
                        acknowledged,
                        error: "the collector closed the stream".into(),
                    },
                    Err(status) => return Ended::Failed {
                        acknowledged,
                        error: status.to_string(),
                    },
                },
                r = self.reports.recv(), if *self.reports_open => match r {
                    Some(r) => self.outbox.push(r),
                    None => *self.reports_open = false,
                },
                permit = tx.reserve(), if !self.outbox.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(r) = self.outbox.pop() {
                            permit.send(r);
                            self.stats.sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => return Ended::Failed {
                        acknowledged,
                        error: "the request stream closed".into(),
                    },
                },
            }
            self.stats.observe(self.outbox);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{pin::Pin, sync::Mutex};

    use fathom_crds::result::EventRecord;
    use fathom_proto::v1::collector_server::{Collector, CollectorServer};
    use tokio_stream::Stream;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    #[test]
    fn backoff_grows_1_6x_from_1s_with_20_percent_jitter_capped_at_30s() {
        let policy = BackoffPolicy::default();
        for seed in 0..50u64 {
            let mut b = Backoff::new(policy.clone(), seed);
            let mut base = 1.0f64;
            for _ in 0..20 {
                let d = b.next_delay().as_secs_f64();
                let low = (base * 0.8).max(1.0);
                let high = (base * 1.2).min(30.0);
                assert!(
                    d >= low - 1e-9 && d <= high + 1e-9,
                    "seed {seed}: {d} ∉ [{low}, {high}]"
                );
                assert!(d >= 1.0, "never more than once a second");
                base = (base * 1.6).min(30.0);
            }
        }
    }

    #[test]
    fn backoff_is_jittered_deterministic_per_seed_and_resets() {
        let firsts: Vec<Duration> = (0..20)
            .map(|s| Backoff::new(BackoffPolicy::default(), s).next_delay())
            .collect();
        let distinct: std::collections::BTreeSet<Duration> = firsts.iter().copied().collect();
        assert!(
            distinct.len() > 10,
            "runners do not retry in step: {firsts:?}"
        );
        let run = |seed| {
            let mut b = Backoff::new(BackoffPolicy::default(), seed);
            (0..10).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        let mut b = Backoff::new(BackoffPolicy::default(), 3);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs_f64(1.2));
    }

    fn report(uid: &str, run: u64, seq: u64, hits: u64, is_final: bool) -> NodeReport {
        NodeReport {
            assignment_uid: uid.into(),
            run,
            seq,
            counters: Some(fathom_proto::v1::Counters {
                hits,
                ..Default::default()
            }),
            r#final: is_final,
            ..Default::default()
        }
    }

    fn seqs(o: &mut Outbox) -> Vec<(String, u64)> {
        std::iter::from_fn(|| o.pop())
            .map(|r| (r.assignment_uid, r.seq))
            .collect()
    }

    #[test]
    fn the_outbox_keeps_one_report_per_assignment_and_counts_drops() {
        let mut o = Outbox::new(2, 1000);
        o.push(report("a", 1, 1, 1, false));
        o.push(report("a", 1, 2, 2, false));
        o.push(report("b", 1, 3, 1, false));
        assert_eq!(
            o.len(),
            2,
            "a newer cumulative report replaces the queued one"
        );
        assert_eq!(o.dropped(), 0);
        o.push(report("c", 1, 4, 1, false));
        assert_eq!(o.dropped(), 1);
        assert_eq!(seqs(&mut o), vec![("b".into(), 3), ("c".into(), 4)]);
    }

    #[test]
    fn after_a_reconnect_the_latest_report_of_every_assignment_is_resent() {
        let mut o = Outbox::new(16, 1000);
        o.push(report("a", 1, 1, 1, false));
        o.push(report("b", 1, 2, 1, false));
        o.pop();
        o.pop();
        o.push(report("a", 1, 3, 5, false));
        o.pop();
        // Run 2 of b: run 1's final report is kept until acknowledged.
        o.push(report("b", 1, 4, 2, true));
        o.push(report("b", 2, 5, 0, false));
        seqs(&mut o);
        o.reconnected();
        assert_eq!(
            seqs(&mut o),
            vec![("a".into(), 3), ("b".into(), 4), ("b".into(), 5)]
        );
        o.acknowledged(&ReportAck {
            assignment_uid: "b".into(),
            acknowledged_seq: 4,
            rejection: None,
        });
        o.reconnected();
        assert_eq!(seqs(&mut o), vec![("a".into(), 3), ("b".into(), 5)]);
    }

    fn with_events(mut r: NodeReport, n: usize) -> NodeReport {
        let records: Vec<EventRecord> = (0..n)
            .map(|i| EventRecord {
                time_ns: i as u64,
                fields: Default::default(),
            })
            .collect();
        r.event_batch = Some(fathom_proto::v1::EventBatch::from_records(&records));
        r
    }

    #[test]
    fn queued_event_batches_join_while_they_fit_and_the_spool_drops_the_oldest_counted() {
        let mut o = Outbox::new(16, 1500);
        o.push(with_events(report("a", 1, 1, 1, false), 600));
        o.push(with_events(report("a", 1, 2, 2, false), 300));
        assert_eq!(o.len(), 1, "900 events fit one report");
        o.push(with_events(report("a", 1, 3, 3, false), 300));
        assert_eq!(o.len(), 2, "1,200 do not");
        assert_eq!(o.queued_events().0, 1200);
        o.push(with_events(report("a", 1, 4, 4, false), 500));
        // 1,700 queued > 1,500: the 200 oldest go, counted.
        assert_eq!(o.queued_events(), (1500, 1500));
        assert_eq!(o.events_dropped(), 200);
        let first = o.pop().unwrap();
        assert_eq!((first.seq, events_in(&first)), (2, 700));
        assert_eq!(first.counters.unwrap().transport_dropped, 200);
        assert_eq!(
            first.event_batch.as_ref().unwrap().time_ns[0],
            200,
            "the oldest were dropped"
        );
        let second = o.pop().unwrap();
        assert_eq!((second.seq, events_in(&second)), (4, 800));
        assert!(o.pop().is_none());
        // Unacknowledged when the stream breaks: counted as dropped, and the resend of the
        // latest report carries no events.
        o.acknowledged(&ReportAck {
            assignment_uid: "a".into(),
            acknowledged_seq: 2,
            rejection: None,
        });
        o.reconnected();
        assert_eq!(o.events_dropped(), 1000);
        let resent = o.pop().unwrap();
        assert_eq!((resent.seq, events_in(&resent)), (4, 0));
        assert_eq!(resent.counters.unwrap().transport_dropped, 1000);
    }

    /// (stream number, report, authorization header)
    type Received = (usize, NodeReport, Option<String>);

    /// A collector that records what each stream received, acknowledges everything, and
    /// fails the first stream after `fail_after` reports.
    #[derive(Clone, Default)]
    struct FakeCollector {
        received: Arc<Mutex<Vec<Received>>>,
        streams: Arc<AtomicU64>,
        fail_after: usize,
    }

    type AckStream = Pin<Box<dyn Stream<Item = Result<ReportAck, Status>> + Send>>;

    #[tonic::async_trait]
    impl Collector for FakeCollector {
        type ReportStream = AckStream;

        async fn report(
            &self,
            request: Request<Streaming<NodeReport>>,
        ) -> Result<Response<AckStream>, Status> {
            let stream_no = self.streams.fetch_add(1, Ordering::SeqCst) as usize;
            let auth = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(16);
            let received = self.received.clone();
            let fail_after = self.fail_after;
            tokio::spawn(async move {
                let mut n = 0;
                while let Ok(Some(r)) = inbound.message().await {
                    n += 1;
                    let ack = ReportAck {
                        assignment_uid: r.assignment_uid.clone(),
                        acknowledged_seq: r.seq,
                        rejection: None,
                    };
                    received.lock().unwrap().push((stream_no, r, auth.clone()));
                    let _ = tx.send(Ok(ack)).await;
                    if stream_no == 0 && n == fail_after {
                        let _ = tx
                            .send(Err(Status::unavailable("collector restarting")))
                            .await;
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn after_a_broken_stream_the_runner_reconnects_and_resends_the_latest_reports() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = FakeCollector {
            fail_after: 2,
            ..Default::default()
        };
        let server = tonic::transport::Server::builder()
            .add_service(CollectorServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        let server = tokio::spawn(server);

        let token = std::env::temp_dir().join(format!("fathom-token-{}", std::process::id()));
        std::fs::write(&token, "tok-123\n").unwrap();
        let mut config = TransportConfig::new(format!("http://{addr}"));
        config.insecure_plaintext = true;
        config.token_file = Some(token.clone());
        let (tx, rx) = mpsc::channel(16);
        let (acks_tx, mut acks_rx) = mpsc::channel(16);
        let (stop, shutdown) = watch::channel(false);
        let stats = Arc::new(TransportStats::default());
        let started = Instant::now();
        let transport = tokio::spawn(run(config, rx, Some(acks_tx), stats.clone(), shutdown));

        tx.send(report("a", 1, 1, 10, false)).await.unwrap();
        tx.send(report("b", 1, 2, 20, false)).await.unwrap();
        let received = collector.received.clone();
        wait_for("the second stream's resend", || {
            received
                .lock()
                .unwrap()
                .iter()
                .filter(|(s, ..)| *s == 1)
                .count()
                >= 2
        })
        .await;
        assert!(
            started.elapsed() >= Duration::from_millis(800),
            "backoff before reconnecting"
        );
        tx.send(report("a", 1, 3, 15, false)).await.unwrap();
        wait_for("the new report", || received.lock().unwrap().len() >= 5).await;

        let got: Vec<(usize, String, u64)> = received
            .lock()
            .unwrap()
            .iter()
            .map(|(s, r, _)| (*s, r.assignment_uid.clone(), r.seq))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "a".into(), 1),
                (0, "b".into(), 2),
                (1, "a".into(), 1),
                (1, "b".into(), 2),
                (1, "a".into(), 3),
            ]
        );
        assert!(
            received
                .lock()
                .unwrap()
                .iter()
                .all(|(.., auth)| auth.as_deref() == Some("Bearer tok-123"))
        );
        assert_eq!(acks_rx.recv().await.unwrap().acknowledged_seq, 1);
        assert_eq!(stats.connects.load(Ordering::Relaxed), 2);
        assert!(stats.connected.load(Ordering::Relaxed));

        stop.send(true).unwrap();
        transport.await.unwrap().unwrap();
        server.abort();
        std::fs::remove_file(token).unwrap();
    }

    #[test]
    fn plaintext_needs_the_development_flag_and_https_a_ca() {
        let config = TransportConfig::new("http://collector:7443");
        assert!(matches!(
            config.endpoint(),
            Err(TransportError::PlaintextRefused(_))
        ));
        let config = TransportConfig::new("https://collector:7443");
        assert!(matches!(
            config.endpoint(),
            Err(TransportError::MissingCa(_))
        ));
        let mut config = TransportConfig::new("https://collector:7443");
        config.ca_file = Some("/nonexistent/ca.pem".into());
        let e = config.endpoint().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
