//! The one error type of the data plane.

use std::time::Duration;

use grapevine_membership::MemberId;

/// Why a message could not be delivered or answered.
///
/// The variants say how much is known about delivery: [`NetError::NotSent`],
/// [`NetError::FrameTooLarge`], [`NetError::QueueFull`], [`NetError::UnknownPeer`],
/// [`NetError::Rejected`] and [`NetError::NoHandler`] mean the remote handler did not run;
/// [`NetError::ConnectionLost`], [`NetError::Timeout`] and [`NetError::Remote`] mean it may have.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    /// No address is known for the member and it has no connection to us.
    #[error(
        "no address is known for member {peer} and it has no connection to this member; \
         the membership view must call Net::set_peer_address before messages can be sent to it"
    )]
    UnknownPeer {
        /// The member.
        peer: MemberId,
    },
    /// Definitely not delivered (connect failed, connection refused, no free local port): safe to retry.
    #[error("message to {peer} was not sent: {reason}; nothing was delivered, it is safe to retry")]
    NotSent {
        /// The member.
        peer: MemberId,
        /// What failed.
        reason: String,
    },
    /// Sent, but the connection broke before the response arrived: it may or may not have been handled.
    #[error(
        "the connection to {peer} was lost after the message was sent; \
         it may or may not have been handled"
    )]
    ConnectionLost {
        /// The member.
        peer: MemberId,
    },
    /// No response within the request's timeout: it may or may not have been handled.
    #[error("no response from {peer} within {after:?}; the request may or may not have been handled")]
    Timeout {
        /// The member.
        peer: MemberId,
        /// The timeout the request was given.
        after: Duration,
    },
    /// The frame would exceed `frame_bytes_max`. Checked before enqueueing: nothing was sent.
    #[error(
        "message of {size} bytes (frame header included) exceeds frame_bytes_max {max}; \
         raise net.frame_bytes_max (on every member) or store smaller values"
    )]
    FrameTooLarge {
        /// Size of the frame the message needs.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The outbound queue to the member is full: it (or the network) cannot keep up.
    #[error(
        "the outbound queue to {peer} is full ({bytes_max} bytes): the member or the network \
         cannot keep up; slow down or raise net.queue_bytes_max"
    )]
    QueueFull {
        /// The member.
        peer: MemberId,
        /// The configured cap.
        bytes_max: usize,
    },
    /// The handshake was refused; the reason names both sides' values.
    #[error("the handshake with {peer} was refused: {reason}")]
    Rejected {
        /// The member we dialed.
        peer: MemberId,
        /// Why, naming both sides' values.
        reason: String,
    },
    /// The remote member has no handler registered for the service.
    #[error(
        "{peer} has no handler for service {service}; it may run a different version or not \
         have started that service yet"
    )]
    NoHandler {
        /// The member.
        peer: MemberId,
        /// The service id.
        service: u8,
    },
    /// The remote handler failed: it panicked, or its response exceeded the remote's
    /// `frame_bytes_max`. It may have had side effects.
    #[error("the handler for service {service} on {peer} failed: {reason}")]
    Remote {
        /// The member.
        peer: MemberId,
        /// The service id.
        service: u8,
        /// What the remote reported.
        reason: String,
    },
    /// The member was forgotten (it left the cluster); work still queued for it was dropped
    /// (requests already written to it fail with [`NetError::ConnectionLost`] instead).
    #[error("member {peer} has left the cluster; messages to it were dropped")]
    PeerGone {
        /// The member.
        peer: MemberId,
    },
    /// This member's network layer is shut down.
    #[error("the data plane of this member is shut down")]
    Shutdown,
}
