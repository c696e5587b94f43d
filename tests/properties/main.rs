//! Property tests (proptest) of the code that reads what peers send.

mod first_message;
