//! cgroup v2 limits per VMM, where the host offers them: memory (guest
//! RAM plus an allowance for the VMM and passt), CPU weight and a pids
//! cap, in a cgroup of its own that the VMM (and the passt it starts)
//! joins before it runs anything.
//!
//! Where: `MICROAGENT_CGROUP` names a parent cgroup directory the caller
//! may write (a delegated one, for a user without root); as root the
//! default is `microagent/` under the cgroup v2 mount. Each VMM gets
//! `<parent>/<workspace>-<pid>`, removed when it ends. Without cgroup v2,
//! or without its memory, cpu and pids controllers (a hybrid host that
//! keeps them on cgroup v1), or without a parent we may write, the VMM
//! runs unlimited and `status` says why ([`Placement::Unavailable`]),
//! never silently.
//!
//! Knobs: `MICROAGENT_VMM_MEMORY_OVERHEAD_MIB` (default 256),
//! `MICROAGENT_VMM_CPU_WEIGHT` (1-10000, default 100),
//! `MICROAGENT_VMM_PIDS_MAX` (at least 16, default 256).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const CGROUP_ENV: &str = "MICROAGENT_CGROUP";
pub const OVERHEAD_ENV: &str = "MICROAGENT_VMM_MEMORY_OVERHEAD_MIB";
pub const CPU_WEIGHT_ENV: &str = "MICROAGENT_VMM_CPU_WEIGHT";
pub const PIDS_MAX_ENV: &str = "MICROAGENT_VMM_PIDS_MAX";

const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The limits one VMM runs under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_max_bytes: u64,
    pub cpu_weight: u32,
    pub pids_max: u32,
}

/// Where a VMM was placed: what `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Placement {
    Limited {
        cgroup: String,
        #[serde(flatten)]
        limits: Limits,
    },
    Unavailable {
        reason: String,
    },
}

fn env_number(
    name: &str,
    default: u64,
    valid: std::ops::RangeInclusive<u64>,
) -> Result<u64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if valid.contains(&n) => Ok(n),
            _ => Err(format!(
                "{name}={v:?} is not a number from {} to {}",
                valid.start(),
                valid.end()
            )),
        },
    }
}

impl Limits {
    /// The limits for a guest of `mem_mib`, with the knobs in the module doc.
    pub fn for_guest(mem_mib: u64) -> Result<Limits, String> {
        let overhead = env_number(OVERHEAD_ENV, 256, 64..=1 << 20)?;
        Ok(Limits {
            memory_max_bytes: (mem_mib + overhead) << 20,
            cpu_weight: env_number(CPU_WEIGHT_ENV, 100, 1..=10_000)? as u32,
            pids_max: env_number(PIDS_MAX_ENV, 256, 16..=1 << 22)? as u32,
        })
    }
}

/// The cgroup v2 mount point, from `/proc/self/mountinfo`'s text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (fs.split_whitespace().next() == Some("cgroup2"))
            .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Makes `<parent>/<name>` under the cgroup v2 tree at `mount` with
/// `limits`; `parent` is made (as `microagent/` is on first use) and
/// given the controllers. Returns the new cgroup, or why it cannot be.
pub fn create(mount: &Path, parent: &Path, name: &str, limits: &Limits) -> Result<PathBuf, String> {
    if !parent.starts_with(mount) {
        return Err(format!(
            "{CGROUP_ENV}={} is not under the cgroup v2 mount {}",
            parent.display(),
            mount.display()
        ));
    }
    let offered = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| !offered.split_whitespace().any(|o| o == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "cgroup v2 at {} has no {} controller (it offers: {}); on this host they are \
             bound to cgroup v1",
            mount.display(),
            missing.join(", "),
            if offered.trim().is_empty() {
                "none"
            } else {
                offered.trim()
            }
        ));
    }
    let at = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    let enable = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
    // Every cgroup from the mount down to the parent hands the
    // controllers to its children (an already delegated parent has them).
    let mut chain = vec![parent.to_path_buf()];
    chain.extend(
        parent
            .ancestors()
            .skip(1)
            .take_while(|a| a.starts_with(mount))
            .map(Path::to_path_buf),
    );
    for dir in chain.iter().rev() {
        if !dir.exists() {
            std::fs::create_dir(dir).map_err(|e| at("creating", dir, e))?;
        }
        let control = dir.join("cgroup.subtree_control");
        let current = std::fs::read_to_string(&control).unwrap_or_default();
        if CONTROLLERS
            .iter()
            .all(|c| current.split_whitespace().any(|o| o == *c))
        {
            continue;
        }
        std::fs::write(&control, &enable)
            .map_err(|e| at("enabling controllers in", &control, e))?;
    }
    let cg = parent.join(name);
    // A stale one (a VMM that died with this pid's name) goes first.
    let _ = std::fs::remove_dir(&cg);
    std::fs::create_dir(&cg).map_err(|e| at("creating", &cg, e))?;
    let set = |file: &str, value: String| {
        let p = cg.join(file);
        std::fs::write(&p, value).map_err(|e| at("writing", &p, e))
    };
    let applied = set("memory.max", limits.memory_max_bytes.to_string())
        .and_then(|()| set("cpu.weight", limits.cpu_weight.to_string()))
        .and_then(|()| set("pids.max", limits.pids_max.to_string()));
    if let Err(e) = applied {
        let _ = std::fs::remove_dir(&cg);
        return Err(e);
    }
    Ok(cg)
}

