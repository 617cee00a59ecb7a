//! Who a caller is, and what it may do.
//!
//! - Runners (`Collector.Report`): which node a stream speaks for. The runner sends its
//!   projected ServiceAccount token (audience [`AUDIENCE`]) as `authorization: Bearer …`;
//!   [`TokenReviewAuthenticator`] checks it with a TokenReview, requires the runner's
//!   ServiceAccount, and takes the node from the token's `authentication.kubernetes.io/node-name`
//!   extra (set for tokens bound to a pod).
//! - Readers (`Results.Watch`): whether a caller may read a job's result. The client sends its
//!   Kubernetes bearer token (`kubectl fathom tail` sends the kubeconfig's);
//!   [`AccessReviewAuthorizer`] authenticates it with a TokenReview (any audience the API server
//!   accepts) and asks a SubjectAccessReview whether that user may `get`
//!   `traceresults.fathom.dev` in the job's namespace (cluster-wide for a ClusterTraceJob): the
//!   same permission `kubectl get results` needs, so the live view shows no more than the
//!   stored one.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus, UserInfo},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use tonic::Status;

/// The audience of the runner's projected token.
pub const AUDIENCE: &str = "fathom-collector";
/// The token's extra naming the node of the pod it is bound to.
pub const NODE_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The runner's ServiceAccount, as a user name, by default.
pub const DEFAULT_RUNNER_USER: &str = "system:serviceaccount:fathom-system:fathom-node-runner";
/// How long a review's answer is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// Reviews kept at most.
pub const CACHE_ENTRIES: usize = 4096;
/// The resource a reader must be allowed to `get` to watch a job's result.
pub const RESULTS_RESOURCE: &str = "traceresults";
/// The verb a reader must be allowed on [`RESULTS_RESOURCE`].
pub const RESULTS_VERB: &str = "get";

/// Proves which node a caller is.
pub trait Authenticator: Send + Sync + 'static {
    /// The node `token` speaks for; `UNAUTHENTICATED` when it proves none.
    fn node_of<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<String, Status>>;
}

/// Decides whether a caller may watch a job's result (`Results.Watch`).
pub trait WatchAuthorizer: Send + Sync + 'static {
    /// Ok when the caller whose bearer token is `token` may `get` TraceResults in `namespace`
    /// (`None`: in every namespace, for a ClusterTraceJob); else `UNAUTHENTICATED` (the token
    /// proves no user) or `PERMISSION_DENIED` naming the missing permission.
    fn authorize_watch<'a>(
        &'a self,
        token: &'a str,
        namespace: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), Status>>;
}

/// The bearer token of a request's metadata, if it carries one.
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The runner's bearer token of a request's metadata.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<&str, Status> {
    bearer_token(metadata).ok_or_else(|| {
        Status::unauthenticated(
            "no `authorization: Bearer <token>` metadata: send the runner's projected ServiceAccount token (audience fathom-collector)",
        )
    })
}

/// A reader's bearer token of a request's metadata.
pub fn reader_bearer(metadata: &tonic::metadata::MetadataMap) -> Result<&str, Status> {
    bearer_token(metadata).ok_or_else(|| {
        Status::unauthenticated(
            "no `authorization: Bearer <token>` metadata: send your Kubernetes bearer token (kubectl fathom tail sends the kubeconfig's, or --token-file)",
        )
    })
}

/// The TokenReview that checks `token` for [`AUDIENCE`].
pub fn review_request(token: &str) -> TokenReview {
    TokenReview {
        spec: TokenReviewSpec {
            token: token.to_string(),
            audiences: Some(vec![AUDIENCE.to_string()]),
        },
        ..Default::default()
    }
}

