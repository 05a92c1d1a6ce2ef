//! Where the programs and files the cluster runs on come from: the control plane binaries
//! e2e/build.sh builds, the `bulwark` binary, the repository's deploy/ directory and the
//! cert-manager and prometheus-operator CRDs.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

/// The repository's deploy/ directory (kustomize base and overlays, Helm chart).
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The cert-manager CRDs e2e/build.sh fetched (Certificate, Issuer).
pub fn cert_manager_crds() -> anyhow::Result<Vec<PathBuf>> {
    fetched_crds("cert-manager-")
}

/// The prometheus-operator CRDs e2e/build.sh fetched (ServiceMonitor, PrometheusRule).
pub fn prometheus_operator_crds() -> anyhow::Result<Vec<PathBuf>> {
    fetched_crds("prometheus-operator-")
}

/// The CRD files e2e/build.sh put under `crds/<prefix><version>/`.
fn fetched_crds(prefix: &str) -> anyhow::Result<Vec<PathBuf>> {
    let dir = crate::cache_dir().join("crds");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let sub = entry?.path();
        if sub
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        {
            for f in std::fs::read_dir(&sub)? {
                found.push(f?.path());
            }
        }
    }
    anyhow::ensure!(
        !found.is_empty(),
        "no {prefix}* CRDs under {}",
        dir.display()
    );
    found.sort();
    Ok(found)
}

/// Builds (once per version, cached) the control plane binaries; returns their directory.
pub fn control_plane_binaries() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(PathBuf::from(dir))
}

/// The `bulwark` binary: `$BULWARK_BIN`, or the one in the cargo target directory this
/// program was built into (tests build it first with [`build_bulwark`]).
pub fn bulwark_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("BULWARK_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("bulwark"))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no bulwark binary next to {} (run `cargo build -p bulwark` or set BULWARK_BIN)",
                exe.display()
            )
        })
}

/// `cargo build -p bulwark`, so tests run against the current source.
pub fn build_bulwark() -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec!["build", "--quiet", "-p", "bulwark", "--bin", "bulwark"];
    // Same profile as this program, so the binary lands where `bulwark_binary` looks.
    if !cfg!(debug_assertions) {
        args.push("--release");
    }
    let status = Command::new(cargo)
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .context("running cargo build -p bulwark")?;
    if !status.success() {
        bail!("cargo build -p bulwark failed ({status})");
    }
    Ok(())
}
