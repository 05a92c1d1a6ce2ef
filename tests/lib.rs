//! Integration tests for bulwark live in `tests/`; this crate has no library code.
