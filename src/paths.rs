//! Where build outputs that live outside git are cached per machine: the
//! guest kernel (scripts/build-kernel.sh) and passt (scripts/build-passt.sh).

use std::path::PathBuf;

/// `$MICROAGENT_CACHE`, else `$XDG_CACHE_HOME/microagent`, else
/// `~/.cache/microagent` (the scripts use the same rule).
pub fn cache_root() -> PathBuf {
    std::env::var_os("MICROAGENT_CACHE")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .filter(|c| !c.is_empty())
                .map(|c| PathBuf::from(c).join("microagent"))
        })
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/microagent")
        })
}

/// The passt to run: `$MICROAGENT_PASST`, else the one
/// scripts/build-passt.sh built last, else `passt` on PATH.
///
/// Why not simply PATH: Debian 12's passt (0.0~git20230309) resets every
/// guest-initiated TCP connection whose host peer sends nothing for 24 s
/// (it never clears the handshake's ACK timer, so a pure upload dies), and
/// it loses its framing when a frame reaches it in two reads.
pub fn passt_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MICROAGENT_PASST").filter(|p| !p.is_empty()) {
        return p.into();
    }
    let built = cache_root().join("passt/current/passt");
    if built.is_file() {
        return built;
    }
    PathBuf::from("passt")
}
