//! mxspool: a backup MX that spools a domain's mail while its primary is down.
#![forbid(unsafe_code)]

pub mod config;
