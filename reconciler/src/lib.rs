//! The berth reconciler.