/// The status of a TokenReview that authenticated its token; else why not.
fn authenticated(review: &TokenReview) -> Result<&TokenReviewStatus, String> {
    let status = review
        .status
        .as_ref()
        .ok_or("the TokenReview has no status")?;
    if status.authenticated != Some(true) {
        return Err(format!(
            "the token is not valid: {}",
            status.error.as_deref().unwrap_or("not authenticated")
        ));
    }
    Ok(status)
}

/// The node a TokenReview's answer proves, for a token that must belong to `runner_user`.
pub fn node_from_review(review: &TokenReview, runner_user: &str) -> Result<String, String> {
    let status = authenticated(review)?;
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == AUDIENCE))
    {
        return Err(format!("the token is not for the audience {AUDIENCE}"));
    }
    let user = status
        .user
        .as_ref()
        .ok_or("the TokenReview names no user")?;
    let name = user.username.as_deref().unwrap_or_default();
    if name != runner_user {
        return Err(format!(
            "the token is {name}'s, not the node runner's ({runner_user})"
        ));
    }
    user.extra
        .as_ref()
        .and_then(|e| e.get(NODE_EXTRA))
        .and_then(|v| v.first())
        .filter(|n| !n.is_empty())
        .cloned()
        .ok_or_else(|| {
            format!("the token names no node ({NODE_EXTRA}): mount a projected token bound to the runner's pod")
        })
}

/// Answers of reviews by key, each reused for [`CACHE_TTL`]; at most [`CACHE_ENTRIES`].
#[derive(Debug)]
struct ReviewCache<V> {
    entries: Mutex<HashMap<String, (Instant, V)>>,
}

impl<V: Clone> ReviewCache<V> {
    fn new() -> Self {
        ReviewCache {
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &str) -> Option<V> {
        let cache = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < CACHE_TTL)
            .map(|(_, v)| v.clone())
    }

    fn insert(&self, key: String, answer: V) {
        let mut cache = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), answer));
    }
}

/// Checks tokens with TokenReview (authentication.k8s.io/v1), caching answers for
/// [`CACHE_TTL`] in a bounded map.
pub struct TokenReviewAuthenticator {
    client: Client,
    runner_user: String,
    cache: ReviewCache<Result<String, String>>,
}

