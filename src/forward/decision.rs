//! The dispatcher's answer for one condition: run fast, or hand the call to the module path with a
//! reason that `MobileOneBlock.forward_path(x, explain=True)` shows.

use std::fmt;

/// Why only the module path models a state (names the child or the call fact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(String);

impl Refusal {
    /// A refusal with this reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Refusal(reason.into())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fast path's checked value, or the module path and why.
#[derive(Debug)]
pub enum Decision<T> {
    Fast(T),
    Module(Refusal),
}

impl<T> Decision<T> {
    /// `Module` with this reason.
    pub fn refuse(reason: impl Into<String>) -> Self {
        Decision::Module(Refusal::new(reason))
    }

    /// `Module(reason)` when `refused`, else `Fast(value)`.
    pub fn unless(refused: bool, reason: impl FnOnce() -> String, value: T) -> Self {
        if refused {
            Decision::refuse(reason())
        } else {
            Decision::Fast(value)
        }
    }
}

/// The fast value of a `Result<Decision<T>>`, or an early return of its error or refusal.
/// `fast!(now d)` takes a plain `Decision<T>`.
macro_rules! fast {
    (now $e:expr) => {
        match $e {
            $crate::forward::decision::Decision::Fast(value) => value,
            $crate::forward::decision::Decision::Module(why) => {
                return Ok($crate::forward::decision::Decision::Module(why))
            }
        }
    };
    ($e:expr) => {
        match $e? {
            $crate::forward::decision::Decision::Fast(value) => value,
            $crate::forward::decision::Decision::Module(why) => {
                return Ok($crate::forward::decision::Decision::Module(why))
            }
        }
    };
}
pub(crate) use fast;
