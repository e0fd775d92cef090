//! The sandbox front ends: bwrap argv profiles, subject preparation, restrictions, and the one
//! table of failure signatures.

pub mod argv;
pub mod restrict;
pub mod signature;
pub mod subject;
