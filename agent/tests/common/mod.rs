//! Shared helpers of the agent's integration tests.

pub mod agent;
