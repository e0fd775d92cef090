//! The sandbox front ends: bwrap argv profiles, subject preparation, restrictions, and the one
//! table of failure signatures.
