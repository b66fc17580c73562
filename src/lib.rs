//! wirepool
