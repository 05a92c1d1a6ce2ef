//! The cluster as bulwark's decisions see it, kept in memory from watches: the compact
//! [`cache`] behind the quota's `ClusterView` port, fed by [`feeds`] through the one watch
//! [`index`] driver; [`peers`] (the webhook replicas sharing each namespace's rate),
//! [`events`] (annotation problems published as Events) and [`throttled`] (refusals summed
//! up as Throttled Events).

pub mod cache;
pub mod events;
pub mod feeds;
pub mod index;
pub mod peers;
pub mod throttled;
