//! The partitioned distributed map (under construction).
pub mod assign;
