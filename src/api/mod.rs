//! `microagent serve`: the HTTP API, a second front end over the same
//! engine as the CLI. Routes parse, call the engine (its calls block, so
//! they run on tokio's blocking pool) and render the documented JSON
//! shapes (`crate::render`). Workspaces outlive the server: stopping it
//! never stops a VMM.

mod auth;
mod error;
mod exec;
mod named;
mod routes;
mod seed;
mod volumes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;

use crate::engine::Engine;

/// Request bodies above this are refused with 413 (secrets and JSON are
/// small; images are imported from a path, not uploaded).
pub const BODY_LIMIT: usize = 1 << 20;

/// The OpenAPI document, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Where `serve` listens.
#[derive(Debug, Clone, PartialEq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Listen {
    /// `unix:PATH` or `ADDR:PORT`.
    pub fn parse(s: &str) -> Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("--listen unix: needs a path".into());
            }
            return Ok(Listen::Unix(p.into()));
        }
        s.parse().map(Listen::Tcp).map_err(|_| {
            format!("--listen {s:?}: expected unix:PATH or ADDR:PORT (e.g. 127.0.0.1:8000)")
        })
    }
}

/// What every handler shares.
pub(crate) struct Shared {
    pub engine: Engine,
    /// The bearer token every request must carry, when one is set.
    pub token: Option<String>,
}

pub(crate) type State = Arc<Shared>;

/// The whole API as a router (also what the route-coverage test reads).
pub fn router(engine: Engine, token: Option<String>) -> Router {
    let shared = Arc::new(Shared { engine, token });
    routes::v1()
        .merge(seed::routes())
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            auth::require_token,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(shared)
}

/// Runs the server until SIGTERM or Ctrl-C. A TCP listener off loopback
/// needs a token; a unix socket is made mode 0600.
pub fn serve(engine: Engine, listen: Listen, token: Option<String>) -> anyhow::Result<()> {
    if let Listen::Tcp(addr) = &listen {
        if !addr.ip().is_loopback() && token.is_none() {
            anyhow::bail!(
                "--listen {addr}: a non-loopback address needs a bearer token (--token-file)"
            );
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = router(engine, token);
        match listen {
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(&path);
                // The socket is created 0600: nobody else may drive VMs.
                let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
                let bound = tokio::net::UnixListener::bind(&path);
                nix::sys::stat::umask(old);
                let listener =
                    bound.map_err(|e| anyhow::anyhow!("binding {}: {e}", path.display()))?;
                eprintln!("microagent: serving the API on unix:{}", path.display());
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped())
                    .await?;
                let _ = std::fs::remove_file(&path);
            }
            Listen::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
                eprintln!(
                    "microagent: serving the API on http://{}",
                    listener.local_addr()?
                );
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped())
                    .await?;
            }
        }
        eprintln!("microagent: API server stopped; workspaces keep running");
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn stopped() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::Listen;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            Listen::parse("unix:/tmp/a.sock").unwrap(),
            Listen::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            Listen::parse("127.0.0.1:8000").unwrap(),
            Listen::Tcp("127.0.0.1:8000".parse().unwrap())
        );
        assert!(Listen::parse("unix:").is_err());
        assert!(Listen::parse("localhost")
            .unwrap_err()
            .contains("localhost"));
    }
}
