//! Per-credential rate limits on the calls that create things (Register, SubmitSweep), so one
//! leaked or buggy credential cannot flood the database. Each coordinator counts on its own:
//! with N coordinators a token gets up to N times the rate.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use uuid::Uuid;

use crate::{error::CoordinatorError, Config};

pub(crate) struct Limits {
    register: DefaultKeyedRateLimiter<Uuid>,
    submit: DefaultKeyedRateLimiter<Uuid>,
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n.max(1)).expect("at least one"))
}

impl Limits {
    pub fn new(config: &Config) -> Self {
        Limits {
            register: RateLimiter::keyed(per_minute(config.register_per_minute)),
            submit: RateLimiter::keyed(per_minute(config.submit_per_minute)),
        }
    }

    pub fn register(&self, token: Uuid) -> Result<(), CoordinatorError> {
        self.register.check_key(&token).map_err(|_| {
            CoordinatorError::ResourceExhausted(
                "too many registrations with this token; retry in a minute".into(),
            )
        })
    }

    pub fn submit(&self, token: Uuid) -> Result<(), CoordinatorError> {
        self.submit.check_key(&token).map_err(|_| {
            CoordinatorError::ResourceExhausted(
                "too many sweeps submitted with this token; retry in a minute".into(),
            )
        })
    }
}
