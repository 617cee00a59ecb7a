//! An in-memory Kubernetes API server, as a tower `Service` behind a real `kube::Client`.
//!
//! Unit tests run without an API server, so the reconciler's calls go here (the real
//! kube-apiserver is exercised by `e2e/`). It keeps the semantics the operator relies on, and
//! records every request — with its field manager — so tests can count and check writes:
//! - create/get/list (label selectors `k=v`, `k!=v`, `k`, `!k`)/replace/delete;
//! - `resourceVersion` on every write; optimistic concurrency on replace and on patches that
//!   carry `metadata.resourceVersion` (409 Conflict);
//! - `metadata.generation` moves only when `spec` changes;
//! - status subresource: writes to the object ignore `status`, writes to `/status` change
//!   only `status`;
//! - server-side apply (`application/apply-patch+yaml`, a field manager required): fields the
//!   same manager applied before and no longer applies are removed, the rest is merged
//!   (objects recursively, lists and scalars replaced);
//! - field ownership, per manager, of each top-level field of `spec` and `status` and each key
//!   of `metadata.labels`/`annotations`: an update (create, replace, patch) takes the fields it
//!   changes; an apply shares the fields whose value it agrees with, and — unless forced —
//!   is refused with 409 Conflict and one `FieldManagerConflict` cause per field when another
//!   manager owns a field it sets to another value (the real server tracks every leaf; this
//!   is the granularity at which the operator's objects conflict);
//! - merge patches (RFC 7386) and JSON patches (RFC 6902: test, add, remove, replace, move,
//!   copy; a failed operation is 422, a `test` of a missing member against `null` passes as
//!   on the real server);
//! - finalizers: deleting an object with finalizers sets `deletionTimestamp`; the object goes
//!   when its last finalizer is removed (an empty list is dropped); deleting an object deletes
//!   its dependents (`ownerReferences`), as the garbage collector does;
//! - faults on demand: every request answered 503, or left hanging.
//!
//! Not modelled: watches (tests call the reconciler directly), strategic merge, admission
//! (the CRDs' CEL rules are tested offline with kube-cel).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    convert::Infallible,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use jiff::Timestamp;
use serde_json::{Value, json};

/// Where an object lives: (`api/v1` or `apis/<group>/<version>`, plural, namespace or "", name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub gv: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

/// One request, as the API saw it.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    /// The `fieldManager` the request named, if any.
    pub field_manager: Option<String>,
    /// Whether the request was a forced server-side apply (`force=true`).
    pub force: bool,
    /// The request body, as sent.
    pub body: String,
}

impl Call {
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

/// Who owns a field: a field manager, by the kind of write that gave it the field.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Manager {
    pub name: String,
    /// Server-side apply (else an update: create, replace or patch).
    pub apply: bool,
    /// Through the status subresource.
    pub status: bool,
}

impl Manager {
    /// As the real API server names a manager in a conflict.
    fn describe(&self, api_version: &str) -> String {
        let mut s = format!("{:?}", self.name);
        if self.status {
            s.push_str(" with subresource \"status\"");
        }
        if !self.apply {
            s.push_str(&format!(" using {api_version}"));
        }
        s
    }
}

/// The tracked fields of an object and their values: each top-level field of `spec` and
/// `status` (`.spec.suspend`), each key of `metadata.labels` and `metadata.annotations`
/// (`.metadata.labels.app`).
fn tracked_fields(obj: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for section in ["spec", "status"] {
        if let Some(m) = obj.get(section).and_then(Value::as_object) {
            for (k, v) in m {
                out.insert(format!(".{section}.{k}"), v.clone());
            }
        }
    }
    for meta in ["labels", "annotations"] {
        if let Some(m) = obj
            .pointer(&format!("/metadata/{meta}"))
            .and_then(Value::as_object)
        {
            for (k, v) in m {
                out.insert(format!(".metadata.{meta}.{k}"), v.clone());
            }
        }
    }
    out
}

