//! What a home snapshot captures: the include and exclude lists a user
//! keeps in the guest (`~/.snapshot/includes.txt`, `excludes.txt`), the
//! owner's home from the guest's `/etc/passwd`, and the check of the
//! guest's archive before it becomes a layer.
//!
//! Everything here comes from the guest and is untrusted: the lists are
//! bounded and every line must stay inside the home; the archive may hold
//! only what was asked for (the listed paths, minus the excluded ones,
//! and the directories above them), only files, directories and links,
//! and at most [`MAX_CAPTURE_BYTES`] of content.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// Bytes of file content one home snapshot may hold.
pub const MAX_CAPTURE_BYTES: u64 = 16 << 30;
/// Lines one include or exclude list may have.
const MAX_LINES: usize = 10_000;

/// The owner's home: `user`'s entry (a name or a uid, before any
/// `:group`) in the guest's `/etc/passwd`. An empty user is root.
pub fn home_of(passwd: &str, user: &str) -> Option<String> {
    let user = user.split(':').next().unwrap_or("");
    let user = if user.is_empty() { "root" } else { user };
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7 && (f[0] == user || f[2] == user)).then(|| f[5].to_string())
    })
}

/// Whether `home` is a directory a snapshot may be rooted at: absolute,
/// plain (no `.`, `..`), not `/`.
pub fn valid_home(home: &str) -> bool {
    let p = Path::new(home);
    p.is_absolute()
        && p.components().count() > 1
        && p.components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)))
}

/// The absolute guest paths a list names, one per line, relative to
/// `home` (or absolute inside it). Blank lines and `#` comments are
/// skipped; a line that leaves the home is refused, naming `file` and the
/// line.
pub fn parse_list(text: &str, file: &str, home: &str) -> Result<Vec<String>, String> {
    let home_path = Path::new(home);
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if out.len() == MAX_LINES {
            return Err(format!("{file} lists more than {MAX_LINES} paths"));
        }
        let here = || format!("{file} line {}: {line:?}", i + 1);
        let rel: PathBuf = match Path::new(line).strip_prefix("/") {
            Ok(_) => Path::new(line)
                .strip_prefix(home_path)
                .map_err(|_| format!("{} is outside {home}", here()))?
                .to_path_buf(),
            Err(_) => PathBuf::from(line),
        };
        let mut abs = home_path.to_path_buf();
        for c in rel.components() {
            match c {
                Component::Normal(n) => abs.push(n),
                Component::CurDir => {}
                _ => return Err(format!("{} escapes {home}", here())),
            }
        }
        out.push(abs.to_string_lossy().into_owned());
    }
    Ok(out)
}

/// What [`filter_archive`] wrote.
#[derive(Debug, Default, PartialEq)]
pub struct Captured {
    /// Entries written (directories above the listed paths included).
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Listed paths the guest had, of `includes`.
    pub present: Vec<String>,
    /// Entries left out: FIFOs, sockets and device nodes.
    pub skipped: Vec<String>,
}

fn under(path: &Path, roots: &[String]) -> bool {
    roots.iter().any(|r| path.starts_with(r))
}

