//! Integration tests against the real broker and S3 server on loopback
//! (`scripts/services.sh up` starts them).

mod helpers;
mod intake;
mod lifecycle;
