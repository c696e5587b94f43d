//! Property tests (proptest) of the code that reads what peers send: the
//! frame scanner and header parser, masking, the HTTP head reader, the
//! first-message rewrite and session tokens. Each runs a few dozen to a few
//! hundred generated cases, so `cargo test` stays quick; the fuzz targets
//! under `fuzz/` (`tools/fuzz.sh`) run the same checks for hours.
//!
//! A failing case is shrunk and printed; proptest also saves its seed under
//! `tests/proptest-regressions/` so the next run tries it first.

/// The fuzz targets' checks; the frame pump is shared with them.
#[allow(dead_code)]
#[path = "../../fuzz/src/checks.rs"]
mod checks;
mod first_message;
mod frames;
mod head;
mod token;