/// Copies the guest's archive of `includes` (entries named relative to
/// `/`) into `out` as a layer tar, refusing anything that was not asked
/// for. Owners, modes and times are kept as the guest had them.
pub fn filter_archive(
    input: &mut dyn Read,
    out: impl Write,
    includes: &[String],
    excludes: &[String],
) -> std::io::Result<Captured> {
    let refuse = |what: String| std::io::Error::other(what);
    let mut archive = tar::Archive::new(input);
    let mut builder = tar::Builder::new(out);
    let mut got = Captured::default();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let rel = entry.path()?.into_owned();
        let shown = rel.display().to_string();
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(refuse(format!(
                "the guest's archive holds {shown:?}, not a plain relative path"
            )));
        }
        let abs = Path::new("/").join(&rel);
        let kind = entry.header().entry_type();
        let above = includes
            .iter()
            .any(|i| Path::new(i).starts_with(&abs) && Path::new(i) != abs);
        let wanted = under(&abs, includes) && !under(&abs, excludes);
        if !(wanted || above && kind.is_dir()) {
            return Err(refuse(format!(
                "the guest's archive holds /{shown}, which the lists do not ask for"
            )));
        }
        if includes.iter().any(|i| Path::new(i) == abs) {
            got.present.push(abs.to_string_lossy().into_owned());
        }
        let mut header = entry.header().clone();
        use tar::EntryType::*;
        match kind {
            Regular | Continuous | Directory => {
                got.bytes += entry.size();
                if got.bytes > MAX_CAPTURE_BYTES {
                    return Err(refuse(format!(
                        "the listed files hold more than {} GiB",
                        MAX_CAPTURE_BYTES >> 30
                    )));
                }
                builder.append_data(&mut header, &rel, &mut entry)?;
            }
            Symlink | Link => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| refuse(format!("link /{shown} has no target")))?
                    .into_owned();
                // A hard link must name a captured file.
                if kind == Link && !(under(&Path::new("/").join(&target), includes)) {
                    return Err(refuse(format!(
                        "hard link /{shown} points at {}, outside the listed paths",
                        target.display()
                    )));
                }
                builder.append_link(&mut header, &rel, &target)?;
            }
            _ => {
                got.skipped.push(format!("/{shown}"));
                continue;
            }
        }
        got.entries += 1;
    }
    builder.into_inner()?.flush()?;
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_come_from_passwd_by_name_or_uid() {
        let pw = "root:x:0:0:root:/root:/bin/sh\ndev:x:1000:1000::/home/dev:/bin/bash\n";
        assert_eq!(home_of(pw, "").as_deref(), Some("/root"));
        assert_eq!(home_of(pw, "dev").as_deref(), Some("/home/dev"));
        assert_eq!(home_of(pw, "1000:1000").as_deref(), Some("/home/dev"));
        assert_eq!(home_of(pw, "nobody"), None);
        assert!(valid_home("/home/dev") && !valid_home("/") && !valid_home("/home/../etc"));
    }

    #[test]
    fn lists_stay_inside_the_home_and_name_the_bad_line() {
        let got = parse_list(
            "# dotfiles\n.bashrc\n\n./.config/nvim\n/home/dev/.local\n",
            "includes.txt",
            "/home/dev",
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "/home/dev/.bashrc",
                "/home/dev/.config/nvim",
                "/home/dev/.local"
            ]
        );
        let e = parse_list(".bashrc\n../../etc/shadow\n", "includes.txt", "/home/dev").unwrap_err();
        assert_eq!(
            e,
            "includes.txt line 2: \"../../etc/shadow\" escapes /home/dev"
        );
        let e = parse_list("/etc/passwd", "excludes.txt", "/home/dev").unwrap_err();
        assert!(
            e.starts_with("excludes.txt line 1") && e.contains("outside /home/dev"),
            "{e}"
        );
    }

    fn archive(entries: &[(&str, tar::EntryType)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(if kind.is_file() { 2 } else { 0 });
            let data: &[u8] = if kind.is_file() { b"hi" } else { b"" };
            b.append_data(&mut h, name, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn the_archive_holds_only_what_was_asked_for() {
        use tar::EntryType::*;
        let inc = vec![
            "/home/dev/.config".to_string(),
            "/home/dev/.gone".to_string(),
        ];
        let exc = vec!["/home/dev/.config/secret".to_string()];
        let ok = archive(&[
            ("home", Directory),
            ("home/dev", Directory),
            ("home/dev/.config", Directory),
            ("home/dev/.config/a", Regular),
            ("home/dev/.config/fifo", Fifo),
        ]);
        let mut out = Vec::new();
        let got = filter_archive(&mut &ok[..], &mut out, &inc, &exc).unwrap();
        assert_eq!(got.entries, 4);
        assert_eq!(got.bytes, 2);
        assert_eq!(got.present, ["/home/dev/.config"]);
        assert_eq!(got.skipped, ["/home/dev/.config/fifo"]);
        let names: Vec<String> = tar::Archive::new(&out[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            ["home", "home/dev", "home/dev/.config", "home/dev/.config/a"]
        );
        for bad in [
            archive(&[("home/dev/.config/secret", Regular)]),
            archive(&[("etc/passwd", Regular)]),
            archive(&[("home/dev", Regular)]),
        ] {
            let e = filter_archive(&mut &bad[..], Vec::new(), &inc, &exc).unwrap_err();
            assert!(e.to_string().contains("do not ask for"), "{e}");
        }
    }
}
