//! Confirmation for destructive commands: `--yes`, or a "y" typed at a
//! terminal. Without a terminal there is nobody to ask, so a script that
//! forgot `--yes` is refused (exit 2) instead of hanging or guessing.

use std::io::{BufRead, IsTerminal, Write};

use crate::engine::Error;

/// Ok when `yes`, or when stdin and stderr are a terminal and the user
/// answers y/yes to "`what`?".
/// A refusal is `confirmation_required`, for which `cli::run` exits 2.
pub fn confirm(what: &str, yes: bool) -> Result<(), Error> {
    if yes {
        return Ok(());
    }
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        return Err(Error::ConfirmationRequired {
            message: format!("{what}: pass --yes to confirm (no terminal to ask on)"),
        });
    }
    eprint!("{what}. Continue? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(Error::ConfirmationRequired {
            message: format!("{what}: not confirmed"),
        }),
    }
}
