//! A workspace's secrets: set, list, remove. A running guest gets the
//! change at once; values never leave the host's secret store otherwise.

use super::launch::deliver_secrets;
use super::{open, Engine, Result};
use crate::agent::secrets as agent_secrets;
use crate::workspace::secrets::SecretStore;
use crate::workspace::state::Status;

impl Engine {
    /// Sets a secret; returns whether it was delivered to a running guest.
    pub fn secret_set(&self, name: &str, key: &str, value: &[u8]) -> Result<bool> {
        // Under the workspace lock: never in the middle of a snapshot, whose
        // memory must not see the value.
        let o = open(&self.state, name)?;
        SecretStore::of(&o.ws).set(key, value)?;
        let delivered = o.status == Status::Running;
        if delivered {
            deliver_secrets(&o.ws, false)?;
        }
        Ok(delivered)
    }

    /// The workspace's secret keys (never values).
    pub fn secret_keys(&self, name: &str) -> Result<Vec<String>> {
        let ws = self.state.existing(name)?;
        Ok(SecretStore::of(&ws).keys()?)
    }

    /// Removes a secret; returns whether it was scrubbed from a running guest.
    pub fn secret_remove(&self, name: &str, key: &str) -> Result<bool> {
        let o = open(&self.state, name)?;
        SecretStore::of(&o.ws).remove(key)?;
        let scrubbed = o.status == Status::Running;
        if scrubbed {
            agent_secrets::remove(&o.ws, &[key.to_string()])?;
        }
        Ok(scrubbed)
    }
}
