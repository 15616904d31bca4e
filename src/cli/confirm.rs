//! Confirmation for destructive commands: `--yes`, or a "y" typed at a
//! terminal. Without a terminal there is nobody to ask, so a script that
//! forgot `--yes` is refused (exit 2) instead of hanging or guessing.

use std::io::{BufRead, IsTerminal, Write};

/// A refusal that is the caller's to fix: `cli::run` exits 2 for it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NeedsConfirmation(pub String);

/// Ok when `yes`, or when stdin and stderr are a terminal and the user
/// answers y/yes to "`what`?".
pub fn confirm(what: &str, yes: bool) -> Result<(), NeedsConfirmation> {
    if yes {
        return Ok(());
    }
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        return Err(NeedsConfirmation(format!(
            "{what}: pass --yes to confirm (no terminal to ask on)"
        )));
    }
    eprint!("{what}. Continue? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(NeedsConfirmation(format!("{what}: not confirmed"))),
    }
}
