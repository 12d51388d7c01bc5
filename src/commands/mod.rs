//! The commands beyond `serve` (which is wiring and lives in `main`): `send`, `health`,
//! `convert`.

pub mod admin;
pub mod convert;
pub mod health;
pub mod send;
