//! The agent: what runs inside an environment. A batch in, JSON lines out.

pub mod protocol;
pub mod init;
