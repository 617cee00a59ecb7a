//! An in-memory Kubernetes API server, as a tower `Service` behind a real `kube::Client`.
//!
//! No API server can run on the test machine, so the reconciler's calls go here. It keeps the
//! semantics the operator relies on, and records every request so tests can count writes:
//! - create/get/list (label selectors `k=v`, `k!=v`, `k`, `!k`)/replace/delete;
//! - `resourceVersion` on every write; optimistic concurrency on replace and on merge
//!   patches that carry `metadata.resourceVersion` (409 Conflict);
//! - `metadata.generation` moves only when `spec` changes;
//! - status subresource: writes to the object ignore `status`, writes to `/status` change
//!   only `status`;
//! - server-side apply (`application/apply-patch+yaml`, a field manager required): fields the
//!   same manager applied before and no longer applies are removed, the rest is merged
//!   (objects recursively, lists and scalars replaced), as for objects one manager owns;
//! - merge patches (RFC 7386);
//! - finalizers: deleting an object with finalizers sets `deletionTimestamp`; the object goes
//!   when its last finalizer is removed; deleting an object deletes its dependents
//!   (`ownerReferences`), as the garbage collector does.
//!
//! Not modelled: watches (tests call the reconciler directly), field ownership conflicts,
//! strategic merge, admission (the CRDs' CEL rules are tested offline with kube-cel).

use std::{
    collections::{BTreeMap, HashMap},
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
    /// The request body, as sent.
    pub body: String,
}

impl Call {
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }

    pub fn field_manager(&self) -> Option<String> {
        self.query
            .split('&')
            .find_map(|kv| kv.strip_prefix("fieldManager="))
            .map(str::to_string)
    }
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
    rv: u64,
    uid: u64,
    calls: Vec<Call>,
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

    fn apply(
        &self,
        state: &mut State,
        key: Key,
        status: bool,
        manager: String,
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
        let slot = (key.clone(), manager, status);
        let Some(current) = state.objects.get(&key).cloned() else {
            if status {
                return Err(status_error(
                    404,
                    "NotFound",
                    format!("{} \"{}\" not found", key.plural, key.name),
                ));
            }
            let created = self.create(state, key, config.clone())?;
            state.applied.insert(slot, config);
            return Ok(created);
        };
        let mut next = current.clone();
        if let Some(prev) = state.applied.get(&slot) {
            remove_dropped(&mut next, prev, Some(&config));
        }
        merge(&mut next, &config);
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
        state.calls.push(Call {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            content_type: content_type.to_string(),
            body: String::from_utf8_lossy(body).into_owned(),
        });
        let Some((key, sub)) = parse_path(path) else {
            return status_error(404, "NotFound", format!("no route {path}"));
        };
        if query.contains("watch=true") || query.contains("watch=1") {
            return status_error(405, "MethodNotAllowed", "watches are not modelled");
        }
        let status_sub = sub.as_deref() == Some("status");
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
                        ..key
                    };
                    self.create(&mut state, key, body)
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
                match query_param(query, "fieldManager") {
                    None => Err(status_error(
                        422,
                        "Invalid",
                        "fieldManager is required for apply",
                    )),
                    Some(m) => self.apply(&mut state, key, status_sub, m, body),
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
            let created = self
                .create(&mut state, key.clone(), obj.clone())
                .expect("create fixture");
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
