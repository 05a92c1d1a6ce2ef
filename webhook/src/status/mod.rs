//! `bulwark status` (and `kubectl bulwark status`): for each namespace, the limits it is held
//! to and where each came from, what it uses of them, what bulwark refused it lately, and any
//! annotation bulwark could not use, sorted by how close it is to a limit.
//!
//! Beside the flow: it reads the API server as the user running it, like kubectl, and never
//! the webhook, so nothing of the webhook uses it. The pure parts take objects as listed and
//! give a table:
//!
//! - [`limits`]: which limit applies and where it came from (annotation, config, built-in);
//! - [`usage`]: the pods as the webhook counts them, the last minute's creations, the last
//!   ten minutes' refusals from bulwark's Throttled Events;
//! - [`table`]: the rows, their order, text and JSON;
//! - [`read`]: the reads, and what the user may not read.

pub mod limits;
pub mod read;
pub mod table;
pub mod usage;