impl TokenReviewAuthenticator {
    pub fn new(client: Client, runner_user: impl Into<String>) -> Self {
        TokenReviewAuthenticator {
            client,
            runner_user: runner_user.into(),
            cache: ReviewCache::new(),
        }
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn node_of<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<String, Status>> {
        Box::pin(async move {
            let answer = match self.cache.get(token) {
                Some(a) => a,
                None => {
                    let api: Api<TokenReview> = Api::all(self.client.clone());
                    let review = api
                        .create(&PostParams::default(), &review_request(token))
                        .await
                        .map_err(|e| {
                            Status::unavailable(format!("could not review the token: {e}"))
                        })?;
                    let answer = node_from_review(&review, &self.runner_user);
                    self.cache.insert(token.to_string(), answer.clone());
                    answer
                }
            };
            answer.map_err(Status::unauthenticated)
        })
    }
}

/// The TokenReview that authenticates a reader's `token`: no audience, so the API server
/// checks it against its own audiences (a kubeconfig's token, a ServiceAccount token).
pub fn reader_review_request(token: &str) -> TokenReview {
    TokenReview {
        spec: TokenReviewSpec {
            token: token.to_string(),
            audiences: None,
        },
        ..Default::default()
    }
}

/// The user a reader's TokenReview proves.
pub fn reader_from_review(review: &TokenReview) -> Result<UserInfo, String> {
    authenticated(review)?
        .user
        .clone()
        .filter(|u| u.username.as_deref().is_some_and(|n| !n.is_empty()))
        .ok_or_else(|| "the TokenReview names no user".to_string())
}

/// The SubjectAccessReview asking whether `user` may `get` TraceResults in `namespace`
/// (`None`: in every namespace).
pub fn watch_access_review(user: &UserInfo, namespace: Option<&str>) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            uid: user.uid.clone(),
            groups: user.groups.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                group: Some(fathom_crds::job::GROUP.to_string()),
                resource: Some(RESULTS_RESOURCE.to_string()),
                verb: Some(RESULTS_VERB.to_string()),
                namespace: namespace.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// What a reader lacks, in words that name the grant: `get` on `traceresults.fathom.dev` in
/// the namespace, or cluster-wide.
pub fn missing_watch_permission(user: &str, namespace: Option<&str>) -> String {
    let group = fathom_crds::job::GROUP;
    match namespace {
        Some(ns) => format!(
            "{user} may not {RESULTS_VERB} {RESULTS_RESOURCE}.{group} in namespace {ns}: watching a TraceJob's result needs that permission (a Role with verbs [{RESULTS_VERB}] on {RESULTS_RESOURCE} in apiGroup {group}, bound in {ns})"
        ),
        None => format!(
            "{user} may not {RESULTS_VERB} {RESULTS_RESOURCE}.{group} cluster-wide: watching a ClusterTraceJob's result needs that permission (a ClusterRole with verbs [{RESULTS_VERB}] on {RESULTS_RESOURCE} in apiGroup {group} and a ClusterRoleBinding)"
        ),
    }
}

/// Whether a SubjectAccessReview's answer lets `user` watch: Ok, or the missing permission
/// (with the authorizer's reason when it gave one).
pub fn watch_decision(
    review: &SubjectAccessReview,
    user: &str,
    namespace: Option<&str>,
) -> Result<(), String> {
    let status = review.status.as_ref();
    if status.is_some_and(|s| s.allowed && s.denied != Some(true)) {
        return Ok(());
    }
    let mut message = missing_watch_permission(user, namespace);
    if let Some(reason) = status
        .and_then(|s| s.reason.as_deref().or(s.evaluation_error.as_deref()))
        .filter(|r| !r.is_empty())
    {
        message.push_str(&format!(" ({reason})"));
    }
    Err(message)
}

/// Why a reader may not watch: the token proves no user, or the user lacks the permission.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Refusal {
    Unauthenticated(String),
    PermissionDenied(String),
}

/// Authenticates readers with TokenReview and authorizes them with SubjectAccessReview
/// (authorization.k8s.io/v1), caching answers for [`CACHE_TTL`] per token and namespace.
pub struct AccessReviewAuthorizer {
    client: Client,
    cache: ReviewCache<Result<(), Refusal>>,
}

impl AccessReviewAuthorizer {
    pub fn new(client: Client) -> Self {
        AccessReviewAuthorizer {
            client,
            cache: ReviewCache::new(),
        }
    }

    async fn review(
        &self,
        token: &str,
        namespace: Option<&str>,
    ) -> Result<Result<(), Refusal>, Status> {
        let review = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &reader_review_request(token))
            .await
            .map_err(|e| Status::unavailable(format!("could not review the token: {e}")))?;
        let user = match reader_from_review(&review) {
            Ok(u) => u,
            Err(why) => return Ok(Err(Refusal::Unauthenticated(why))),
        };
        let name = user.username.clone().unwrap_or_default();
        let access = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(
                &PostParams::default(),
                &watch_access_review(&user, namespace),
            )
            .await
            .map_err(|e| {
                Status::unavailable(format!("could not review {name}'s access to results: {e}"))
            })?;
        Ok(watch_decision(&access, &name, namespace).map_err(Refusal::PermissionDenied))
    }
}

impl WatchAuthorizer for AccessReviewAuthorizer {
    fn authorize_watch<'a>(
        &'a self,
        token: &'a str,
        namespace: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), Status>> {
        Box::pin(async move {
            // A NUL never occurs in a namespace name: the key cannot be forged by another pair.
            let key = format!("{}\0{token}", namespace.unwrap_or(""));
            let answer = match self.cache.get(&key) {
                Some(a) => a,
                None => {
                    let answer = self.review(token, namespace).await?;
                    self.cache.insert(key, answer.clone());
                    answer
                }
            };
            answer.map_err(|r| match r {
                Refusal::Unauthenticated(why) => Status::unauthenticated(why),
                Refusal::PermissionDenied(why) => Status::permission_denied(why),
            })
        })
    }
}

