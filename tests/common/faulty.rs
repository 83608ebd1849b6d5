//! [`FaultyStore`]: wraps any [`ObjectStore`] and injects failures by rule, for tests of the
//! filesystem core (Mountpoint's `failure_client.rs`). It lives in tests only, never in the
//! release binary.
//!
//! A [`Rule`] picks calls by kind ([`CallKind`]) and optionally by key, fires on the Nth matching
//! call, on every one, or with a probability from the store's seeded RNG, and then
//! - fails the call ([`Fault::Fail`], a 503 by default: transient, as the SDK reports it after
//!   its own retries),
//! - delays it and lets it through ([`Fault::Delay`]),
//! - or cuts its reply ([`Fault::Cut`]): the call reaches the inner store, so its effect happens,
//!   but a GET's body breaks off half way with a transient [`S3Error::Body`], and any other call
//!   returns that error instead of its result (a lost reply).
//!
//! Rules are checked in the order they were added; the first that fires decides. Every call is
//! counted per kind, and every injected fault is counted and remembered (kind, key, fault), so a
//! test can name what it injected. With one seed the same sequence of calls gets the same faults.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use s3csi::s3::{
    CompletedPart, Copied, GetObject, ListPage, ObjectId, ObjectMeta, ObjectStart, ObjectStore, S3Error, UserMetadata,
};

/// The kinds of calls a rule can select. `get_range` and `get_object_start` are both `Get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CallKind {
    Put,
    Get,
    Head,
    List,
    Copy,
    CreateMultipart,
    UploadPart,
    UploadPartCopy,
    Complete,
    Abort,
    Delete,
}

impl CallKind {
    pub const ALL: [CallKind; 11] = [
        CallKind::Put,
        CallKind::Get,
        CallKind::Head,
        CallKind::List,
        CallKind::Copy,
        CallKind::CreateMultipart,
        CallKind::UploadPart,
        CallKind::UploadPartCopy,
        CallKind::Complete,
        CallKind::Abort,
        CallKind::Delete,
    ];

    /// Calls that change the bucket.
    pub const WRITES: [CallKind; 8] = [
        CallKind::Put,
        CallKind::Copy,
        CallKind::CreateMultipart,
        CallKind::UploadPart,
        CallKind::UploadPartCopy,
        CallKind::Complete,
        CallKind::Abort,
        CallKind::Delete,
    ];

    fn operation(self) -> &'static str {
        match self {
            CallKind::Put => "PutObject",
            CallKind::Get => "GetObject",
            CallKind::Head => "HeadObject",
            CallKind::List => "ListObjectsV2",
            CallKind::Copy => "CopyObject",
            CallKind::CreateMultipart => "CreateMultipartUpload",
            CallKind::UploadPart => "UploadPart",
            CallKind::UploadPartCopy => "UploadPartCopy",
            CallKind::Complete => "CompleteMultipartUpload",
            CallKind::Abort => "AbortMultipartUpload",
            CallKind::Delete => "DeleteObject",
        }
    }
}

/// What a rule does to a call it fires on.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The call fails with this error and never reaches the inner store.
    Fail(S3Error),
    /// The call waits this long, then goes through unchanged.
    Delay(Duration),
    /// The call goes through, but its reply breaks off with a transient [`S3Error::Body`].
    Cut,
}

/// Which matching calls a rule fires on.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    /// The Nth matching call (1-based), once.
    Nth(usize),
    /// Every matching call.
    Every,
    /// Each matching call with this probability, from the store's seeded RNG.
    Chance(f64),
}

type KeyPredicate = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Selects calls and says what to do with them. Build with [`Rule::on`] or [`Rule::any`].
#[derive(Clone)]
pub struct Rule {
    kinds: Vec<CallKind>,
    key: Option<KeyPredicate>,
    trigger: Trigger,
    fault: Fault,
    /// Fires at most this many times.
    limit: Option<usize>,
    /// Matching calls seen so far.
    seen: usize,
    fired: usize,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("kinds", &self.kinds)
            .field("key", &self.key.as_ref().map(|_| "<predicate>"))
            .field("trigger", &self.trigger)
            .field("fault", &self.fault)
            .field("limit", &self.limit)
            .finish()
    }
}

