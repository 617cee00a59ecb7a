//! Kubernetes Events (`events.k8s.io/v1`) about jobs, written under the field manager
//! [`MANAGER`] like every other write of the operator.
//!
//! The same scheme as kube-runtime's `Recorder`, which writes without a field manager: an
//! Event is created once; when the same one (object, type, reason, action, note) happens again
//! within [`SERIES_WINDOW`], its `series` count is patched instead of creating another object.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event as K8sEvent, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType},
};
use serde_json::json;

use crate::reconcile::{EventSink, MANAGER};

/// Repeats of an Event within this window count in its series instead of creating another.
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// Publishes Events as the operator's `reportingController`, under its field manager.
pub struct EventRecorder {
    client: Client,
    instance: String,
    /// Recently published Events by what makes them the same, with when they last happened.
    recent: Mutex<HashMap<String, (K8sEvent, Instant)>>,
}

impl EventRecorder {
    /// A recorder reporting as [`MANAGER`], from this replica (`instance`).
    pub fn new(client: Client, instance: &str) -> Self {
        EventRecorder {
            client,
            instance: instance.into(),
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Creates the Event, or counts a repeat of a recent one in its series.
    pub async fn record(&self, event: &Event, regarding: &ObjectReference) -> kube::Result<()> {
        let key = format!(
            "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
            regarding.uid.as_deref().unwrap_or_default(),
            regarding.name.as_deref().unwrap_or_default(),
            matches!(event.type_, EventType::Warning),
            event.reason,
            event.action,
            event.note.as_deref().unwrap_or_default(),
        );
        let now = Timestamp::now();
        let repeat = {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent.retain(|_, (_, at)| at.elapsed() < SERIES_WINDOW);
            recent.get(&key).map(|(e, _)| e.clone())
        };
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let params = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        let stored = match repeat {
            Some(mut e) => {
                let series = EventSeries {
                    count: e.series.as_ref().map_or(2, |s| s.count + 1),
                    last_observed_time: MicroTime(now),
                };
                let name = e.metadata.name.clone().unwrap_or_default();
                api.patch(&name, &params, &Patch::Merge(json!({ "series": &series })))
                    .await?;
                e.series = Some(series);
                e
            }
            None => {
                let e = self.build(event, regarding, now);
                let post = PostParams {
                    field_manager: Some(MANAGER.into()),
                    ..Default::default()
                };
                api.create(&post, &e).await?;
                e
            }
        };
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (stored, Instant::now()));
        Ok(())
    }

    fn build(&self, event: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(MANAGER),
                    now.as_nanosecond()
                )),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(MANAGER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }
}

impl EventSink for EventRecorder {
    fn publish<'a>(
        &'a self,
        event: Event,
        reference: ObjectReference,
    ) -> BoxFuture<'a, Result<(), kube::Error>> {
        Box::pin(async move { self.record(&event, &reference).await })
    }
}