/// Splits a JSON pointer into its parent pointer and its last token (unescaped).
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let at = path
        .rfind('/')
        .ok_or_else(|| format!("JSON pointer {path:?} does not start with /"))?;
    Ok((
        &path[..at],
        path[at + 1..].replace("~1", "/").replace("~0", "~"),
    ))
}

fn pointer_mut<'a>(doc: &'a mut Value, path: &str) -> Result<&'a mut Value, String> {
    doc.pointer_mut(path)
        .ok_or_else(|| format!("doc is missing path: {path:?}"))
}

/// RFC 6902 `add`: inserts into an object or array (`-` appends), replacing an object member.
fn patch_add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, token) = split_pointer(path)?;
    match pointer_mut(doc, parent)? {
        Value::Object(m) => {
            m.insert(token, value);
            Ok(())
        }
        Value::Array(a) => {
            let i = if token == "-" {
                a.len()
            } else {
                token
                    .parse::<usize>()
                    .map_err(|_| format!("add: bad array index {token:?} in {path:?}"))?
            };
            if i > a.len() {
                return Err(format!(
                    "add operation does not apply: index {i} out of range in {path:?}"
                ));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!(
            "add operation does not apply: {parent:?} is not a container"
        )),
    }
}

/// RFC 6902 `remove`: the member or element must exist; returns it.
fn patch_remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, token) = split_pointer(path)?;
    match pointer_mut(doc, parent)? {
        Value::Object(m) => m.remove(&token).ok_or_else(|| {
            format!("remove operation does not apply: doc is missing key: {path:?}")
        }),
        Value::Array(a) => {
            let i = token
                .parse::<usize>()
                .map_err(|_| format!("remove: bad array index {token:?} in {path:?}"))?;
            if i >= a.len() {
                return Err(format!(
                    "remove operation does not apply: index {i} out of range in {path:?}"
                ));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!(
            "remove operation does not apply: {parent:?} is not a container"
        )),
    }
}

/// Applies a JSON patch (RFC 6902) to `doc`; the error says which operation failed and why.
pub fn json_patch(doc: &mut Value, ops: &[Value]) -> Result<(), String> {
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("operation {op} has no path"))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("{kind} operation at {path:?} has no value"))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{kind} operation at {path:?} has no from"))
        };
        match kind {
            "test" => {
                let want = value()?;
                match doc.pointer(path) {
                    None if want.is_null() => {}
                    Some(have) if *have == want => {}
                    _ => return Err(format!("testing value {path} failed: test failed")),
                }
            }
            "add" => patch_add(doc, path, value()?)?,
            "remove" => {
                patch_remove(doc, path)?;
            }
            "replace" => {
                let v = value()?;
                if path.is_empty() {
                    *doc = v;
                } else {
                    patch_remove(doc, path)
                        .map_err(|e| format!("replace operation does not apply: {e}"))?;
                    patch_add(doc, path, v)?;
                }
            }
            "move" => {
                let v = patch_remove(doc, from()?)?;
                patch_add(doc, path, v)?;
            }
            "copy" => {
                let v = doc
                    .pointer(from()?)
                    .cloned()
                    .ok_or_else(|| format!("copy operation does not apply: missing {path:?}"))?;
                patch_add(doc, path, v)?;
            }
            other => return Err(format!("unexpected kind of operation: {other:?}")),
        }
    }
    Ok(())
}

/// A clock the test moves by hand; shared by the API (deletion timestamps) and the operator.
#[derive(Debug)]
pub struct ManualClock(Mutex<Timestamp>);

impl ManualClock {
    pub fn new(start: Timestamp) -> Arc<Self> {
        Arc::new(ManualClock(Mutex::new(start)))
    }

    pub fn now(&self) -> Timestamp {
        *self.0.lock().expect("clock")
    }

    pub fn advance(&self, secs: i64) {
        let mut t = self.0.lock().expect("clock");
        *t = t
            .checked_add(jiff::SignedDuration::from_secs(secs))
            .expect("time in range");
    }
}

