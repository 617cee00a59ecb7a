//! The runner's side of the Kubernetes API: which TraceAssignments it watches — only those of
//! the operator's namespace ([`assignments_api`]), labelled with its node ([`selector`]) —,
//! how they become [`Desired`] assignments, and its two writes — the status (server-side apply on the
//! status subresource, field manager [`FIELD_MANAGER`]) and the release of the detach
//! finalizer (a JSON patch that `test`s the object's uid and finalizer list first, so that
//! nobody else's finalizer and no recreated object is touched).

use std::collections::BTreeMap;

use fathom_crds::{
    TraceAssignment, TraceAssignmentStatus,
    assignment::{DETACH_FINALIZER, NODE_LABEL, node_label_value},
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::watcher,
};

/// The namespace of the operator, where every TraceAssignment lives, unless configured.
pub const DEFAULT_NAMESPACE: &str = "fathom-system";
use serde_json::{Value, json};

use crate::daemon::runner::{AssignmentRef, Desired};

/// The field manager of every write of the runner.
pub const FIELD_MANAGER: &str = "fathom-node-runner";
/// Attempts at a contended finalizer release, each after reading the object again.
pub const ATTEMPTS: usize = 5;

/// The label selector of this node's assignments.
pub fn selector(node: &str) -> String {
    format!("{NODE_LABEL}={}", node_label_value(node))
}

/// The TraceAssignments the runner may read: those of the operator's `namespace` only. Tenants
/// may be allowed to write TraceAssignments in their own namespaces; the runner never sees
/// those, so it never runs one.
pub fn assignments_api(client: Client, namespace: &str) -> Api<TraceAssignment> {
    Api::namespaced(client, namespace)
}

/// The watch of this node's assignments (on [`assignments_api`]).
pub fn watch_config(node: &str) -> watcher::Config {
    watcher::Config::default().labels(&selector(node))
}

/// Where the runner looks for its assignments: its node, and the operator's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub node: String,
    pub namespace: String,
}

/// An assignment as the runner runs it; an error (logged, the assignment ignored) when it is
/// not for this node — the label is a hash for long names, `spec.nodeName` is the truth —, not
/// in the operator's namespace (the watch shows no other; checked again all the same), or
/// lacks what the runner needs to report on it.
pub fn desired(a: &TraceAssignment, scope: &Scope) -> Result<Desired, String> {
    let node = scope.node.as_str();
    let name = a.name_any();
    let uid = a
        .uid()
        .ok_or_else(|| format!("assignment {name} has no metadata.uid"))?;
    let namespace = a
        .namespace()
        .ok_or_else(|| format!("assignment {name} has no namespace"))?;
    if namespace != scope.namespace {
        return Err(format!(
            "assignment {namespace}/{name} is outside the operator's namespace {:?}: ignored",
            scope.namespace
        ));
    }
    if a.spec.node_name != node {
        return Err(format!(
            "assignment {namespace}/{name} is for node {:?}, not {node:?}: ignored",
            a.spec.node_name
        ));
    }
    Ok(Desired {
        uid,
        name,
        namespace,
        spec: a.spec.clone(),
        deleting: a.metadata.deletion_timestamp.is_some(),
    })
}

/// The assignments the watch holds: a full list replaces the set atomically
/// (`Init` … `InitDone`), single events change one.
#[derive(Debug, Default)]
pub struct Watched {
    objects: BTreeMap<String, TraceAssignment>,
    listing: Option<BTreeMap<String, TraceAssignment>>,
    synced: bool,
}

impl Watched {
    /// Applies one watch event; true when the set may have changed (time to reconcile).
    pub fn apply(&mut self, event: watcher::Event<TraceAssignment>) -> bool {
        let key = |a: &TraceAssignment| a.uid().unwrap_or_else(|| a.name_any());
        match event {
            watcher::Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(a) => {
                self.listing.get_or_insert_default().insert(key(&a), a);
                false
            }
            watcher::Event::InitDone => {
                self.objects = self.listing.take().unwrap_or_default();
                self.synced = true;
                true
            }
            watcher::Event::Apply(a) => {
                self.objects.insert(key(&a), a);
                self.synced
            }
            watcher::Event::Delete(a) => {
                self.objects.remove(&key(&a));
                self.synced
            }
        }
    }