/// The error [`Fault::Fail`] injects by default: what the SDK reports once its retries of a
/// 503 are used up.
pub fn unavailable(kind: CallKind) -> S3Error {
    S3Error::Service {
        operation: kind.operation(),
        status: 503,
        code: "SlowDown".into(),
        message: "injected failure".into(),
    }
}

impl Rule {
    /// Calls of one kind. By default the rule fails every such call with a 503.
    pub fn on(kind: CallKind) -> Rule {
        Rule::on_kinds(&[kind])
    }

    /// Calls of any of `kinds` (all kinds when empty).
    pub fn on_kinds(kinds: &[CallKind]) -> Rule {
        Rule {
            kinds: kinds.to_vec(),
            key: None,
            trigger: Trigger::Every,
            fault: Fault::Fail(unavailable(CallKind::Put)),
            limit: None,
            seen: 0,
            fired: 0,
        }
    }

    /// Calls of every kind.
    pub fn any() -> Rule {
        Rule::on_kinds(&[])
    }

    /// Only calls whose key (the destination of a copy, the prefix of a listing) satisfies `f`.
    pub fn key(mut self, f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Rule {
        self.key = Some(Arc::new(f));
        self
    }

    /// Only calls whose key contains `part`.
    pub fn key_contains(self, part: &str) -> Rule {
        let part = part.to_owned();
        self.key(move |k| k.contains(&part))
    }

    /// Fires on the Nth matching call (1-based) only.
    pub fn nth(mut self, n: usize) -> Rule {
        assert!(n >= 1, "calls are counted from 1");
        self.trigger = Trigger::Nth(n);
        self
    }

    /// Fires on each matching call with probability `p`.
    pub fn chance(mut self, p: f64) -> Rule {
        assert!((0.0..=1.0).contains(&p), "a probability, not {p}");
        self.trigger = Trigger::Chance(p);
        self
    }

    /// Fires at most `n` times.
    pub fn times(mut self, n: usize) -> Rule {
        self.limit = Some(n);
        self
    }

    /// Fails the call with a 503 (the default).
    pub fn fail(mut self) -> Rule {
        let kind = self.kinds.first().copied().unwrap_or(CallKind::Put);
        self.fault = Fault::Fail(unavailable(kind));
        self
    }

    /// Fails the call with `error`.
    pub fn fail_with(mut self, error: S3Error) -> Rule {
        self.fault = Fault::Fail(error);
        self
    }

    /// Delays the call by `d`, then lets it through.
    pub fn delay(mut self, d: Duration) -> Rule {
        self.fault = Fault::Delay(d);
        self
    }

    /// Lets the call through and cuts its reply.
    pub fn cut(mut self) -> Rule {
        self.fault = Fault::Cut;
        self
    }

    fn matches(&self, kind: CallKind, key: &str) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&kind)) && self.key.as_ref().is_none_or(|f| f(key))
    }
}

/// One injected fault, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    pub kind: CallKind,
    pub key: String,
    pub fault: String,
}

#[derive(Debug)]
struct State {
    rules: Vec<Rule>,
    rng: StdRng,
    calls: BTreeMap<CallKind, usize>,
    faults: BTreeMap<CallKind, usize>,
    /// Calls failed or cut (not merely delayed).
    failures: usize,
    injected: Vec<Injected>,
}

/// An [`ObjectStore`] that passes calls to `inner`, injecting faults by rule.
pub struct FaultyStore<S> {
    inner: Arc<S>,
    state: Mutex<State>,
}

impl<S> std::fmt::Debug for FaultyStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock().unwrap();
        f.debug_struct("FaultyStore").field("rules", &state.rules).field("faults", &state.faults).finish()
    }
}

