//! Bearer-token check on every call, when the coordinator was given a token.

use tonic::{service::Interceptor, Request, Status};

#[derive(Clone)]
pub struct Auth {
    expected: Option<String>,
}

impl Auth {
    pub fn new(token: Option<String>) -> Self {
        Auth {
            expected: token
                .filter(|t| !t.is_empty())
                .map(|t| format!("Bearer {t}")),
        }
    }
}

/// Compares without an early exit, so timing says nothing about how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for Auth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        match req.metadata().get("authorization") {
            Some(v) if same(v.as_bytes(), expected.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated(
                "wrong token: check --token / FLEETMARK_TOKEN",
            )),
            None => Err(Status::unauthenticated(
                "this coordinator requires a token: pass --token or set FLEETMARK_TOKEN",
            )),
        }
    }
}
