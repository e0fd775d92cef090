//! The host backend: runs a batch's agent as a child process on this machine.