impl fathom_operator::reconcile::Clock for ManualClock {
    fn now(&self) -> Timestamp {
        ManualClock::now(self)
    }
}

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    /// (object, manager, status subresource) → the last applied configuration.
    applied: HashMap<(Key, String, bool), Value>,
    /// object → tracked field → its owners.
    owners: HashMap<Key, BTreeMap<String, BTreeSet<Manager>>>,
    rv: u64,
    uid: u64,
    calls: Vec<Call>,
    /// Answer every request with 503.
    unavailable: bool,
    /// Never answer.
    hanging: bool,
}

/// The in-memory API. Clone it freely: clones share the state.
#[derive(Clone)]
pub struct MemoryApi {
    state: Arc<Mutex<State>>,
    clock: Arc<ManualClock>,
}

fn status_error(code: u16, reason: &str, message: impl Into<String>) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": reason, "message": message.into(), "code": code}),
    )
}

/// RFC 7386 merge: `null` removes, objects merge, everything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else if v.is_object() && t.get(k).is_some_and(Value::is_object) {
                    merge(t.get_mut(k).expect("checked"), v);
                } else {
                    t.insert(k.clone(), strip_nulls(v));
                }
            }
        }
        _ => *target = strip_nulls(patch),
    }
}

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Removes from `target` every leaf of `prev` that `next` no longer has.
fn remove_dropped(target: &mut Value, prev: &Value, next: Option<&Value>) {
    let (Some(t), Some(p)) = (target.as_object_mut(), prev.as_object()) else {
        return;
    };
    for (k, pv) in p {
        let nv = next.and_then(|n| n.get(k));
        match nv {
            None => {
                t.remove(k);
            }
            Some(nv) if pv.is_object() && nv.is_object() => {
                if let Some(tv) = t.get_mut(k) {
                    remove_dropped(tv, pv, Some(nv));
                }
            }
            Some(_) => {}
        }
    }
}

/// An empty `finalizers` list is not stored (the API server omits it).
fn drop_empty_finalizers(meta: &mut Value) {
    if let Some(m) = meta.as_object_mut()
        && m.get("finalizers")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
    {
        m.remove("finalizers");
    }
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            get(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k.trim()).is_none()
        } else {
            get(term.trim()).is_some()
        }
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            let v = v.replace('+', " ");
            percent_decode(&v)
        })
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (key without name, name, subresource)
fn parse_path(path: &str) -> Option<(Key, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match *parts.first()? {
        "api" => (format!("api/{}", parts.get(1)?), &parts[2..]),
        "apis" => (
            format!("apis/{}/{}", parts.get(1)?, parts.get(2)?),
            &parts[3..],
        ),
        _ => return None,
    };
    let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (rest[1].to_string(), &rest[2..])
    } else {
        (String::new(), rest)
    };
    let plural = rest.first()?.to_string();
    let name = rest.get(1).map(|s| s.to_string()).unwrap_or_default();
    let sub = rest.get(2).map(|s| s.to_string());
    Some((
        Key {
            gv,
            plural,
            namespace,
            name,
        },
        sub,
    ))
}

impl MemoryApi {
    pub fn new(clock: Arc<ManualClock>) -> Self {
        MemoryApi {
            state: Arc::new(Mutex::new(State::default())),
            clock,
        }
    }

    /// A `kube::Client` talking to this API.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every request since the last [`MemoryApi::clear_calls`].
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The mutating requests since the last [`MemoryApi::clear_calls`].
    pub fn writes(&self) -> Vec<Call> {
        self.calls().into_iter().filter(Call::is_write).collect()
    }

    /// From now on, answer every request with 503 Service Unavailable (or stop doing so).
    pub fn set_unavailable(&self, on: bool) {
        self.lock().unavailable = on;
    }

    /// From now on, leave every request unanswered (or stop doing so, for new requests).
    pub fn set_hanging(&self, on: bool) {
        self.lock().hanging = on;
    }

