//! Cross-domain primitives shared by every domain of splitvmm.
pub mod xenstore;
