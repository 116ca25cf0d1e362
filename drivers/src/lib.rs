//! Volume drivers (arrive with the generic backup flow).