    /// A complete list has been seen: the set is the truth (pins of others may go).
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// This node's assignments (others are logged and skipped).
    pub fn desired(&self, scope: &Scope) -> Vec<Desired> {
        self.objects
            .values()
            .filter_map(|a| match desired(a, scope) {
                Ok(d) => Some(d),
                Err(message) => {
                    tracing::warn!(%message, "assignment skipped");
                    None
                }
            })
            .collect()
    }
}

/// The server-side apply body of a status.
pub fn status_patch(status: &TraceAssignmentStatus) -> Value {
    json!({
        "apiVersion": "fathom.dev/v1alpha1",
        "kind": "TraceAssignment",
        "status": status,
    })
}

/// The JSON patch removing `finalizer` from an object with this uid and finalizer list; None
/// when it is not there.
pub fn release_patch(uid: &str, finalizers: &[String], finalizer: &str) -> Option<Value> {
    let at = finalizers.iter().position(|f| f == finalizer)?;
    Some(json!([
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
        {"op": "remove", "path": format!("/metadata/finalizers/{at}")},
    ]))
}

/// Writes an assignment's status (server-side apply, forced: the runner owns the status).
pub async fn write_status(
    client: &Client,
    to: &AssignmentRef,
    status: &TraceAssignmentStatus,
) -> Result<(), kube::Error> {
    let api: Api<TraceAssignment> = Api::namespaced(client.clone(), &to.namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&to.name, &params, &Patch::Apply(status_patch(status)))
        .await
        .map(|_| ())
}

