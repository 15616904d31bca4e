//! Moving secrets between the host's store and the guest's /run/secrets.

use std::time::Duration;

use guest_agent::{Request, SecretMeta};

use super::{AgentConn, AgentError};
use crate::workspace::secrets::{SecretError, SecretStore};
use crate::workspace::store::WorkspaceDir;

/// Each call is one small round trip; PVM guests answer in about a second.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("delivering secrets to workspace {name}: {source}")]
    Agent { name: String, source: AgentError },
    #[error("workspace {name}: the guest agent refused the secrets request: {message}")]
    Refused { name: String, message: String },
    #[error(transparent)]
    Store(#[from] SecretError),
}

fn call(ws: &WorkspaceDir, req: &Request, payloads: &[&[u8]]) -> Result<(), DeliveryError> {
    let agent = |source| DeliveryError::Agent {
        name: ws.name.clone(),
        source,
    };
    let resp = AgentConn::connect(&ws.vsock_socket(), TIMEOUT)
        .and_then(|c| c.call_with(req, payloads))
        .map_err(agent)?;
    if !resp.ok {
        return Err(DeliveryError::Refused {
            name: ws.name.clone(),
            message: resp.message,
        });
    }
    Ok(())
}

/// Writes the host's current secrets into the guest; with `replace`, guest
/// secrets the host no longer has are scrubbed. Returns how many were sent.
pub fn deliver(ws: &WorkspaceDir, replace: bool) -> Result<usize, DeliveryError> {
    let all = SecretStore::of(ws).all()?;
    if all.is_empty() && !replace {
        return Ok(0);
    }
    let metas = all
        .iter()
        .map(|(k, v)| SecretMeta {
            key: k.clone(),
            len: v.len() as u32,
        })
        .collect();
    let values: Vec<&[u8]> = all.iter().map(|(_, v)| v.as_slice()).collect();
    call(
        ws,
        &Request::SecretsPut {
            secrets: metas,
            replace,
        },
        &values,
    )?;
    Ok(all.len())
}

/// Overwrites and unlinks every secret in the guest.
pub fn scrub(ws: &WorkspaceDir) -> Result<(), DeliveryError> {
    call(ws, &Request::SecretsScrub, &[])
}

pub fn remove(ws: &WorkspaceDir, keys: &[String]) -> Result<(), DeliveryError> {
    call(
        ws,
        &Request::SecretsRemove {
            keys: keys.to_vec(),
        },
        &[],
    )
}