/// What to do with one call, decided before it runs.
enum Decision {
    Pass,
    Fail(S3Error),
    Delay(Duration),
    Cut,
}

impl<S: ObjectStore> FaultyStore<S> {
    /// Wraps `inner`; `seed` drives [`Rule::chance`].
    pub fn new(inner: Arc<S>, seed: u64) -> FaultyStore<S> {
        FaultyStore {
            inner,
            state: Mutex::new(State {
                rules: Vec::new(),
                rng: StdRng::seed_from_u64(seed),
                calls: BTreeMap::new(),
                faults: BTreeMap::new(),
                failures: 0,
                injected: Vec::new(),
            }),
        }
    }

    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// Adds a rule after the existing ones.
    pub fn add(&self, rule: Rule) {
        self.state.lock().unwrap().rules.push(rule);
    }

    /// Removes every rule: from now on every call goes through.
    pub fn clear(&self) {
        self.state.lock().unwrap().rules.clear();
    }

    /// Calls of `kind` so far, faulted or not.
    pub fn calls(&self, kind: CallKind) -> usize {
        self.state.lock().unwrap().calls.get(&kind).copied().unwrap_or(0)
    }

    /// Faults injected into calls of `kind` so far.
    pub fn faults(&self, kind: CallKind) -> usize {
        self.state.lock().unwrap().faults.get(&kind).copied().unwrap_or(0)
    }

    /// Faults injected so far, all kinds.
    pub fn total_faults(&self) -> usize {
        self.state.lock().unwrap().faults.values().sum()
    }

    /// Calls failed or cut so far (delays not counted): what can make an operation fail.
    pub fn failures(&self) -> usize {
        self.state.lock().unwrap().failures
    }

    /// Calls per kind so far.
    pub fn call_counts(&self) -> BTreeMap<CallKind, usize> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Every fault injected so far, in order.
    pub fn injected(&self) -> Vec<Injected> {
        self.state.lock().unwrap().injected.clone()
    }

    /// Counts the call and decides its fate by the first rule that fires.
    fn decide(&self, kind: CallKind, key: &str) -> Decision {
        let mut guard = self.state.lock().unwrap();
        let state = &mut *guard;
        *state.calls.entry(kind).or_default() += 1;
        let mut chosen = None;
        for rule in state.rules.iter_mut() {
            if !rule.matches(kind, key) {
                continue;
            }
            rule.seen += 1;
            if chosen.is_some() || rule.limit.is_some_and(|l| rule.fired >= l) {
                continue;
            }
            let fires = match rule.trigger {
                Trigger::Nth(n) => rule.seen == n,
                Trigger::Every => true,
                Trigger::Chance(p) => state.rng.random_bool(p),
            };
            if fires {
                rule.fired += 1;
                chosen = Some(rule.fault.clone());
            }
        }
        let Some(fault) = chosen else { return Decision::Pass };
        let fault = match fault {
            Fault::Fail(S3Error::Service { status, code, message, .. }) => {
                Fault::Fail(S3Error::Service { operation: kind.operation(), status, code, message })
            }
            other => other,
        };
        *state.faults.entry(kind).or_default() += 1;
        if !matches!(fault, Fault::Delay(_)) {
            state.failures += 1;
        }
        let described = match &fault {
            Fault::Fail(e) => format!("fail: {e}"),
            Fault::Delay(d) => format!("delay {d:?}"),
            Fault::Cut => "cut".to_owned(),
        };
        state.injected.push(Injected { kind, key: key.to_owned(), fault: described });
        match fault {
            Fault::Fail(e) => Decision::Fail(e),
            Fault::Delay(d) => Decision::Delay(d),
            Fault::Cut => Decision::Cut,
        }
    }

