//! Adding and removing one finalizer without losing anybody else's: the one finalizer patch
//! of the operator (the job's cleanup finalizer, and an assignment's detach finalizer when the
//! operator releases it for a lost node).
//!
//! `metadata.finalizers` is shared with other controllers, which add and remove theirs
//! concurrently, so the list is never replaced. Each change is a JSON patch (RFC 6902) that
//! first `test`s the list as it was read — or, when there was none, the `resourceVersion` —
//! and then adds or removes the one element. If the list changed in between, the API server
//! refuses the patch (422 for a failed `test`, 409 for a stale version); the object is read
//! again and the change retried, at most [`ATTEMPTS`] times. Every patch carries the field
//! manager [`MANAGER`].

use std::fmt::Debug;

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::debug;

use crate::{
    error::{Error, Result},
    reconcile::MANAGER,
};

/// Attempts at a contended finalizer change, each after reading the object again.
pub const ATTEMPTS: usize = 5;

/// A change to one finalizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Add,
    Remove,
}

impl Change {
    fn verb(self) -> &'static str {
        match self {
            Change::Add => "adding",
            Change::Remove => "removing",
        }
    }
}

/// The JSON patch that makes `change` to `finalizer` on an object whose finalizers and
/// `resourceVersion` read as given; None when there is nothing to change.
pub fn finalizer_patch(
    finalizers: &[String],
    resource_version: Option<&str>,
    change: Change,
    finalizer: &str,
) -> Option<Value> {
    let at = finalizers.iter().position(|f| f == finalizer);
    match (change, at) {
        (Change::Add, Some(_)) | (Change::Remove, None) => None,
        // No list to test (the API server omits an empty one): the version stands for it.
        (Change::Add, None) if finalizers.is_empty() => Some(json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
            {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]},
        ])),
        (Change::Add, None) => Some(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "add", "path": "/metadata/finalizers/-", "value": finalizer},
        ])),
        (Change::Remove, Some(i)) => Some(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
        ])),
    }
}

/// Makes `change` to `finalizer` on `object` (as last read) through `api`, reading the object
/// again and retrying while someone else changes its finalizers. Ok(true) when a patch was
/// written; Ok(false) when there was nothing to change, or, for a removal, the object is gone.
pub async fn change_finalizer<K>(
    api: &Api<K>,
    object: &K,
    change: Change,
    finalizer: &str,
) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let name = object.name_any();
    let what = || {
        format!(
            "{} finalizer {finalizer} on {} {name}",
            change.verb(),
            K::kind(&())
        )
    };
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    let mut fresh: Option<K> = None;
    let mut attempt = 1;
    loop {
        let seen = fresh.as_ref().unwrap_or(object);
        let Some(patch) = finalizer_patch(
            seen.finalizers(),
            seen.meta().resource_version.as_deref(),
            change,
            finalizer,
        ) else {
            return Ok(false);
        };
        let patch = serde_json::from_value(patch).map_err(|source| Error::Encode {
            what: format!("the JSON patch {}", what()),
            source,
        })?;
        match api.patch(&name, &params, &Patch::Json::<()>(patch)).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 && change == Change::Remove => {
                return Ok(false);
            }
            Err(kube::Error::Api(s)) if (s.code == 409 || s.code == 422) && attempt < ATTEMPTS => {
                debug!(object = %name, %finalizer, attempt, reason = %s.message, "finalizers changed meanwhile: reading again");
            }
            Err(e) => return Err(Error::api(what(), e)),
        }
        attempt += 1;
        fresh = match api.get_opt(&name).await {
            Ok(Some(o)) => Some(o),
            Ok(None) if change == Change::Remove => return Ok(false),
            Ok(None) => {
                return Err(Error::Gone(format!(
                    "{} {name}, read again while {}",
                    K::kind(&()),
                    what()
                )));
            }
            Err(e) => {
                return Err(Error::api(
                    format!("reading {} {name} again while {}", K::kind(&()), what()),
                    e,
                ));
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn adding_tests_the_list_it_read_and_appends_one_element() {
        let p = finalizer_patch(&list(&["other.io/keep"]), Some("7"), Change::Add, "f");
        assert_eq!(
            p,
            Some(json!([
                {"op": "test", "path": "/metadata/finalizers", "value": ["other.io/keep"]},
                {"op": "add", "path": "/metadata/finalizers/-", "value": "f"},
            ]))
        );
    }

    #[test]
    fn adding_to_no_list_tests_the_version() {
        let p = finalizer_patch(&[], Some("7"), Change::Add, "f");
        assert_eq!(
            p,
            Some(json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                {"op": "add", "path": "/metadata/finalizers", "value": ["f"]},
            ]))
        );
    }

    #[test]
    fn removing_tests_the_list_and_removes_only_its_index() {
        let p = finalizer_patch(&list(&["a", "f", "b"]), Some("7"), Change::Remove, "f");
        assert_eq!(
            p,
            Some(json!([
                {"op": "test", "path": "/metadata/finalizers", "value": ["a", "f", "b"]},
                {"op": "remove", "path": "/metadata/finalizers/1"},
            ]))
        );
    }

    #[test]
    fn nothing_to_change_makes_no_patch() {
        assert_eq!(finalizer_patch(&list(&["f"]), None, Change::Add, "f"), None);
        assert_eq!(
            finalizer_patch(&list(&["a"]), None, Change::Remove, "f"),
            None
        );
        assert_eq!(finalizer_patch(&[], None, Change::Remove, "f"), None);
    }
}
