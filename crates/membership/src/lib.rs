//! stub
mod member;
pub use member::*;
