//! The driver domain.