    /// Runs a non-GET call under the rules.
    async fn run<T, F>(&self, kind: CallKind, key: &str, call: F) -> Result<T, S3Error>
    where
        F: std::future::Future<Output = Result<T, S3Error>>,
    {
        match self.decide(kind, key) {
            Decision::Pass => call.await,
            Decision::Fail(e) => Err(e),
            Decision::Delay(d) => {
                tokio::time::sleep(d).await;
                call.await
            }
            Decision::Cut => {
                call.await?;
                Err(S3Error::Body(key.to_owned(), "injected: the reply broke off".into()))
            }
        }
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for FaultyStore<S> {
    fn bucket(&self) -> &str {
        self.inner.bucket()
    }

    async fn check_access(&self, prefix: &str) -> Result<(), S3Error> {
        self.inner.check_access(prefix).await
    }

    async fn head_object(&self, key: &str) -> Result<ObjectMeta, S3Error> {
        self.run(CallKind::Head, key, self.inner.head_object(key)).await
    }

    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, S3Error> {
        self.run(CallKind::List, prefix, self.inner.list_page(prefix, delimiter, token, max_keys)).await
    }

    async fn get_range(&self, object: &ObjectId, range: Range<u64>) -> Result<GetObject, S3Error> {
        let key = object.key.clone();
        match self.decide(CallKind::Get, &key) {
            Decision::Pass => self.inner.get_range(object, range).await,
            Decision::Fail(e) => Err(e),
            Decision::Delay(d) => {
                tokio::time::sleep(d).await;
                self.inner.get_range(object, range).await
            }
            Decision::Cut => {
                let got = self.inner.get_range(object, range).await?;
                // Half the body (in whole chunks, at least one byte when there is any), then
                // a broken connection.
                let chunks: Vec<Result<Bytes, S3Error>> = got.body.collect().await;
                let mut data = Vec::new();
                for c in chunks {
                    data.extend_from_slice(&c?);
                }
                let keep = data.len() / 2;
                let mut out: Vec<Result<Bytes, S3Error>> = Vec::new();
                if keep > 0 {
                    out.push(Ok(Bytes::from(data[..keep].to_vec())));
                }
                out.push(Err(S3Error::Body(key, "injected: the body broke off".into())));
                Ok(GetObject { etag: got.etag, body: futures::stream::iter(out).boxed() })
            }
        }
    }

    async fn get_object_start(&self, key: &str, len: u64) -> Result<ObjectStart, S3Error> {
        self.run(CallKind::Get, key, self.inner.get_object_start(key, len)).await
    }

    async fn put_object(&self, key: &str, body: Bytes, metadata: &UserMetadata) -> Result<String, S3Error> {
        self.run(CallKind::Put, key, self.inner.put_object(key, body, metadata)).await
    }

    async fn create_multipart_upload(&self, key: &str, metadata: &UserMetadata) -> Result<String, S3Error> {
        self.run(CallKind::CreateMultipart, key, self.inner.create_multipart_upload(key, metadata)).await
    }

    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Bytes) -> Result<String, S3Error> {
        self.run(CallKind::UploadPart, key, self.inner.upload_part(key, upload_id, number, body)).await
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &ObjectId,
        range: Range<u64>,
    ) -> Result<String, S3Error> {
        self.run(CallKind::UploadPartCopy, key, self.inner.upload_part_copy(key, upload_id, number, source, range))
            .await
    }

    async fn complete_multipart_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<String, S3Error> {
        self.run(CallKind::Complete, key, self.inner.complete_multipart_upload(key, upload_id, parts)).await
    }

    async fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        self.run(CallKind::Abort, key, self.inner.abort_multipart_upload(key, upload_id)).await
    }

    async fn copy_object(
        &self,
        source: &ObjectId,
        dest_key: &str,
        metadata: Option<&UserMetadata>,
    ) -> Result<Copied, S3Error> {
        self.run(CallKind::Copy, dest_key, self.inner.copy_object(source, dest_key, metadata)).await
    }

    async fn delete_object(&self, key: &str) -> Result<(), S3Error> {
        self.run(CallKind::Delete, key, self.inner.delete_object(key)).await
    }
}
