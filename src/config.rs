//! Configuration: TOML file -> validated, typed [`Config`].
