//! AdmissionReviews as kube-apiserver sends them, read from `tests/data/`, for the unit tests,
//! the integration tests and the benches (feature `fixtures`). One fixture per kind of review;
//! a test changes only the fields it is about.

use serde_json::{Value, json};

/// A pod CREATE by the Job controller: one container without resources.
const POD_CREATE: &str = include_str!("../../../tests/data/pod-create.json");
/// A realistic Job pod of about 3 KiB, after the API server's defaulting.
const JOB_POD_CREATE: &str = include_str!("../../../tests/data/job-pod-create.json");
/// A Deployment CREATE: not a pod, passed through.
const DEPLOYMENT_CREATE: &str = include_str!("../../../tests/data/deployment-create.json");

/// A review being shaped for a test.
#[derive(Debug, Clone)]
pub struct Fixture(Value);

fn parse(text: &str) -> Fixture {
    Fixture(serde_json::from_str(text).expect("tests/data holds valid JSON"))
}

impl Fixture {
    pub fn pod_create() -> Fixture {
        parse(POD_CREATE)
    }

    pub fn job_pod_create() -> Fixture {
        parse(JOB_POD_CREATE)
    }

    pub fn deployment_create() -> Fixture {
        parse(DEPLOYMENT_CREATE)
    }

    pub fn uid(mut self, uid: &str) -> Fixture {
        self.0["request"]["uid"] = json!(uid);
        self
    }

    /// The request's namespace and, where it has one, the object's.
    pub fn namespace(mut self, namespace: &str) -> Fixture {
        self.0["request"]["namespace"] = json!(namespace);
        if let Some(meta) = self.0["request"]["object"]["metadata"].as_object_mut()
            && meta.contains_key("namespace")
        {
            meta.insert("namespace".into(), json!(namespace));
        }
        self
    }

    /// The object's name.
    pub fn name(mut self, name: &str) -> Fixture {
        self.0["request"]["object"]["metadata"]["name"] = json!(name);
        self
    }

    /// The user the API server authenticated the request as.
    pub fn user(mut self, username: &str, groups: &[&str]) -> Fixture {
        self.0["request"]["userInfo"] = json!({"username": username, "groups": groups});
        self
    }

    pub fn dry_run(mut self, dry_run: bool) -> Fixture {
        self.0["request"]["dryRun"] = json!(dry_run);
        self
    }

    /// Replaces the object under review.
    pub fn object(mut self, object: Value) -> Fixture {
        self.0["request"]["object"] = object;
        self
    }

    /// The request's kind and resource names (group and version stay).
    pub fn kind(mut self, kind: &str, resource: &str) -> Fixture {
        let request = &mut self.0["request"];
        for key in ["kind", "requestKind"] {
            request[key]["kind"] = json!(kind);
        }
        for key in ["resource", "requestResource"] {
            request[key]["resource"] = json!(resource);
        }
        self
    }

    /// The object under review, to change it in place.
    pub fn object_mut(&mut self) -> &mut Value {
        &mut self.0["request"]["object"]
    }

    pub fn value(&self) -> &Value {
        &self.0
    }

    pub fn into_value(self) -> Value {
        self.0
    }

    pub fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).expect("JSON values serialise")
    }
}
