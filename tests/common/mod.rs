//! Shared test harness: the real ATProto world (`world`) and proof-editing tools (`repo`).

#![allow(dead_code)]

pub mod repo;
pub mod world;