/// Fixed readers: token → (user name, the namespaces whose results it may read; `None` in the
/// list: cluster-wide). For tests and development.
#[derive(Debug, Default, Clone)]
pub struct StaticReaders(pub HashMap<String, (String, Vec<Option<String>>)>);

impl WatchAuthorizer for StaticReaders {
    fn authorize_watch<'a>(
        &'a self,
        token: &'a str,
        namespace: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), Status>> {
        let r = match self.0.get(token) {
            None => Err(Status::unauthenticated("unknown token")),
            Some((user, allowed)) => {
                if allowed
                    .iter()
                    .any(|a| a.is_none() || a.as_deref() == namespace)
                {
                    Ok(())
                } else {
                    Err(Status::permission_denied(missing_watch_permission(
                        user, namespace,
                    )))
                }
            }
        };
        Box::pin(async move { r })
    }
}

/// Maps fixed tokens to nodes: for tests and development.
#[derive(Debug, Default, Clone)]
pub struct StaticTokens(pub HashMap<String, String>);

impl Authenticator for StaticTokens {
    fn node_of<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<String, Status>> {
        let r = self
            .0
            .get(token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown token"));
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn answer(user: &str, node: Option<&str>, ok: bool) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(ok),
                audiences: Some(vec![AUDIENCE.into()]),
                user: Some(UserInfo {
                    username: Some(user.into()),
                    extra: node.map(|n| BTreeMap::from([(NODE_EXTRA.into(), vec![n.into()])])),
                    ..Default::default()
                }),
                error: (!ok).then(|| "token expired".into()),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_request_names_the_token_and_the_audience() {
        let r = review_request("t0k");
        assert_eq!(r.spec.token, "t0k");
        assert_eq!(r.spec.audiences, Some(vec!["fathom-collector".to_string()]));
    }

    #[test]
    fn the_node_comes_from_the_extra_of_the_runner_user() {
        assert_eq!(
            node_from_review(
                &answer(DEFAULT_RUNNER_USER, Some("node-a"), true),
                DEFAULT_RUNNER_USER
            ),
            Ok("node-a".to_string())
        );
        let other = node_from_review(
            &answer("system:serviceaccount:default:x", Some("node-a"), true),
            DEFAULT_RUNNER_USER,
        )
        .unwrap_err();
        assert!(other.contains("not the node runner's"), "{other}");
        let no_node = node_from_review(
            &answer(DEFAULT_RUNNER_USER, None, true),
            DEFAULT_RUNNER_USER,
        )
        .unwrap_err();
        assert!(no_node.contains(NODE_EXTRA), "{no_node}");
        let bad = node_from_review(
            &answer(DEFAULT_RUNNER_USER, Some("node-a"), false),
            DEFAULT_RUNNER_USER,
        )
        .unwrap_err();
        assert!(bad.contains("token expired"), "{bad}");
        let mut wrong_aud = answer(DEFAULT_RUNNER_USER, Some("node-a"), true);
        wrong_aud.status.as_mut().expect("status").audiences = Some(vec!["api".into()]);
        assert!(node_from_review(&wrong_aud, DEFAULT_RUNNER_USER).is_err());
    }

    fn reader_answer(ok: bool, user: Option<&str>) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(ok),
                user: user.map(|u| UserInfo {
                    username: Some(u.into()),
                    uid: Some("uid-7".into()),
                    groups: Some(vec!["devs".into()]),
                    extra: Some(BTreeMap::from([("scopes".into(), vec!["a".into()])])),
                }),
                error: (!ok).then(|| "token expired".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn readers_are_reviewed_for_any_audience_the_api_server_accepts() {
        let r = reader_review_request("t0k");
        assert_eq!(r.spec.token, "t0k");
        assert_eq!(r.spec.audiences, None);
        let user = reader_from_review(&reader_answer(true, Some("jane"))).expect("a user");
        assert_eq!(user.username.as_deref(), Some("jane"));
        let bad = reader_from_review(&reader_answer(false, None)).unwrap_err();
        assert!(bad.contains("token expired"), "{bad}");
        assert!(reader_from_review(&reader_answer(true, None)).is_err());
    }

    #[test]
    fn the_access_review_asks_for_get_on_traceresults_with_the_whole_identity() {
        let user = reader_from_review(&reader_answer(true, Some("jane"))).expect("a user");
        let sar = watch_access_review(&user, Some("demo"));
        assert_eq!(sar.spec.user.as_deref(), Some("jane"));
        assert_eq!(sar.spec.uid.as_deref(), Some("uid-7"));
        assert_eq!(sar.spec.groups, Some(vec!["devs".to_string()]));
        assert!(
            sar.spec
                .extra
                .as_ref()
                .is_some_and(|e| e.contains_key("scopes"))
        );
        let attrs = sar.spec.resource_attributes.expect("resource attributes");
        assert_eq!(attrs.group.as_deref(), Some("fathom.dev"));
        assert_eq!(attrs.resource.as_deref(), Some("traceresults"));
        assert_eq!(attrs.verb.as_deref(), Some("get"));
        assert_eq!(attrs.namespace.as_deref(), Some("demo"));
        let cluster = watch_access_review(&user, None);
        assert_eq!(
            cluster.spec.resource_attributes.expect("attrs").namespace,
            None,
            "a ClusterTraceJob's result needs the permission cluster-wide"
        );
    }

    #[test]
    fn a_denied_review_names_the_missing_permission() {
        use k8s_openapi::api::authorization::v1::SubjectAccessReviewStatus;
        let answer = |allowed: bool, reason: Option<&str>| SubjectAccessReview {
            status: Some(SubjectAccessReviewStatus {
                allowed,
                reason: reason.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            watch_decision(&answer(true, None), "jane", Some("demo")),
            Ok(())
        );
        let denied = watch_decision(
            &answer(false, Some("no RBAC policy matched")),
            "jane",
            Some("demo"),
        )
        .unwrap_err();
        assert!(
            denied.starts_with("jane may not get traceresults.fathom.dev in namespace demo"),
            "{denied}"
        );
        assert!(denied.contains("no RBAC policy matched"), "{denied}");
        let cluster = watch_decision(&answer(false, None), "jane", None).unwrap_err();
        assert!(cluster.contains("cluster-wide"), "{cluster}");
        assert!(watch_decision(&SubjectAccessReview::default(), "jane", None).is_err());
    }

    #[tokio::test]
    async fn static_readers_allow_their_namespaces_only() {
        let readers = StaticReaders(HashMap::from([
            (
                "t-dev".to_string(),
                ("dev".to_string(), vec![Some("demo".to_string())]),
            ),
            ("t-admin".to_string(), ("admin".to_string(), vec![None])),
        ]));
        assert!(readers.authorize_watch("t-dev", Some("demo")).await.is_ok());
        let denied = readers
            .authorize_watch("t-dev", Some("other"))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(readers.authorize_watch("t-dev", None).await.is_err());
        assert!(readers.authorize_watch("t-admin", None).await.is_ok());
        assert_eq!(
            readers
                .authorize_watch("nope", Some("demo"))
                .await
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn bearer_tokens_are_read_from_the_metadata() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer(&m).unwrap_err().code(), tonic::Code::Unauthenticated);
        m.insert("authorization", "Bearer abc".parse().expect("ascii"));
        assert_eq!(bearer(&m).expect("token"), "abc");
    }
}
