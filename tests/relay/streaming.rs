//! The frame path end to end.
