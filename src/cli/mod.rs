//! The `fptserve` subcommands. `main` parses and sets up logging, then calls one of these.

pub mod classify;
pub mod decode;
pub mod inspect;
pub mod serve;
