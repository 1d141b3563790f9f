//! userfaultfd lazy loader (in progress).
