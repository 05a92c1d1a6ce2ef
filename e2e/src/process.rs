//! Local daemons of the e2e cluster: started detached with their output in a log file and
//! their pid in a pid file, so that `down` from another process finds and stops exactly them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// One started process. The `Child` is kept when this process started it, to reap it.
pub struct Daemon {
    pub name: String,
    pub pid: u32,
    child: Option<Child>,
    log: PathBuf,
}

/// Where a cluster keeps its logs and pid files.
#[derive(Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        for sub in ["logs", "run"] {
            fs::create_dir_all(root.join(sub))
                .with_context(|| format!("creating {}", root.join(sub).display()))?;
        }
        Ok(RunDir {
            root: root.to_path_buf(),
        })
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }

    fn pid_file(&self, name: &str) -> PathBuf {
        self.root.join("run").join(format!("{name}.pid"))
    }

    /// Starts `program args` as `name`, in its own process group so that a Ctrl-C in the
    /// terminal that ran `up` does not take the cluster down with it.
    pub fn spawn(&self, name: &str, program: &Path, args: &[String]) -> anyhow::Result<Daemon> {
        let log_path = self.log(name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let err = log.try_clone().context("duplicating the log file")?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(err);
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pid = child.id();
        wait_for_exec(pid);
        fs::write(self.pid_file(name), format!("{pid}\n"))
            .with_context(|| format!("writing the pid file of {name}"))?;
        Ok(Daemon {
            name: name.to_owned(),
            pid,
            child: Some(child),
            log: log_path,
        })
    }

    /// The daemons a previous `up` left pid files for and that are still running as ours.
    pub fn recorded(&self) -> Vec<Daemon> {
        let Ok(entries) = fs::read_dir(self.root.join("run")) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pid"))
            else {
                continue;
            };
            let pid = fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            match pid {
                Some(pid) if self.owns(pid) => found.push(Daemon {
                    name: name.to_owned(),
                    pid,
                    child: None,
                    log: self.log(name),
                }),
                // Gone, or the pid now belongs to someone else: only the file is ours.
                _ => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        found
    }

    /// A pid is one of ours if the process is alive and its command line names this
    /// directory (every daemon gets a path inside it); this guards against recycled pids.
    fn owns(&self, pid: u32) -> bool {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let root = self.root.to_string_lossy();
        alive(pid)
            && cmdline
                .split(|b| *b == 0)
                .any(|arg| String::from_utf8_lossy(arg).contains(root.as_ref()))
    }

    /// SIGTERM, then SIGKILL after `grace` (at once for a zero grace); waits until the
    /// process is gone.
    pub fn stop(&self, daemon: &mut Daemon, grace: Duration) {
        if !grace.is_zero() {
            signal(daemon.pid, "TERM");
        }
        if grace.is_zero() || !daemon.wait_exit(grace) {
            signal(daemon.pid, "KILL");
            daemon.wait_exit(Duration::from_secs(5));
        }
        let _ = fs::remove_file(self.pid_file(&daemon.name));
    }
}

impl Daemon {
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process still runs (reaping it if this process is its parent).
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => alive(self.pid),
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if !self.running() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        !self.running()
    }

    /// The last lines of the daemon's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        if self.running() {
            Ok(())
        } else {
            bail!(
                "{} exited; last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(30)
            )
        }
    }
}

/// `spawn` can return while the child still runs this program's image, or while it is inside
/// execve: a vfork-style spawn resumes the parent once the old image is released, before the
/// new one's arguments are in place, and /proc then shows an empty command line. Until the
/// exec is done the command line does not show whose the process is (see [`RunDir::owns`]),
/// and a pid file written then would be taken for a recycled pid and removed.
fn wait_for_exec(pid: u32) {
    let own = fs::read("/proc/self/cmdline").unwrap_or_default();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1)
        && alive(pid)
        && fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty() || c == own)
    {
        thread::sleep(Duration::from_millis(1));
    }
}

/// Alive and not a zombie.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("bulwark-process-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn spawned_daemons_are_found_again_and_stopped() {
        let dir = scratch("spawn");
        let run = RunDir::new(&dir).unwrap();
        // The directory appears on the command line, as with every cluster daemon. A loop,
        // not a lone `sleep`, which the shell would exec, losing that command line.
        let script = "trap 'exit 0' TERM; while :; do sleep 0.05; done";
        let args = [
            "-c".to_owned(),
            script.to_owned(),
            dir.display().to_string(),
        ];
        let mut started = run.spawn("sleeper", Path::new("sh"), &args).unwrap();
        assert!(started.running());

        let mut found = run.recorded();
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].name.as_str(), found[0].pid),
            ("sleeper", started.pid)
        );
        run.stop(&mut found[0], Duration::from_secs(5));
        assert!(!started.running(), "SIGTERM ends it");
        assert!(run.recorded().is_empty(), "pid file removed");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pid_files_of_other_processes_are_ignored() {
        let dir = scratch("foreign");
        let run = RunDir::new(&dir).unwrap();
        // This test process is alive but does not name the directory: a recycled pid.
        fs::write(run.pid_file("etcd"), format!("{}\n", std::process::id())).unwrap();
        fs::write(run.pid_file("kwok"), "not a pid\n").unwrap();
        assert!(run.recorded().is_empty());
        assert!(!run.pid_file("etcd").exists() && !run.pid_file("kwok").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_daemon_that_exits_is_reported_with_its_log() {
        let dir = scratch("exit");
        let run = RunDir::new(&dir).unwrap();
        let args = ["-c".to_owned(), "echo cannot start >&2; exit 3".to_owned()];
        let mut d = run.spawn("broken", Path::new("sh"), &args).unwrap();
        let start = Instant::now();
        while d.running() && start.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(20));
        }
        let err = d.check().unwrap_err().to_string();
        assert!(
            err.contains("broken exited") && err.contains("cannot start"),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
