//! herald-bench: a load generator for Herald and for peer servers with a
//! plain per-channel publish-URL / subscribe-URL interface (such as nchan),
//! so that both can be measured with the same tool in one run.
//!
//! A coordinator process ([`coordinator`]) starts worker processes
//! ([`worker`]) that hold the subscriber connections ([`subscriber`]), then
//! publishes on an open-loop schedule ([`publisher`]). Receivers account for
//! every delivery by per-channel sequence number and latency
//! ([`accounting`]); the coordinator merges the workers' results and the
//! server's CPU and memory ([`process_stats`]) into one [`report::Report`].
//! Herald may be several nodes sharing a Redis; publishes then go through
//! HTTP to the nodes in turn, or straight into Redis ([`redis`]).
//!
//! Only loopback addresses can be targeted.

pub mod accounting;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod net;
pub mod payload;
pub mod process_stats;
pub mod publisher;
pub mod redis;
pub mod report;
pub mod subscriber;
pub mod token;
pub mod worker;

pub use config::{BenchConfig, PublishVia, Scenario, Target};
pub use coordinator::{WorkerLauncher, run};
pub use report::Report;
