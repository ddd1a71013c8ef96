//! Concrete providers: the local engine adapter and the Z.ai cloud client.

pub mod local;
pub mod zai;