/// Removes [`DETACH_FINALIZER`] from the assignment once it has detached. Ok(false) when
/// there was nothing to remove: the object is gone, is another object of the same name, or
/// has no such finalizer.
pub async fn release_finalizer(client: &Client, to: &AssignmentRef) -> Result<bool, kube::Error> {
    let api: Api<TraceAssignment> = Api::namespaced(client.clone(), &to.namespace);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let mut attempt = 1;
    loop {
        let Some(object) = api.get_opt(&to.name).await? else {
            return Ok(false);
        };
        if object.uid().as_deref() != Some(to.uid.as_str()) {
            return Ok(false);
        }
        let Some(patch) = release_patch(&to.uid, object.finalizers(), DETACH_FINALIZER) else {
            return Ok(false);
        };
        let patch = serde_json::from_value(patch).map_err(kube::Error::SerdeError)?;
        match api
            .patch(&to.name, &params, &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
            Err(kube::Error::Api(s)) if (s.code == 409 || s.code == 422) && attempt < ATTEMPTS => {
                tracing::debug!(assignment = %to.name, attempt, reason = %s.message, "finalizers changed meanwhile: reading again");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use fathom_crds::{TraceAssignmentSpec, assignment::AssignmentPhase};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn scope(node: &str) -> Scope {
        Scope {
            node: node.into(),
            namespace: DEFAULT_NAMESPACE.into(),
        }
    }

    fn assignment(uid: &str, node: &str) -> TraceAssignment {
        assignment_in("fathom-system", uid, node)
    }

    fn assignment_in(namespace: &str, uid: &str, node: &str) -> TraceAssignment {
        TraceAssignment {
            metadata: ObjectMeta {
                name: Some(format!("a-{uid}")),
                namespace: Some(namespace.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: TraceAssignmentSpec {
                node_name: node.into(),
                ..Default::default()
            },
            status: None,
        }
    }

    #[test]
    fn only_this_nodes_assignments_are_desired() {
        let d = desired(&assignment("u1", "node-a"), &scope("node-a")).unwrap();
        assert_eq!(
            (d.uid.as_str(), d.namespace.as_str()),
            ("u1", "fathom-system")
        );
        assert!(!d.deleting);
        let e = desired(&assignment("u2", "node-b"), &scope("node-a")).unwrap_err();
        assert!(e.contains("node-b"), "{e}");
        assert_eq!(selector("node-a"), "fathom.dev/node=node-a");
    }

    #[test]
    fn an_assignment_a_tenant_wrote_in_its_namespace_is_never_run() {
        // A tenant allowed to write TraceAssignments in its namespace forges one for this
        // node, node-wide: even if some watch delivered it, the runner refuses it.
        let mut forged = assignment_in("shop", "evil", "node-a");
        forged.spec.node_wide = true;
        let e = desired(&forged, &scope("node-a")).unwrap_err();
        assert!(e.contains("outside the operator's namespace"), "{e}");
        let mut w = Watched::default();
        w.apply(watcher::Event::Init);
        w.apply(watcher::Event::InitApply(forged));
        w.apply(watcher::Event::InitApply(assignment("u1", "node-a")));
        w.apply(watcher::Event::InitDone);
        let uids: Vec<String> = w
            .desired(&scope("node-a"))
            .into_iter()
            .map(|d| d.uid)
            .collect();
        assert_eq!(uids, ["u1"]);
    }

    #[tokio::test]
    async fn the_watch_reads_only_the_operators_namespace() {
        // No request is made: the client only builds URLs here.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let api = assignments_api(client, DEFAULT_NAMESPACE);
        assert_eq!(
            api.resource_url(),
            "/apis/fathom.dev/v1alpha1/namespaces/fathom-system/traceassignments"
        );
        let wc = watch_config("node-a");
        assert_eq!(wc.label_selector.as_deref(), Some("fathom.dev/node=node-a"));
    }

    #[test]
    fn a_relist_replaces_the_set() {
        let mut w = Watched::default();
        assert!(!w.apply(watcher::Event::Init));
        assert!(!w.apply(watcher::Event::InitApply(assignment("u1", "n"))));
        assert!(!w.synced());
        assert!(w.apply(watcher::Event::InitDone));
        assert!(w.apply(watcher::Event::Apply(assignment("u2", "n"))));
        assert_eq!(w.desired(&scope("n")).len(), 2);
        // A relist without u1: it is gone once the list is complete.
        w.apply(watcher::Event::Init);
        w.apply(watcher::Event::InitApply(assignment("u2", "n")));
        assert_eq!(w.desired(&scope("n")).len(), 2, "not before InitDone");
        w.apply(watcher::Event::InitDone);
        let uids: Vec<String> = w.desired(&scope("n")).into_iter().map(|d| d.uid).collect();
        assert_eq!(uids, vec!["u2"]);
        assert!(w.apply(watcher::Event::Delete(assignment("u2", "n"))));
        assert!(w.desired(&scope("n")).is_empty());
    }

    #[test]
    fn the_release_patch_tests_uid_and_list_and_removes_one_finalizer() {
        let finalizers = vec!["other.io/keep".to_string(), DETACH_FINALIZER.to_string()];
        let patch = release_patch("u1", &finalizers, DETACH_FINALIZER).unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/metadata/uid", "value": "u1"},
                {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
                {"op": "remove", "path": "/metadata/finalizers/1"},
            ])
        );
        assert!(release_patch("u1", &["other.io/keep".into()], DETACH_FINALIZER).is_none());
        let _: Patch<()> = Patch::Json(serde_json::from_value(patch).unwrap());
    }

    #[test]
    fn the_status_patch_names_the_kind() {
        let status = TraceAssignmentStatus {
            phase: Some(AssignmentPhase::Attached),
            ..Default::default()
        };
        let p = status_patch(&status);
        assert_eq!(p["kind"], "TraceAssignment");
        assert_eq!(p["apiVersion"], "fathom.dev/v1alpha1");
        assert_eq!(p["status"]["phase"], "Attached");
    }
}
