//! Fathom's operator.
