//! Hybrid decoders (Nemotron-Flash, NemotronH, Mamba2): residual blocks whose mixer is a
//! Mamba2 SSM, a DeltaNet, attention or an MLP, in an order a config gives.

pub mod mamba2;
pub mod stack;
