//! Reviews in and out: the AdmissionReview wire format ([`wire`], with the lean pod view of
//! [`lean`]), the defaults patch ([`defaults`]), hold mode's gate patch ([`hold`]), the
//! webhooks' answers ([`answer`]), which hand count and rate decisions to [`crate::quota`],
//! and the shape of a refusal for the client that gets it ([`caller`]).

pub mod answer;
pub mod caller;
pub mod defaults;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod hold;
pub mod lean;
pub mod wire;

use crate::{
    policy::{Policy, pod::PodRules},
    quota,
};
use caller::QueueingClients;

/// What the two webhooks decide by: `--config` but for the node controller's section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Settings {
    /// The policy of a namespace without annotations.
    pub defaults: Policy,
    pub pods: PodRules,
    pub quota: quota::Settings,
    /// Who is refused without `retryAfterSeconds`.
    pub queueing: QueueingClients,
    /// The user whose requests may remove bulwark's scheduling gate: the releaser's, the
    /// webhook's ServiceAccount (set at start from its namespace). Members of
    /// `system:masters` may too.
    pub releaser: Option<String>,
}