/// Places a VMM: the parent from `MICROAGENT_CGROUP` or, as root, the
/// default; `Unavailable` with the reason otherwise.
pub fn place(name: &str, limits: &Limits) -> (Placement, Option<PathBuf>) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let result = (|| {
        let mount = cgroup2_mount(&mountinfo).ok_or("no cgroup v2 is mounted")?;
        let parent = match std::env::var_os(CGROUP_ENV) {
            Some(p) => PathBuf::from(p),
            None if nix::unistd::Uid::effective().is_root() => mount.join("microagent"),
            None => {
                return Err(format!(
                    "not root, and {CGROUP_ENV} names no delegated cgroup to use"
                ))
            }
        };
        create(&mount, &parent, name, limits)
    })();
    match result {
        Ok(cg) => (
            Placement::Limited {
                cgroup: cg.display().to_string(),
                limits: limits.clone(),
            },
            Some(cg),
        ),
        Err(reason) => (Placement::Unavailable { reason }, None),
    }
}

/// Removes a VMM's cgroup once its processes are gone (passt may take a
/// moment after the VMM).
pub fn remove(cg: &Path) {
    for _ in 0..100 {
        match std::fs::remove_dir(cg) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        memory_max_bytes: 512 << 20,
        cpu_weight: 100,
        pids_max: 256,
    };

    #[test]
    fn the_cgroup2_mount_is_read_from_mountinfo() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup2_mount(hybrid), Some("/sys/fs/cgroup/unified".into()));
        assert_eq!(
            cgroup2_mount("27 25 0:24 / /x rw - cgroup cgroup rw,memory\n"),
            None
        );
    }

    /// A cgroup tree is files: a plain directory stands in for one here
    /// (the kernel's own files appear on mkdir; these are written).
    #[test]
    fn limits_and_controllers_are_written_down_the_tree() {
        let t = tempfile::tempdir().unwrap();
        let mount = t.path();
        std::fs::write(
            mount.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let parent = mount.join("microagent");
        let cg = create(mount, &parent, "w-42", &LIMITS).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(
            read(&mount.join("cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
        assert_eq!(
            read(&parent.join("cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
        assert_eq!(read(&cg.join("memory.max")), (512u64 << 20).to_string());
        assert_eq!(read(&cg.join("cpu.weight")), "100");
        assert_eq!(read(&cg.join("pids.max")), "256");
    }

    #[test]
    fn a_host_without_the_controllers_says_which_are_missing() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        let why = create(t.path(), &t.path().join("m"), "w", &LIMITS).unwrap_err();
        assert!(
            why.contains("no memory, cpu, pids controller") && why.contains("hugetlb"),
            "{why}"
        );
        assert!(!t.path().join("m").exists(), "nothing made");
        let why = create(t.path(), Path::new("/elsewhere"), "w", &LIMITS).unwrap_err();
        assert!(why.contains("not under the cgroup v2 mount"), "{why}");
    }

    #[test]
    fn placement_reads_back_as_status_shows_it() {
        let p = Placement::Limited {
            cgroup: "/sys/fs/cgroup/microagent/w-1".into(),
            limits: LIMITS,
        };
        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(j["state"], "limited");
        assert_eq!(j["memory_max_bytes"], 512u64 << 20);
        assert_eq!(serde_json::from_value::<Placement>(j).unwrap(), p);
    }
}
