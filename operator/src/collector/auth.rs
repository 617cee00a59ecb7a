//! Which node a stream speaks for. The runner sends its projected ServiceAccount token
//! (audience [`AUDIENCE`]) as `authorization: Bearer …`; [`TokenReviewAuthenticator`] checks
//! it with a TokenReview, requires the runner's ServiceAccount, and takes the node from the
//! token's `authentication.kubernetes.io/node-name` extra (set for tokens bound to a pod).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
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

/// Proves which node a caller is.
pub trait Authenticator: Send + Sync + 'static {
    /// The node `token` speaks for; `UNAUTHENTICATED` when it proves none.
    fn node_of<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<String, Status>>;
}

/// The bearer token of a request's metadata.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<&str, Status> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated(
                "no `authorization: Bearer <token>` metadata: send the runner's projected ServiceAccount token (audience fathom-collector)",
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

/// The node a TokenReview's answer proves, for a token that must belong to `runner_user`.
pub fn node_from_review(review: &TokenReview, runner_user: &str) -> Result<String, String> {
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

/// A review's answer and when it came: the node, or why not.
type Review = (Instant, Result<String, String>);

/// Checks tokens with TokenReview (authentication.k8s.io/v1), caching answers for
/// [`CACHE_TTL`] in a bounded map.
pub struct TokenReviewAuthenticator {
    client: Client,
    runner_user: String,
    cache: Mutex<HashMap<String, Review>>,
}

impl TokenReviewAuthenticator {
    pub fn new(client: Client, runner_user: impl Into<String>) -> Self {
        TokenReviewAuthenticator {
            client,
            runner_user: runner_user.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, token: &str) -> Option<Result<String, String>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(token)
            .filter(|(at, _)| at.elapsed() < CACHE_TTL)
            .map(|(_, r)| r.clone())
    }

    fn remember(&self, token: &str, answer: Result<String, String>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(token.to_string(), (Instant::now(), answer));
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn node_of<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<String, Status>> {
        Box::pin(async move {
            let answer = match self.cached(token) {
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
                    self.remember(token, answer.clone());
                    answer
                }
            };
            answer.map_err(Status::unauthenticated)
        })
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

    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

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

    #[test]
    fn bearer_tokens_are_read_from_the_metadata() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer(&m).unwrap_err().code(), tonic::Code::Unauthenticated);
        m.insert("authorization", "Bearer abc".parse().expect("ascii"));
        assert_eq!(bearer(&m).expect("token"), "abc");
    }
}
