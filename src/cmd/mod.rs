//! The one-shot commands behind the CLI.

pub mod audit;
pub mod check;
pub mod explain;
pub mod gaps;
pub mod passwd;
