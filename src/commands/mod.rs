//! The client-side commands: `send` and `health`. (`serve` is wiring and lives in `main`.)

pub mod health;
pub mod send;
