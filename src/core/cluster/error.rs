//! [`ClusterError`]: why a call to the fleet's shared store did not happen.

use std::fmt;

/// Why a fleet-wide call (revocation, account set, usage query) did not
/// reach the cluster store or was not answered. Never quotes a key, token
/// or the store's password.
#[derive(Debug, Clone)]
pub enum ClusterError {
    /// The cluster thread has ended: nothing takes the call.
    ThreadGone,
    /// The cluster thread did not answer in time.
    ThreadSilent,
    /// The relay has no `[cluster]` store client to ask.
    NotConfigured,
    /// The cluster thread has no connection to the store now.
    Unreachable,
    /// The store took the call but did not answer within `cluster.timeout`.
    NoAnswer,
    /// The store (or the connection to it) refused a query.
    Redis(redis::RedisError),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::ThreadGone => f.write_str("the cluster thread is gone"),
            ClusterError::ThreadSilent => f.write_str("the cluster thread did not answer"),
            ClusterError::NotConfigured => f.write_str("the cluster store is not configured"),
            ClusterError::Unreachable => f.write_str("the cluster store is unreachable"),
            ClusterError::NoAnswer => f.write_str("the cluster store did not answer"),
            ClusterError::Redis(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClusterError::Redis(e) => Some(e),
            _ => None,
        }
    }
}

impl From<redis::RedisError> for ClusterError {
    fn from(e: redis::RedisError) -> Self {
        ClusterError::Redis(e)
    }
}
