//! `sluice demo`: the Star Wars scenario in gateway mode on loopback, told as a story.

pub mod scheduler;
