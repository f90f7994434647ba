//! Domain 0: the toolstack.
