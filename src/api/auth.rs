//! Bearer-token check for every route, when `serve` has a token.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// Equal tokens, compared in time independent of where they differ: both
/// are hashed first, so neither length nor content leaks through timing.
fn same_token(given: &[u8], want: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(given), Sha256::digest(want));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

pub(super) async fn require_token(
    State(shared): State<super::State>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(want) = &shared.token {
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        match given {
            Some(t) if same_token(t, want.as_bytes()) => {}
            Some(_) => return Err(ApiError::unauthorized("the bearer token is wrong")),
            None => {
                return Err(ApiError::unauthorized(
                    "this server needs a bearer token: send Authorization: Bearer TOKEN",
                ))
            }
        }
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::same_token;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"s3cret-token", b"s3cret-token"));
        assert!(!same_token(b"s3cret-toke", b"s3cret-token"));
        assert!(!same_token(b"", b"s3cret-token"));
        assert!(!same_token(b"s3cret-tokeN", b"s3cret-token"));
    }
}
