//! Guest memory file (in progress).
