//! The real bulwark HTTPS server, in process on 127.0.0.1, driven by a real TLS client over
//! h2 and http/1.1.
//!
//! One test binary (it links once); the tests live in the modules below, by what they
//! exercise, and share the server and clients of `support`.

mod admission;
mod certificates;
mod connections;
mod hostile;
mod lifecycle;
mod malformed;
mod metrics;
mod support;
