//! One way to keep an in-memory index current from a watch, for every resource bulwark
//! watches: the driver turns kube-runtime's watcher events into four calls (an object
//! changed, was deleted, was part of a (re)list, the list is complete) and reports failures;
//! the watch resumes on its own with bulwark's jittered back-off.

use std::time::Instant;

use futures::StreamExt;
use kube::{
    Api, Resource,
    runtime::watcher::{self, Event},
};

/// An index fed by one watch.
pub trait Index<K> {
    /// What a (re)list keeps of each object until the list is complete.
    type Listed: Send;

    /// An object was added or changed.
    fn apply(&mut self, obj: K, now: Instant);
    /// An object was deleted.
    fn delete(&mut self, obj: K, now: Instant);
    /// An object of a (re)list; what it returns is handed to [`Index::reset`] at the end.
    fn listed(&mut self, obj: K, now: Instant) -> Option<Self::Listed>;
    /// A (re)list is complete: `listed` is everything that exists now.
    fn reset(&mut self, listed: Vec<Self::Listed>, now: Instant);
    /// The watch (or a retry of it) failed; it resumes by itself.
    fn failed(&mut self, error: &watcher::Error, now: Instant);
}

/// Feeds `index` from a watch of `api` until the runtime stops.
pub async fn run<K, I>(api: Api<K>, config: watcher::Config, mut index: I)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    I: Index<K>,
{
    let mut listed = Vec::new();
    let mut events = std::pin::pin!(crate::backoff::watch(api, config));
    while let Some(event) = events.next().await {
        let now = Instant::now();
        match event {
            Ok(Event::Apply(obj)) => index.apply(obj, now),
            Ok(Event::Delete(obj)) => index.delete(obj, now),
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(obj)) => listed.extend(index.listed(obj, now)),
            // Taken, not drained: a drained Vec keeps the capacity of the whole cluster.
            Ok(Event::InitDone) => index.reset(std::mem::take(&mut listed), now),
            Err(e) => index.failed(&e, now),
        }
    }
}
