//! Who sent the creation, as far as the shape of a refusal goes. client-go retries a 429 that
//! carries `Retry-After` inside the call, sleeping the whole seconds it names: right for
//! kubectl, CI bots and kube-rs clients, which have nothing better to do, but a controller's
//! worker that sleeps there stops working off its queue (the Job controller has five, sharing
//! one client, and waits for each slow-start batch). Clients that queue their own work are
//! refused without `retryAfterSeconds`, so the call fails at once and their work queue's
//! back-off paces them instead (docs/architecture.md, "Refusals shaped to the client").

use k8s_openapi::api::authentication::v1::UserInfo;

/// kube-controller-manager's controllers that create pods: its own identity (one shared
/// client) and, with `--use-service-account-credentials`, each controller's ServiceAccount.
pub const CONTROLLERS: [&str; 7] = [
    "system:kube-controller-manager",
    "system:serviceaccount:kube-system:job-controller",
    "system:serviceaccount:kube-system:replicaset-controller",
    "system:serviceaccount:kube-system:statefulset-controller",
    "system:serviceaccount:kube-system:daemon-set-controller",
    "system:serviceaccount:kube-system:replication-controller",
    "system:serviceaccount:kube-system:cronjob-controller",
];

/// How a refusal is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalForm {
    /// `details.retryAfterSeconds`: kube-apiserver sends `Retry-After`, client-go waits it
    /// out inside the call.
    RetryAfter,
    /// No `retryAfterSeconds`: the call fails at once and the client's own queue retries.
    Immediate,
}

impl RefusalForm {
    /// A bounded label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            RefusalForm::RetryAfter => "retry_after",
            RefusalForm::Immediate => "immediate",
        }
    }
}

/// The clients refused without `retryAfterSeconds` (`--config`: `queueingControllers`,
/// `queueingClients`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueingClients {
    /// kube-controller-manager's pod-creating controllers ([`CONTROLLERS`]).
    pub controllers: bool,
    /// More usernames or groups, e.g. a workflow engine's ServiceAccount.
    pub names: Vec<String>,
}

impl Default for QueueingClients {
    fn default() -> Self {
        QueueingClients {
            controllers: true,
            names: Vec::new(),
        }
    }
}

impl QueueingClients {
    /// The form of a refusal for `user`. Only the API server's authenticated identity counts;
    /// the form never changes what is admitted, only how a refused client waits.
    pub fn form(&self, user: &UserInfo) -> RefusalForm {
        let username = user.username.as_deref().unwrap_or_default();
        let groups = user.groups.as_deref().unwrap_or_default();
        let listed = |name: &str| name == username || groups.iter().any(|g| g == name);
        let queues = (self.controllers && CONTROLLERS.contains(&username))
            || self.names.iter().any(|n| listed(n));
        if queues {
            RefusalForm::Immediate
        } else {
            RefusalForm::RetryAfter
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            username: Some(name.into()),
            groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
            ..UserInfo::default()
        }
    }

    #[test]
    fn controllers_queue_their_own_work_everyone_else_gets_retry_after() {
        let q = QueueingClients::default();
        for name in CONTROLLERS {
            assert_eq!(q.form(&user(name, &[])), RefusalForm::Immediate, "{name}");
        }
        for (name, groups) in [
            ("kubectl-admin", &["system:masters"][..]),
            (
                "system:serviceaccount:ci:bot",
                &["system:serviceaccounts"][..],
            ),
            // A look-alike in another namespace is not the controller.
            ("system:serviceaccount:tenant:job-controller", &[][..]),
            ("", &[][..]),
        ] {
            assert_eq!(
                q.form(&user(name, groups)),
                RefusalForm::RetryAfter,
                "{name}"
            );
        }
        assert_eq!(q.form(&UserInfo::default()), RefusalForm::RetryAfter);
    }

    #[test]
    fn the_config_list_matches_usernames_and_groups() {
        let q = QueueingClients {
            controllers: true,
            names: vec![
                "system:serviceaccount:argo:argo-workflow-controller".into(),
                "ci-runners".into(),
            ],
        };
        let argo = user("system:serviceaccount:argo:argo-workflow-controller", &[]);
        assert_eq!(q.form(&argo), RefusalForm::Immediate);
        let runner = user("runner-7", &["system:authenticated", "ci-runners"]);
        assert_eq!(q.form(&runner), RefusalForm::Immediate);
        assert_eq!(
            q.form(&user("runner-7", &["other"])),
            RefusalForm::RetryAfter
        );
    }

    #[test]
    fn controllers_can_be_given_retry_after_again() {
        let q = QueueingClients {
            controllers: false,
            names: vec![],
        };
        let job = user("system:serviceaccount:kube-system:job-controller", &[]);
        assert_eq!(q.form(&job), RefusalForm::RetryAfter);
    }
}
