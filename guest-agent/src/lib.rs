//! Wire protocol shared by the host and the guest agent (filled in by the agent issue).