    /// The managers owning each tracked field of an object (see the module documentation).
    pub fn owners(
        &self,
        gv: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> BTreeMap<String, BTreeSet<Manager>> {
        self.lock()
            .owners
            .get(&Key {
                gv: gv.into(),
                plural: plural.into(),
                namespace: namespace.into(),
                name: name.into(),
            })
            .cloned()
            .unwrap_or_default()
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The stored object, if any.
    pub fn get(&self, gv: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&Key {
                gv: gv.into(),
                plural: plural.into(),
                namespace: namespace.into(),
                name: name.into(),
            })
            .cloned()
    }

    /// Every stored object of a resource, in any namespace.
    pub fn list(&self, gv: &str, plural: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| k.gv == gv && k.plural == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn now_string(&self) -> String {
        jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", self.clock.now()).expect("format")
    }

    fn bump(state: &mut State, obj: &mut Value) {
        state.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(state.rv.to_string());
    }

    fn create(&self, state: &mut State, key: Key, mut obj: Value) -> Result<Value, (u16, Value)> {
        if state.objects.contains_key(&key) {
            return Err(status_error(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", key.plural, key.name),
            ));
        }
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        state.uid += 1;
        let m = &mut obj["metadata"];
        m["name"] = json!(key.name);
        if !key.namespace.is_empty() {
            m["namespace"] = json!(key.namespace);
        }
        drop_empty_finalizers(m);
        m["uid"] = json!(format!("uid-{:04}", state.uid));
        m["generation"] = json!(1);
        m["creationTimestamp"] = json!(self.now_string());
        if let Some(meta) = m.as_object_mut() {
            meta.remove("deletionTimestamp");
        }
        Self::bump(state, &mut obj);
        state.objects.insert(key, obj.clone());
        Ok(obj)
    }

    /// Stores `obj` as the new state of `key` (which exists), with generation, finalizer and
    /// status-subresource semantics.
    fn update(
        &self,
        state: &mut State,
        key: &Key,
        mut obj: Value,
        status: bool,
    ) -> Result<Value, (u16, Value)> {
        let old = state.objects.get(key).cloned().expect("caller checked");
        if status {
            let mut next = old.clone();
            match obj.get("status") {
                Some(s) => next["status"] = s.clone(),
                None => {
                    if let Some(o) = next.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            obj = next;
        } else {
            match old.get("status") {
                Some(s) => obj["status"] = s.clone(),
                None => {
                    if let Some(o) = obj.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
            ] {
                match old["metadata"].get(f) {
                    Some(v) => obj["metadata"][f] = v.clone(),
                    None => {
                        if let Some(m) = obj["metadata"].as_object_mut() {
                            m.remove(f);
                        }
                    }
                }
            }
            obj["metadata"]["name"] = json!(key.name);
            drop_empty_finalizers(&mut obj["metadata"]);
            if old.get("spec") != obj.get("spec") {
                let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                obj["metadata"]["generation"] = json!(g + 1);
            }
        }
        if obj == old {
            return Ok(old);
        }
        Self::bump(state, &mut obj);
        let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
        let no_finalizers = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
        if deleting && no_finalizers {
            self.remove(state, key);
            return Ok(obj);
        }
        state.objects.insert(key.clone(), obj.clone());
        Ok(obj)
    }

    /// Deletes now or marks for deletion; dependents follow.
    fn delete(&self, state: &mut State, key: &Key) -> Result<Value, (u16, Value)> {
        let Some(mut obj) = state.objects.get(key).cloned() else {
            return Err(status_error(
                404,
                "NotFound",
                format!("{} \"{}\" not found", key.plural, key.name),
            ));
        };
        let has_finalizers = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj.pointer("/metadata/deletionTimestamp").is_none() {
                obj["metadata"]["deletionTimestamp"] = json!(self.now_string());
                Self::bump(state, &mut obj);
                state.objects.insert(key.clone(), obj.clone());
            }
            return Ok(obj);
        }
        self.remove(state, key);
        Ok(obj)
    }

    fn remove(&self, state: &mut State, key: &Key) {
        let Some(obj) = state.objects.remove(key) else {
            return;
        };
        state.applied.retain(|(k, _, _), _| k != key);
        state.owners.remove(key);
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let dependents: Vec<Key> = state
            .objects
            .iter()
            .filter(|(_, v)| {
                v.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == json!(uid)))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for d in dependents {
            let _ = self.delete(state, &d);
        }
    }

    /// An update by `manager` turned `old` (None: created) into `new`: it now owns alone the
    /// tracked fields it changed; fields that went have no owner.
    fn took_fields(
        state: &mut State,
        key: &Key,
        old: Option<&Value>,
        new: &Value,
        manager: &Manager,
    ) {
        let before = old.map(tracked_fields).unwrap_or_default();
        let after = tracked_fields(new);
        let owners = state.owners.entry(key.clone()).or_default();
        for (path, v) in &after {
            if before.get(path) != Some(v) {
                owners.insert(path.clone(), BTreeSet::from([manager.clone()]));
            }
        }
        owners.retain(|path, _| after.contains_key(path));
    }

    /// The fields of `config` that another manager owns with another value in `current`, as
    /// (manager, field).
    fn conflicts(
        state: &State,
        key: &Key,
        current: &Value,
        config: &Value,
        me: &Manager,
    ) -> Vec<(Manager, String)> {
        let now = tracked_fields(current);
        let Some(owners) = state.owners.get(key) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (path, v) in tracked_fields(config) {
            if now.get(&path) == Some(&v) {
                continue;
            }
            for o in owners.get(&path).into_iter().flatten() {
                if o != me {
                    out.push((o.clone(), path.clone()));
                }
            }
        }
        out
    }

    fn apply(
        &self,
        state: &mut State,
        key: Key,
        status: bool,
        manager: String,
        force: bool,
        applied: Value,
    ) -> Result<Value, (u16, Value)> {
        let section = |v: &Value| -> Value {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                if status {
                    o.retain(|k, _| k == "status");
                } else {
                    o.remove("status");
                    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove("resourceVersion");
                    }
                }
            }
            v
        };
        let config = section(&applied);
        let me = Manager {
            name: manager.clone(),
            apply: true,
            status,
        };
        let slot = (key.clone(), manager, status);
        let Some(current) = state.objects.get(&key).cloned() else {
            if status {
                return Err(status_error(
                    404,
                    "NotFound",
                    format!("{} \"{}\" not found", key.plural, key.name),
                ));
            }
            let created = self.create(state, key.clone(), config.clone())?;
            let owners = state.owners.entry(key).or_default();
            for path in tracked_fields(&config).into_keys() {
                owners.insert(path, BTreeSet::from([me.clone()]));
            }
            state.applied.insert(slot, config);
            return Ok(created);
        };
        let conflicts = Self::conflicts(state, &key, &current, &config, &me);
        if !conflicts.is_empty() && !force {
            let api_version = key
                .gv
                .trim_start_matches("api/")
                .trim_start_matches("apis/");
            let causes: Vec<Value> = conflicts
                .iter()
                .map(|(m, field)| {
                    json!({"reason": "FieldManagerConflict",
                           "message": format!("conflict with {}", m.describe(api_version)),
                           "field": field})
                })
                .collect();
            let listed: Vec<String> = conflicts
                .iter()
                .map(|(m, field)| format!("conflict with {}: {field}", m.describe(api_version)))
                .collect();
            let n = conflicts.len();
            let mut err = status_error(
                409,
                "Conflict",
                format!(
                    "Apply failed with {n} conflict{}: {}",
                    if n == 1 { "" } else { "s" },
                    listed.join("\n")
                ),
            );
            err.1["details"] = json!({"name": key.name, "causes": causes});
            return Err(err);
        }
        let mut next = current.clone();
        if let Some(prev) = state.applied.get(&slot) {
            remove_dropped(&mut next, prev, Some(&config));
        }
        merge(&mut next, &config);
        let fields = tracked_fields(&config);
        let owners = state.owners.entry(key.clone()).or_default();
        // Forced: the fields in conflict are taken from their owners.
        for (_, path) in &conflicts {
            if let Some(set) = owners.get_mut(path) {
                set.retain(|o| o == &me);
            }
        }
        for set in owners.values_mut() {
            set.remove(&me);
        }
        for path in fields.keys() {
            owners.entry(path.clone()).or_default().insert(me.clone());
        }
        owners.retain(|_, set| !set.is_empty());
        state.applied.insert(slot, config);
        self.update(state, &key, next, status)
    }

    fn handle(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let mut state = self.lock();
        let field_manager = query_param(query, "fieldManager");
        let force = query_param(query, "force").as_deref() == Some("true");
        state.calls.push(Call {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            content_type: content_type.to_string(),
            field_manager: field_manager.clone(),
            force,
            body: String::from_utf8_lossy(body).into_owned(),
        });
        if state.unavailable {
            return status_error(
                503,
                "ServiceUnavailable",
                "the API is unavailable (injected)",
            );
        }
        let Some((key, sub)) = parse_path(path) else {
            return status_error(404, "NotFound", format!("no route {path}"));
        };
        if query.contains("watch=true") || query.contains("watch=1") {
            return status_error(405, "MethodNotAllowed", "watches are not modelled");
        }
        let status_sub = sub.as_deref() == Some("status");
        // Who an update (anything but an apply) is by; the real server derives a name from
        // the user agent when the request names none.
        let updater = Manager {
            name: field_manager.clone().unwrap_or_else(|| "unnamed".into()),
            apply: false,
            status: status_sub,
        };
        let before = (!key.name.is_empty())
            .then(|| state.objects.get(&key).cloned())
            .flatten();
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return status_error(400, "BadRequest", format!("body: {e}")),
            }
        };
        let result = match (method.as_str(), key.name.is_empty()) {
            ("GET", true) => {
                let selector = query_param(query, "labelSelector").unwrap_or_default();
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|(k, _)| {
                        k.gv == key.gv
                            && k.plural == key.plural
                            && (key.namespace.is_empty() || k.namespace == key.namespace)
                    })
                    .map(|(_, v)| v.clone())
                    .filter(|v| labels_match(v, &selector))
                    .collect();
                Ok(json!({
                    "apiVersion": key.gv.trim_start_matches("api/").trim_start_matches("apis/"),
                    "kind": "List",
                    "metadata": {"resourceVersion": state.rv.to_string()},
                    "items": items,
                }))
            }
            ("GET", false) => state.objects.get(&key).cloned().ok_or_else(|| {
                status_error(
                    404,
                    "NotFound",
                    format!("{} \"{}\" not found", key.plural, key.name),
                )
            }),
            ("POST", true) => {
                let name = body
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if name.is_empty() {
                    Err(status_error(
                        422,
                        "Invalid",
                        "metadata.name: Required value",
                    ))
                } else {
                    let key = Key {
                        name: name.to_string(),
                        ..key.clone()
                    };
                    let created = self.create(&mut state, key.clone(), body);
                    if let Ok(obj) = &created {
                        Self::took_fields(&mut state, &key, None, obj, &updater);
                    }
                    created
                }
            }
            ("PUT", false) => match state.objects.get(&key) {
                None => Err(status_error(
                    404,
                    "NotFound",
                    format!("{} \"{}\" not found", key.plural, key.name),
                )),
                Some(cur) => {
                    let want = body.pointer("/metadata/resourceVersion").cloned();
                    if want.is_some() && want.as_ref() != cur.pointer("/metadata/resourceVersion") {
                        Err(status_error(
                            409,
                            "Conflict",
                            "the object has been modified; please apply your changes to the latest version and try again",
                        ))
                    } else {
                        self.update(&mut state, &key, body, status_sub)
                    }
                }
            },
            ("PATCH", false) if content_type.starts_with("application/apply-patch") => {
                match field_manager {
                    None => Err(status_error(
                        422,
                        "Invalid",
                        "fieldManager is required for apply",
                    )),
                    Some(m) => self.apply(&mut state, key.clone(), status_sub, m, force, body),
                }
            }
            ("PATCH", false) if content_type.starts_with("application/json-patch") => {
                match (state.objects.get(&key).cloned(), body.as_array()) {
                    (None, _) => Err(status_error(
                        404,
                        "NotFound",
                        format!("{} \"{}\" not found", key.plural, key.name),
                    )),
                    (Some(_), None) => Err(status_error(
                        400,
                        "BadRequest",
                        "a JSON patch is a list of operations",
                    )),
                    (Some(cur), Some(ops)) => {
                        let mut next = cur.clone();
                        match json_patch(&mut next, ops) {
                            Err(e) => Err(status_error(422, "Invalid", e)),
                            Ok(())
                                if next.pointer("/metadata/resourceVersion")
                                    != cur.pointer("/metadata/resourceVersion") =>
                            {
                                Err(status_error(
                                    409,
                                    "Conflict",
                                    "the object has been modified; please apply your changes to the latest version and try again",
                                ))
                            }
                            Ok(()) => self.update(&mut state, &key, next, status_sub),
                        }
                    }
                }
            }
            ("PATCH", false) => match state.objects.get(&key).cloned() {
                None => Err(status_error(
                    404,
                    "NotFound",
                    format!("{} \"{}\" not found", key.plural, key.name),
                )),
                Some(cur) => {
                    let want = body.pointer("/metadata/resourceVersion").cloned();
                    if want.is_some() && want.as_ref() != cur.pointer("/metadata/resourceVersion") {
                        Err(status_error(
                            409,
                            "Conflict",
                            "the object has been modified; please apply your changes to the latest version and try again",
                        ))
                    } else {
                        let mut next = cur.clone();
                        let mut patch = body.clone();
                        if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                            m.remove("resourceVersion");
                        }
                        merge(&mut next, &patch);
                        self.update(&mut state, &key, next, status_sub)
                    }
                }
            },
            ("DELETE", false) => self.delete(&mut state, &key),
            _ => Err(status_error(
                405,
                "MethodNotAllowed",
                format!("{method} {path}"),
            )),
        };
        let is_update = matches!(method.as_str(), "PUT" | "PATCH")
            && !content_type.starts_with("application/apply-patch");
        if let (Ok(after), true, Some(before)) = (&result, is_update, &before)
            && state.objects.contains_key(&key)
        {
            Self::took_fields(&mut state, &key, Some(before), after, &updater);
        }
        match result {
            Ok(v) => (if method == Method::POST { 201 } else { 200 }, v),
            Err(e) => e,
        }
    }

    /// Stores an object as a test fixture (not logged as a call). Returns it as stored.
    pub fn seed(&self, gv: &str, plural: &str, obj: Value) -> Value {
        let key = Key {
            gv: gv.into(),
            plural: plural.into(),
            namespace: obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into(),
            name: obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .expect("fixture has a name")
                .into(),
        };
        let mut state = self.lock();
        if state.objects.contains_key(&key) {
            let status = obj.get("status").is_some();
            let mut next = obj.clone();
            if let Some(o) = next.as_object_mut() {
                o.remove("status");
            }
            self.update(&mut state, &key, next, false)
                .expect("update fixture");
            if status {
                self.update(&mut state, &key, obj, true)
                    .expect("update fixture status")
            } else {
                state.objects[&key].clone()
            }
        } else {
            let mut created = self
                .create(&mut state, key.clone(), obj.clone())
                .expect("create fixture");
            // A fixture may name its uid (the server makes one up for clients' objects).
            if let Some(uid) = obj.pointer("/metadata/uid") {
                created["metadata"]["uid"] = uid.clone();
                state.objects.insert(key.clone(), created.clone());
            }
            if let Some(s) = obj.get("status") {
                let mut with = created;
                with["status"] = s.clone();
                self.update(&mut state, &key, with, true)
                    .expect("fixture status")
            } else {
                created
            }
        }
    }
}

type Body = kube::client::Body;

impl tower::Service<Request<Body>> for MemoryApi {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if this.lock().hanging {
                return futures::future::pending().await;
            }
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let content_type = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let (code, value) = this.handle(
                &parts.method,
                parts.uri.path(),
                parts.uri.query().unwrap_or_default(),
                &content_type,
                &bytes,
            );
            Ok(Response::builder()
                .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(value.to_string())))
                .expect("response"))
        })
    }
}

/// The object's `metadata.finalizers`.
pub fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
